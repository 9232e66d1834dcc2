"""The direct path: a plan from metadata, validated against the engine's own parameters, executed
as copies into vLLM's parameter storage.

1. The engine reports its parameters (names, loaded shapes, dtypes) per TP rank.
2. The pure plan (Megatron layout -> vLLM layout) is built and compared with them: every engine
   parameter must be planned and every planned one must exist with the same shape and dtype;
   every target element is covered exactly once (pieces + zero fills). Nothing moves before this.
3. Bytes move: trainer ranks that are not the engine host send the slices the engine needs
   (point-to-point, one packed buffer per rank); the host hands each engine rank its pieces
   through ``run_on_workers``: by reference when the worker lives in this process (the copy goes
   shard -> engine parameter directly), packed slices otherwise.
4. On the worker, pieces are compiled once into (destination view, source view) pairs, merging
   regular runs (the per-group Q/K/V rows) into one strided copy each, and executed with one
   ``torch._foreach_copy_``; views are cached while the tensors stay the same.
"""
from __future__ import annotations

import pickle
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from genbackends.errors import WeightSyncError
from genbackends_megatron.layout import vllm_layout
from genbackends_megatron.plan import Plan, make_plan
from genbackends_megatron.topology import agree


@dataclass
class DirectState:
    """A validated plan for one (source, engine) pair."""

    plan: Plan
    tp: int
    in_process: bool
    plan_id: int
    ops: Any = None  # per-rank copy/fill lists, built once
    group: Any = None  # DirectGroup to out-of-process workers, built on first use


def _probe(target: Any) -> tuple[int, dict[int, dict[str, tuple]], bool]:
    from genbackends_megatron.vllm_glue import logical_params
    import os

    tp = int(target.engine_layout()["tensor_parallel_size"])
    res = target.run_on_workers(logical_params)
    per_rank = {r: res[r]["params"] for r in range(tp)}
    in_process = all(x["pid"] == os.getpid() for x in res)
    return tp, per_rank, in_process


def check_engine_layout(planned: dict, per_rank: dict[int, dict[str, tuple]]) -> None:
    """Planned vLLM parameters against the engine's: names, shapes, dtypes (one-line error)."""
    probs = []
    for r, params in per_rank.items():
        want = {k[1]: v for k, v in planned.items() if k[0] == (r,)}
        missing = [n for n in params if n not in want]
        extra = [n for n in want if n not in params]
        if missing:
            probs.append(f"rank {r}: engine parameter(s) no table maps: {missing[:4]}")
        if extra:
            probs.append(f"rank {r}: planned parameter(s) the engine lacks: {extra[:4]}")
        for n, (shape, dtype) in params.items():
            if n in want and (tuple(shape) != tuple(want[n].shape) or dtype != want[n].dtype):
                probs.append(f"rank {r}: {n} is {tuple(shape)} {dtype} in the engine, planned {want[n].shape} {want[n].dtype}")
    if probs:
        raise WeightSyncError("direct sync rejected, nothing written: " + "; ".join(probs[:6]))


def plan_direct(source: Any, tp: int) -> Plan:
    """The pure plan from the source's Megatron layout into a TP-``tp`` vLLM engine."""
    return make_plan(source.layout, vllm_layout(source.dims, tp, source.dtype))


def validate_direct(source: Any, target: Any, check_shards: bool = True) -> DirectState:
    """Validate shards, engine layout and plan; cache and return the state (nothing moves)."""
    err = source.check_local() if check_shards else None
    if err:
        raise WeightSyncError(err)
    # The engine's parameter layout is fixed for its lifetime: probe and plan once per engine.
    st = source._direct_cache.get(id(target))
    if st is None:
        tp, per_rank, in_process = _probe(target)
        plan = plan_direct(source, tp)
        check_engine_layout(plan.dst, per_rank)
        st = source._direct_cache[id(target)] = DirectState(plan, tp, in_process, plan_id=id(plan))
    return st


def rank_ops(plan: Plan, tp: int) -> dict[int, dict[str, list]]:
    """Per engine rank, the plan as copy tuples ``(src, dst, axis, src_lo, dst_lo, length)`` and
    fill tuples ``(dst, axis, lo, length)`` (what the worker side executes)."""
    ops: dict[int, dict[str, list]] = {r: {"copy": [], "fill": []} for r in range(tp)}
    for p in plan.pieces:
        ops[p.dst[0][0]]["copy"].append((p.src, p.dst[1], p.axis, p.src_lo, p.dst_lo, p.length))
    for f in plan.fills:
        ops[f.dst[0][0]]["fill"].append((f.dst[1], f.axis, f.lo, f.length))
    return ops


def _pack(ops: dict[int, dict[str, list]], srcs: dict) -> tuple[dict, dict]:
    """For out-of-process workers: each piece's slice as its own contiguous tensor."""
    packed: dict = {}
    new_ops: dict[int, dict[str, list]] = {}
    for r, o in ops.items():
        lst = []
        for i, (src, dst, axis, s_lo, d_lo, n) in enumerate(o["copy"]):
            k = f"slice/{r}/{i}"  # string keys: vLLM's RPC serializer turns tuples into lists
            packed[k] = srcs[src].detach().narrow(axis, s_lo, n).contiguous().cpu()
            lst.append((k, dst, axis, 0, d_lo, n))
        new_ops[r] = {"copy": lst, "fill": o["fill"]}
    return [new_ops[r] for r in sorted(new_ops)], packed


def write_direct_local(source: Any, target: Any) -> dict[str, Any]:
    """Single trainer process: every shard is here."""
    t0 = time.perf_counter()
    st = validate_direct(source, target)
    t1 = time.perf_counter()
    shards = {k: v.detach() for k, v in source.model.named_shards().items()}
    details = _execute(st, target, shards, source.direct_transport, source.dtype)
    details["phases"] = {"plan": t1 - t0, **details["phases"]}
    return details


def _execute(st: DirectState, target: Any, srcs: dict, mode: str = "auto", dtype: Any = None) -> dict[str, Any]:
    """Move the bytes: in-process references, our own process group ("group", default for
    workers in other processes) or packed slices pickled through ``run_on_workers`` ("rpc")."""
    t0 = time.perf_counter()
    if st.ops is None:
        st.ops = rank_ops(st.plan, st.tp)
    ops = st.ops
    transport = "inprocess" if st.in_process else ("rpc" if mode == "rpc" else "group")
    t1 = time.perf_counter()
    if transport == "group":
        from genbackends_megatron.direct_group import DirectGroup

        if st.group is None:
            st.group = DirectGroup(target, st.tp, nccl=next(iter(srcs.values())).is_cuda)
        res = st.group.send_and_apply(target, ops, srcs, st.plan_id, dtype)
    else:
        if transport == "rpc":
            ops, srcs = _pack(ops, srcs)
        payload: Any = {"ops": ops, "src": srcs, "plan_id": st.plan_id}
        if transport == "rpc":
            # vLLM's RPC serializer rewrites nested tuples/tensors; ship one pickled blob instead.
            payload = {"blob": pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)}
        res = target.run_on_workers(apply_on_worker, payload)
    t2 = time.perf_counter()
    return {
        "bytes_moved": int(sum(r["bytes"] for r in res)),
        "num_tensors": int(sum(r["params"] for r in res)),
        "transport": transport,
        "phases": {"pack": t1 - t0, "copy": t2 - t1},
        "plan_pieces": len(st.plan.pieces),
    }


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------
def _strided(t: torch.Tensor, axis: int, lo: int, length: int, count: int, step: int) -> torch.Tensor:
    """``count`` runs of ``length`` along ``axis`` starting at ``lo``, ``step`` apart, as one view."""
    shape = list(t.shape)
    shape[axis] = length
    strides = list(t.stride())
    return t.as_strided([count] + shape, [step * strides[axis]] + strides, t.storage_offset() + lo * strides[axis])


def compile_copies(copies: list, srcs: dict, dsts: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(dst views, src views): runs with equal length and constant spacing on both sides (the
    per-query-group Q/K/V rows) become one strided view pair."""
    groups: dict[tuple, list] = defaultdict(list)
    for src, dst, axis, s_lo, d_lo, n in copies:
        groups[(_hashable(src), dst, axis, n)].append((d_lo, s_lo))
    dv, sv = [], []
    for (src, dst, axis, n), runs in groups.items():
        runs.sort()
        s_t, d_t = srcs[src], dsts[dst]
        i = 0
        while i < len(runs):
            j = i + 1
            if i + 1 < len(runs):
                dd, ds = runs[i + 1][0] - runs[i][0], runs[i + 1][1] - runs[i][1]
                while j < len(runs) and runs[j][0] - runs[j - 1][0] == dd and runs[j][1] - runs[j - 1][1] == ds:
                    j += 1
            cnt = j - i
            d_lo, s_lo = runs[i]
            if cnt > 1 and ds > 0 and dd > 0:
                dv.append(_strided(d_t, axis, d_lo, n, cnt, dd))
                sv.append(_strided(s_t, axis, s_lo, n, cnt, ds))
            else:
                cnt = 1
                j = i + 1
                dv.append(d_t.narrow(axis, d_lo, n))
                sv.append(s_t.narrow(axis, s_lo, n))
            i = j
    return dv, sv


def _hashable(k: Any) -> Any:
    return tuple(_hashable(x) for x in k) if isinstance(k, (list, tuple)) else k


def apply_on_worker(model: Any, tp_rank: int, payload: dict) -> dict[str, int]:
    """Run this rank's copies and fills into the engine's parameters, then let the engine use
    them (CPU: repack). Compiled views are cached on the model while tensors stay the same."""
    if "blob" in payload:
        payload = pickle.loads(payload["blob"])
    return apply_ops(model, tp_rank, payload["ops"][tp_rank], payload["src"], payload["plan_id"])


def apply_ops(model: Any, tp_rank: int, ops: dict, srcs: dict, plan_id: int) -> dict[str, int]:
    """Copies and fills of one rank (``{"copy": [...], "fill": [...]}``) from ``srcs``."""
    from genbackends_megatron.vllm_glue import finish_writes, writable_params

    payload_src = srcs
    cache = getattr(model, "_genbackends_direct_cache", None)
    hit = None
    if cache is not None and cache["plan_id"] == plan_id:
        # Reuse compiled views while every tensor is still the same storage (cheap pointer check).
        if all(k in srcs and srcs[k].data_ptr() == t.data_ptr() for k, t in cache["srcs"]) and all(
                getattr(m, leaf).data_ptr() == ptr for m, leaf, ptr in cache["dsts"]):
            hit = cache
    if hit is not None:
        dv, sv, fills, names = hit["dv"], hit["sv"], hit["fills"], hit["names"]
    else:
        if not all(isinstance(k, str) for k in srcs):
            srcs = {_hashable(k): v for k, v in srcs.items()}
        names = sorted({c[1] for c in ops["copy"]} | {f[0] for f in ops["fill"]})
        dsts = writable_params(model, names)
        dv, sv = compile_copies(ops["copy"], srcs, dsts)
        fills = [dsts[n].narrow(axis, lo, length) for n, axis, lo, length in ops["fill"]]
        used = {_hashable(c[0]) for c in ops["copy"]}
        mods = []
        for n in names:
            mod_name, _, leaf = n.rpartition(".")
            m = model.get_submodule(mod_name)
            mods.append((m, leaf, getattr(m, leaf).data_ptr()))
        model._genbackends_direct_cache = {
            "plan_id": plan_id, "dv": dv, "sv": sv, "fills": fills, "names": names,
            "srcs": [(k, v) for k, v in payload_src.items() if _hashable(k) in used], "dsts": mods}
    with torch.no_grad():
        if hasattr(torch, "_foreach_copy_") and dv:
            torch._foreach_copy_(dv, sv)
        else:  # pragma: no cover - older torch
            for d, s in zip(dv, sv):
                d.copy_(s)
        for f in fills:
            f.zero_()
    finish_writes(model, names)
    return {"bytes": sum(d.numel() * d.element_size() for d in dv), "params": len(names)}


# ---------------------------------------------------------------------------------------------
# Several trainer ranks
# ---------------------------------------------------------------------------------------------
def write_direct_collective(source: Any, backend: Any | None):
    """Collective over trainer ranks; the engine host (``source.engine_ranks[0]``) holds the
    backend. Returns the host's :class:`SyncReport`, None elsewhere. With several engine ranks
    (colocated engine workers, one per rank) each writes its own worker
    (:mod:`genbackends_megatron.direct_colocated`)."""
    from genbackends.weights import PhaseTimer, SyncReport

    if len(source.engine_ranks) > 1:
        from genbackends_megatron.direct_colocated import write_direct_colocated

        return write_direct_colocated(source, backend)
    timer = PhaseTimer()
    topo = source.topo
    me = topo.rank
    host = source.engine_ranks[0]
    err, st, tp = None, None, 0
    if me == host:
        try:
            with timer.phase("validate"):
                st = validate_direct(source, backend, check_shards=False)  # sync() checked them
            tp = st.tp
        except WeightSyncError as e:
            err = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [tp]
        dist.broadcast_object_list(box, src=host)
        tp = box[0]
    agree(err)
    plan = st.plan if st is not None else plan_direct(source, tp)
    shards = {k: v.detach() for k, v in source.model.named_shards().items()}
    # Slices living on other trainer ranks travel to the host, one packed buffer per rank.
    remote: dict[int, list] = defaultdict(list)
    for p in plan.pieces:
        pp, v, t = p.src[0]
        owner = topo.where[(pp, t)]
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
    source.peak_extra_bytes = moved  # received slices; packed copies for RPC are added below
    ops_plan, recv_srcs = reroute(plan, received)
    srcs = {**shards, **recv_srcs}
    with timer.phase("write"):
        if received:
            sub = DirectState(ops_plan, st.tp, st.in_process, id(ops_plan), group=st.group)
            details = _execute(sub, backend, srcs, source.direct_transport, source.dtype)
            st.group = sub.group
        else:
            details = _execute(st, backend, srcs, source.direct_transport, source.dtype)
    if details["transport"] == "rpc":
        source.peak_extra_bytes += details["bytes_moved"]  # every rank's slices pickled at once
    elif details["transport"] == "group":
        source.peak_extra_bytes += st.group.peak_buffer_bytes if st.group else 0  # one rank's buffer at a time
    with timer.phase("reset_cache"):
        for r in getattr(backend, "replicas", []):
            r.reset_prefix_cache()
    return SyncReport(path="direct", transport=f"p2p+{details['transport']}", num_tensors=details["num_tensors"],
                      bytes_moved=details["bytes_moved"] + moved, seconds=timer.total,
                      phases={**timer.phases, **details["phases"]}, details=details)


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
