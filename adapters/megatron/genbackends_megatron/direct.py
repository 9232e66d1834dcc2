"""The direct path, Megatron side: a plan from the Megatron source layout into the layout the
engine publishes (``backend.weight_layout()``), executed by the engine's own writer
(``backend.apply_writes``).

1. The backend publishes its target layout (per engine rank and parameter: HF sources, shape,
   dtype, shard axis, runs: fused pieces, padding), checked by the engine against its live
   parameters. The adapter knows nothing of how the engine shards or fuses.
2. The pure plan (Megatron layout -> published layout) covers every target element exactly once
   (pieces + zero fills) or is refused, naming the parameter. Nothing moves before this.
3. Bytes move: trainer ranks that are not the engine host send the slices the engine needs
   (point-to-point, one packed buffer per rank); the host hands each engine rank its copies
   (:data:`~genbackends.weight_layout.WriteOps`) and the slices to ``backend.apply_writes``, which
   reaches the workers by the cheapest transport they allow.

Every sync enters through ``backend.sync_weights(source, path="direct")`` (or its collective form,
``collective=True``, from :meth:`MegatronWeightSource.sync`): the backend validates, guards (asleep
weights), invalidates its caches, fires the hooks and writes the report.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from genbackends.errors import WeightSyncError
from genbackends_megatron.layout import target_layout
from genbackends_megatron.plan import Plan, make_plan
from genbackends_megatron.topology import agree


@dataclass
class DirectState:
    """A validated plan for one (source, engine) pair."""

    plan: Plan
    tp: int
    plan_id: int
    ops: Any = None  # per-rank copy/fill lists, built once
    published: Any = None  # the engine's WeightLayout the plan was made against


def plan_direct(source: Any, published: Any) -> Plan:
    """The pure plan from the source's Megatron layout into an engine's published layout."""
    return make_plan(source.layout, target_layout(published))


def validate_direct(source: Any, target: Any, check_shards: bool = True) -> DirectState:
    """Validate shards and plan against the target's published layout; cache and return the
    state (nothing moves). The layout is fixed for the engine's lifetime: planned once."""
    err = source.check_local() if check_shards else None
    if err:
        raise WeightSyncError(err)
    st = source._direct_cache.get(id(target))
    if st is None:
        published = target.weight_layout()
        plan = plan_direct(source, published)
        st = source._direct_cache[id(target)] = DirectState(plan, published.tensor_parallel_size, id(plan), published=published)
    return st


def rank_ops(plan: Plan, tp: int) -> dict[int, dict[str, list]]:
    """Per engine rank, the plan as :data:`~genbackends.weight_layout.WriteOps`: copy tuples
    ``(src, dst, axis, src_lo, dst_lo, length)`` and fill tuples ``(dst, axis, lo, length)``."""
    ops: dict[int, dict[str, list]] = {r: {"copy": [], "fill": []} for r in range(tp)}
    for p in plan.pieces:
        ops[p.dst[0][0]]["copy"].append((p.src, p.dst[1], p.axis, p.src_lo, p.dst_lo, p.length))
    for f in plan.fills:
        ops[f.dst[0][0]]["fill"].append((f.dst[1], f.axis, f.lo, f.length))
    return ops


def write_direct_local(source: Any, target: Any) -> dict[str, Any]:
    """Single trainer process: every shard is here."""
    t0 = time.perf_counter()
    # The backend's sync validated this source a moment ago (validate_direct): reuse the shards it
    # checked instead of walking the model's parameters twice more (about 1 ms each at 8B, paid
    # before the first copy can start).
    checked = source.__dict__.pop("_checked_shards", None)
    st = validate_direct(source, target, check_shards=checked is None)
    t1 = time.perf_counter()
    shards = {k: v.detach() for k, v in (checked or source.model.named_shards()).items()}
    details = _execute(st, target, shards, source.direct_transport, source.dtype)
    details["phases"] = {"plan": t1 - t0, **details["phases"]}
    return details


def _execute(st: DirectState, target: Any, srcs: dict, mode: str = "auto", dtype: Any = None) -> dict[str, Any]:
    """Hand the plan's writes and the source tensors to the engine's writer (``apply_writes``:
    references in process, its own group or RPC to worker processes; ``mode`` picks among the
    latter)."""
    if st.ops is None:
        st.ops = rank_ops(st.plan, st.tp)
    details = target.apply_writes(st.ops, srcs, plan_id=st.plan_id, transport=mode, dtype=dtype)
    details["plan_pieces"] = len(st.plan.pieces)
    return details


# ---------------------------------------------------------------------------------------------
# Several trainer ranks
# ---------------------------------------------------------------------------------------------
def agree_then_write(source: Any, target: Any | None, refusal: BaseException | None,
                     check_finite: bool) -> dict[str, Any] | None:
    """The collective form of ``source.write_direct``, the same for dense and MoE sources: every
    trainer rank agrees on its own shard check (and NaN/Inf check with ``check_finite``) and on the
    backend's ``refusal`` before any byte moves (a rank refused by its backend raises that error,
    the others a :class:`WeightSyncError` naming it); then :func:`write_direct_collective`."""
    err = f"{type(refusal).__name__}: {refusal}" if refusal is not None else source.check_local()
    if err is None and check_finite:  # every rank checks its own shards; all agree below
        err = source.nonfinite_problem()
    try:
        agree(err)
    except WeightSyncError:
        if refusal is not None:
            raise refusal from None
        raise
    return write_direct_collective(source, target)


def nonfinite_problem(source: Any, label: Any) -> str | None:
    """The first NaN/Inf among this rank's shards of ``source`` (named by ``label(key)``), as a
    refusal line, or None. One fused reduction per tensor where the shards are, one host sync."""
    from genbackends.sync_safety import nonfinite_problem as first_nonfinite

    shards = source.model.named_shards()
    problem = first_nonfinite([(label(k), t.detach()) for k, t in shards.items()])
    return f"weight sync rejected, nothing written: {problem}" if problem else None


def write_direct_collective(source: Any, backend: Any | None) -> dict[str, Any] | None:
    """Collective over trainer ranks (reached through ``backend.sync_weights(source,
    path="direct", collective=True)`` on engine ranks); the engine host
    (``source.engine_ranks[0]``) holds the backend; ``source.shard_owner(key)`` names the trainer
    rank that sends each Megatron shard (dense or expert). Returns the host's write details
    (``transport``, ``num_tensors``, ``bytes_moved``, ``phases``, ``details``) for the backend's
    report, None elsewhere. With several engine ranks (colocated engine workers, one per rank) each
    writes its own worker (:mod:`genbackends_megatron.direct_colocated`)."""
    from genbackends.weights import PhaseTimer

    if len(source.engine_ranks) > 1:
        from genbackends_megatron.direct_colocated import write_direct_colocated

        return write_direct_colocated(source, backend)
    timer = PhaseTimer()
    me = dist.get_rank() if dist.is_initialized() else 0
    host = source.engine_ranks[0]
    err, st, fresh = None, None, None
    if me == host:
        try:
            with timer.phase("validate"):
                known = id(backend) in source._direct_cache
                st = validate_direct(source, backend, check_shards=False)  # checked before (agreed)
            # Other ranks plan the slices they send from the same published layout: it travels
            # once per engine, with the plan's id (every later sync sends the id only).
            fresh = (st.plan_id, None if known else st.published)
        except WeightSyncError as e:
            err = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [fresh]
        dist.broadcast_object_list(box, src=host)
        fresh = box[0]
    agree(err)
    if st is not None:
        plan = st.plan
    else:
        plan_id, published = fresh
        if published is not None:
            source._direct_cache[("peer", plan_id)] = plan_direct(source, published)
        plan = source._direct_cache[("peer", plan_id)]
    shards = {k: v.detach() for k, v in source.model.named_shards().items()}
    # Slices living on other trainer ranks travel to the host, one packed buffer per rank.
    remote: dict[int, list] = defaultdict(list)
    for p in plan.pieces:
        owner = source.shard_owner(p.src)
        if owner != host:
            remote[owner].append(p)
    moved = 0
    with timer.phase("p2p"):
        if me != host and me in remote:
            dist.send(pack_pieces(shards, remote[me]), dst=host)
        received: dict = {}
        if me == host:
            for owner in sorted(remote):
                flat = torch.empty(sum(piece_numel(plan, p) for p in remote[owner]), dtype=source.dtype,
                                   device=next(iter(shards.values())).device)
                dist.recv(flat, src=owner)
                moved += flat.numel() * flat.element_size()
                for p, view in zip(remote[owner], piece_views(flat, plan, remote[owner])):
                    received[p] = (("remote", p), view)
    if me != host:
        return None
    source.peak_extra_bytes = moved  # received slices; the writer's transport buffers are added below
    ops_plan, recv_srcs = reroute(plan, received)
    srcs = {**shards, **recv_srcs}
    with timer.phase("write"):
        if received:
            sub = DirectState(ops_plan, st.tp, id(ops_plan))
            details = _execute(sub, backend, srcs, source.direct_transport, source.dtype)
        else:
            details = _execute(st, backend, srcs, source.direct_transport, source.dtype)
    source.peak_extra_bytes += int(details.get("peak_buffer_bytes", 0))
    return {"transport": f"p2p+{details['transport']}", "num_tensors": details["num_tensors"],
            "bytes_moved": details["bytes_moved"] + moved, "phases": {**timer.phases, **details["phases"]},
            "details": details}


def pack_pieces(shards: dict, pieces: list) -> torch.Tensor:
    """The source slices of ``pieces``, flattened into one contiguous buffer (one send)."""
    return torch.cat([shards[p.src].narrow(p.axis, p.src_lo, p.length).reshape(-1) for p in pieces])


def piece_views(flat: torch.Tensor, plan: Plan, pieces: list) -> list[torch.Tensor]:
    """Views of a buffer filled by :func:`pack_pieces` (same pieces, same order), one per piece,
    each shaped like its source slice."""
    views, off = [], 0
    for p in pieces:
        n = piece_numel(plan, p)
        shape = list(plan.src[p.src].shape)
        shape[p.axis] = p.length
        views.append(flat[off:off + n].view(shape))
        off += n
    return views


def reroute(plan: Plan, received: dict) -> tuple[Plan, dict]:
    """``plan`` with the pieces in ``received`` (piece -> (key, tensor holding exactly its slice))
    reading from those tensors instead of the shards; returns the plan and ``{key: tensor}``."""
    pieces, srcs = [], {}
    for p in plan.pieces:
        if p in received:
            key, t = received[p]
            srcs[key] = t
            pieces.append(type(p)(key, p.dst, p.axis, 0, p.dst_lo, p.length))
        else:
            pieces.append(p)
    return Plan(plan.src, plan.dst, pieces, plan.fills), srcs


def piece_numel(plan: Plan, p) -> int:
    """Elements of piece ``p``'s source slice."""
    n = p.length
    for i, d in enumerate(plan.src[p.src].shape):
        if i != p.axis:
            n *= d
    return n
