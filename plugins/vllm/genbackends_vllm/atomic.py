"""Atomic weight syncs for the vLLM backend: snapshot, check, stream, restore on failure, and
invalidate caches afterwards (the reasoning and the measured cost: ``docs/reliability.md``).

* :func:`engine_snapshot` - ``with engine_snapshot(backend, names, timer): ...`` snapshots, on
  every worker of every replica, the modules the HF-named tensors ``names`` land in, and restores
  them if the body raises (any exception: the source, a transport, a load error). Used around
  the HF-named stream and around the direct path's ``write_direct``.
* :func:`stream_checked` - the HF-named stream: every bucket is checked against the manifest
  (name, shape, dtype, finite values; :class:`genbackends.sync_safety.StreamChecker`) *before* it
  is handed to the engines.
* :func:`invalidate_caches` - after every sync, accepted or rolled back: the prefix cache is
  reset and, where stale KV memory may hold NaN/Inf, the KV cache is zeroed.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping

from genbackends.errors import WeightSyncError
from genbackends.sync_safety import RESTORED, UNCHANGED, StreamChecker, SyncRefused, failure_message, one_line
from genbackends.weights import PhaseTimer

from genbackends_vllm.hf_layout import fused_buckets, fusion_key


def _call(replica: Any, method: str, *args: Any) -> Any:
    # LocalEngine has the method; a Ray replica forwards it to the LocalEngine in its actor
    if hasattr(replica, method):
        return getattr(replica, method)(*args)
    return replica._call(method, *args)


class SnapshotState:
    """What :func:`engine_snapshot` measured (merged into the SyncReport's details)."""

    def __init__(self) -> None:
        self.details: dict[str, float] = {}
        self.loaded = 0  # buckets handed to the engines so far (the caller counts them)


@contextlib.contextmanager
def engine_snapshot(
    backend: Any, names: list[str] | None, timer: PhaseTimer | None = None, *, enabled: bool = True
) -> Iterator[SnapshotState]:
    """Snapshot what ``names`` touch on every replica; restore it if the body raises.

    The body's exception becomes one :class:`WeightSyncError` line naming what went wrong and
    saying the engine was restored (or, with ``enabled=False`` / a failed restore, that it may
    hold a mix). Caches are invalidated either way (:func:`invalidate_caches`)."""
    timer = timer or PhaseTimer()
    state = SnapshotState()
    if enabled:
        with timer.phase("snapshot"):
            per_worker = [s for r in backend.replicas for s in (_call(r, "snapshot", names) or [])]
        for key in ("bytes_device", "bytes_host", "bytes_retained"):
            state.details[f"snapshot_{key}"] = float(sum(s.get(key, 0.0) for s in per_worker))
        state.details["snapshot_bytes"] = state.details["snapshot_bytes_device"] + state.details["snapshot_bytes_host"]
    try:
        yield state
    except BaseException as e:
        if not enabled:
            if state.loaded == 0 and isinstance(e, Exception):
                invalidate_caches(backend, timer, accepted=False)
                raise WeightSyncError(failure_message(e, UNCHANGED)) from e
            raise WeightSyncError(
                one_line(f"weight sync failed ({type(e).__name__}: {_problem(e)}); options.vllm.sync_atomic is off, so "
                         "the engine may hold a mix of old and new weights: sync again or restart it")
            ) from e
        try:
            with timer.phase("restore"):
                for r in backend.replicas:
                    _call(r, "restore")
        except Exception as restore_err:  # noqa: BLE001 - say both what failed and that restoring did too
            raise WeightSyncError(
                one_line(f"weight sync failed ({type(e).__name__}: {_problem(e)}) and restoring the previous weights "
                         f"failed too ({type(restore_err).__name__}: {restore_err}); the engine may hold a mix of old "
                         "and new weights: sync again or restart it")
            ) from e
        invalidate_caches(backend, timer, accepted=False)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise WeightSyncError(failure_message(e, RESTORED if state.loaded else UNCHANGED)) from e
    else:
        if enabled:
            for r in backend.replicas:
                _call(r, "drop_snapshot")


def _problem(e: BaseException) -> str:
    return e.problem if isinstance(e, SyncRefused) else str(e)


def stream_checked(
    buckets: Iterator[list[tuple[str, Any]]],
    manifest: Mapping[str, Any],
    bucket_bytes: int | None,
    timer: PhaseTimer,
    *,
    check_finite: bool,
) -> Iterator[list[tuple[str, Any]]]:
    """The source's buckets, re-bucketed so no fused module is split, each one checked before it
    is yielded (so before it is written). Raises :class:`SyncRefused` naming the tensor."""
    checker = StreamChecker(manifest, check_finite=False)
    finite = StreamChecker(manifest, check_finite=True) if check_finite else None
    want: dict[str, int] = {}
    for n in manifest:
        want[fusion_key(n)] = want.get(fusion_key(n), 0) + 1

    def pairs() -> Iterator[tuple[str, Any]]:
        for b in buckets:
            with timer.phase("check"):
                checker.check_bucket(b)  # names, shapes, dtypes as soon as the source yields them
            yield from b

    for i, bucket in enumerate(fused_buckets(pairs(), manifest, bucket_bytes)):
        with timer.phase("check"):
            have: dict[str, int] = {}
            for n, _ in bucket:
                have[fusion_key(n)] = have.get(fusion_key(n), 0) + 1
            partial = [k for k, c in have.items() if c != want[k]]
            if partial:  # the source ended inside a fused module: never load a part of one
                checker.finish()
                raise SyncRefused(f"the source sent only part of the fused module {partial[0]!r}")
        if finite is not None:
            with timer.phase("check_finite"):
                problem = finite_problem_of(bucket)
            if problem:
                raise SyncRefused(f"{problem} (bucket {i}); non-finite weights are refused (options.vllm.check_finite)")
        yield bucket
    with timer.phase("check"):
        checker.finish()


def finite_problem_of(bucket: list[tuple[str, Any]]) -> str | None:
    from genbackends.sync_safety import nonfinite_problem

    return nonfinite_problem(bucket)


def invalidate_caches(backend: Any, timer: PhaseTimer, *, accepted: bool, checked: bool = True) -> None:
    """After a sync: reset every replica's prefix cache; zero the KV memory where
    ``options.vllm.kv_scrub`` asks (auto: when an earlier accepted sync skipped the finite check,
    so stale blocks may hold NaN/Inf). ``checked``: this sync ran the finite check."""
    mode = backend.options.kv_scrub
    dirty = bool(getattr(backend, "_kv_may_be_nonfinite", False))
    if mode == "always" or (mode == "auto" and dirty):
        with timer.phase("scrub_kv"):
            for r in backend.replicas:
                _call(r, "scrub_kv_cache")
        backend._kv_may_be_nonfinite = False
    with timer.phase("reset_cache"):
        for r in backend.replicas:
            _call(r, "reset_prefix_cache")
    if accepted and not checked:
        backend._kv_may_be_nonfinite = True  # the new weights were never checked


def run_restorable(backend: Any, names: list[str] | None, timer: PhaseTimer, fn: Callable[[], Any]) -> tuple[Any, dict]:
    """``fn()`` inside :func:`engine_snapshot` (honouring ``options.vllm.sync_atomic``); returns
    ``(fn's result, snapshot details)``. For paths that write through their own code (the direct
    path's ``write_direct``)."""
    with engine_snapshot(backend, names, timer, enabled=backend.options.sync_atomic) as snap:
        snap.loaded = 1  # fn writes as it goes: assume something was written if it raises
        out = fn()
    return out, snap.details
