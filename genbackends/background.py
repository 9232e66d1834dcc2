"""Run a blocking call in a background thread while the caller does the other half of a rendezvous.

Weight transfers over a process group of our own need both sides at once: the engine workers'
receive (reached through a blocking RPC) and this process's sends. The RPC only returns after the
sends, so it runs in a thread and the caller joins it afterwards.
"""
from __future__ import annotations

import threading
from typing import Any, Callable


def start_in_background(fn: Callable[[], Any]) -> Callable[..., Any]:
    """Start ``fn()`` in a daemon thread; return ``join(check=None)``, which waits for it and
    returns its result or re-raises its exception in the caller. ``check`` is called while it
    waits (every 0.2 s) and ends the wait by raising; the thread then runs on (daemon)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # re-raised by join, in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join(check: Callable[[], Any] | None = None, poll_s: float = 0.2) -> Any:
        # ``check`` (e.g. "are the engine's processes alive?") runs every ``poll_s`` while the
        # call is still running and may raise, so a wait on a dead peer ends in seconds.
        while thread.is_alive():
            thread.join(None if check is None else poll_s)
            if check is not None and thread.is_alive():
                check()
        if "error" in box:
            raise box["error"]
        return box.get("result")

    return join
