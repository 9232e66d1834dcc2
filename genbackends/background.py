"""Run a blocking call in a background thread while the caller does the other half of a rendezvous.

Weight transfers over a process group of our own need both sides at once: the engine workers'
receive (reached through a blocking RPC) and this process's sends. The RPC only returns after the
sends, so it runs in a thread and the caller joins it afterwards.
"""
from __future__ import annotations

import threading
from typing import Any, Callable


def start_in_background(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Start ``fn()`` in a daemon thread; return ``join()``, which waits for it and returns its
    result or re-raises its exception in the caller."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # re-raised by join, in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> Any:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box.get("result")

    return join
