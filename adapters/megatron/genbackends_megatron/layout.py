"""Pure layout math: where every element of every HF tensor lives on each side of a sync.

A *layout* maps each parameter of one side (Megatron shards, an engine's published rank
parameters (:func:`target_layout`), or full HF tensors) to a :class:`ParamSpec`: its shape, the one axis along which it is assembled from HF
tensors, and a list of :class:`Seg` runs ``(hf_name, hf_lo, lo, length)`` meaning "indices
``lo .. lo+length`` of this parameter along ``axis`` are indices ``hf_lo .. hf_lo+length`` of HF
tensor ``hf_name`` along the same axis" (the other axes are whole). Gaps between runs are padding
(vocab padding rows): ignored on a source, zero-filled on a target.

Every kind of parameter (``KINDS``) is a small function giving those runs for one shard; the
per-architecture tables (:mod:`genbackends_megatron.tables`) say which kind each parameter is.
Nothing here touches processes or tensors' data: this is metadata in, metadata out.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from genbackends.errors import WeightSyncError
from genbackends.weights import tensor_nbytes
from genbackends_megatron.tables import ArchTable, Rule, table_for


@dataclass(frozen=True)
class Seg:
    """``length`` indices of a parameter (from ``lo``) are HF tensor ``hf`` indices from ``hf_lo``."""

    hf: str
    hf_lo: int
    lo: int
    length: int


@dataclass(frozen=True)
class ParamSpec:
    """One parameter on one rank: shape, assembly axis, HF runs, dtype."""

    name: str
    loc: tuple[int, ...]
    shape: tuple[int, ...]
    axis: int
    segs: tuple[Seg, ...]
    dtype: torch.dtype = torch.float32

    @property
    def key(self) -> tuple[tuple[int, ...], str]:
        return (self.loc, self.name)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


@dataclass(frozen=True)
class ModelDims:
    """Architecture-level sizes, read from an HF ``config.json`` (or given directly)."""

    arch: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    # Mixture of experts (0 = dense): routed experts, experts per token, one expert's width.
    num_experts: int = 0
    moe_top_k: int = 0
    moe_intermediate_size: int = 0

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any] | Any) -> "ModelDims":
        """From a ``config.json`` dict, a folder holding one, or a transformers config object."""
        if isinstance(cfg, (str, Path)):
            p = Path(cfg)
            cfg = json.loads((p / "config.json" if p.is_dir() else p).read_text())
        if not isinstance(cfg, Mapping):
            cfg = cfg.to_dict()
        arch = cfg.get("model_type", "")
        table_for(arch)  # unknown architectures fail here, naming the known ones
        heads = cfg["num_attention_heads"]
        rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            arch=arch,
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            tied=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has QKV bias; others say so with attention_bias.
            qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=arch in ("qwen3", "qwen3_moe"),
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            num_experts=cfg.get("num_experts") or cfg.get("num_local_experts") or 0,  # transformers 5 writes the latter
            moe_top_k=cfg.get("num_experts_per_tok") or 0,
            moe_intermediate_size=cfg.get("moe_intermediate_size") or 0,
        )

    def condition(self, when: str | None) -> bool:
        return {None: True, "qkv_bias": self.qkv_bias, "qk_norm": self.qk_norm, "untied": not self.tied}[when]

    @property
    def table(self) -> ArchTable:
        return table_for(self.arch)


@dataclass(frozen=True)
class MegatronParallel:
    """How a Megatron model is sharded: TP, PP, virtual PP, and its vocab padding rule."""

    tp: int = 1
    pp: int = 1
    vp: int | None = None
    make_vocab_size_divisible_by: int = 128
    # Uneven pipelines (megatron's num_layers_in_first/last_pipeline_stage); None = even split.
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    # Expert parallel size and expert tensor parallel size (None: megatron's default, = tp).
    ep: int = 1
    etp: int | None = None

    @property
    def expert_tp(self) -> int:
        return self.etp or self.tp

    def padded_vocab(self, vocab: int) -> int:
        """Megatron pads the vocab to a multiple of ``make_vocab_size_divisible_by * tp``."""
        m = self.make_vocab_size_divisible_by * self.tp
        return -(-vocab // m) * m


def stage_layers(num_layers: int, par: MegatronParallel) -> dict[tuple[int, int], list[int]]:
    """Global layer indices held by each (pp_rank, vp_stage); megatron's offset rule.

    Without uneven stages, with ``vp`` chunks: chunk ``v`` of stage ``p`` holds
    ``L/(pp*vp)`` layers from ``v*L/vp + p*L/(pp*vp)`` (megatron's interleaved schedule).
    """
    vp = par.vp or 1
    out: dict[tuple[int, int], list[int]] = {}
    if par.first_stage_layers is None and par.last_stage_layers is None:
        if num_layers % (par.pp * vp):
            raise WeightSyncError(f"num_layers {num_layers} is not divisible by pp*vp = {par.pp * vp}")
        per = num_layers // (par.pp * vp)
        for p in range(par.pp):
            for v in range(vp):
                start = v * (num_layers // vp) + p * per
                out[(p, v)] = list(range(start, start + per))
        return out
    if vp != 1:
        raise WeightSyncError("uneven pipeline stages with virtual pipeline parallelism are not supported")
    first = par.first_stage_layers or 0
    last = par.last_stage_layers or 0
    middle_stages = par.pp - (par.first_stage_layers is not None) - (par.last_stage_layers is not None)
    rest = num_layers - first - last
    per = rest // middle_stages if middle_stages else 0
    if middle_stages and rest % middle_stages:
        raise WeightSyncError(f"{rest} middle layers do not split evenly over {middle_stages} stages")
    start = 0
    for p in range(par.pp):
        n = first if (p == 0 and par.first_stage_layers is not None) else (
            last if (p == par.pp - 1 and par.last_stage_layers is not None) else per)
        out[(p, 0)] = list(range(start, start + n))
        start += n
    return out


# ---------------------------------------------------------------------------------------------
# HF tensor shapes and axes
# ---------------------------------------------------------------------------------------------
_ROW_SUFFIXES = ("o_proj.weight", "down_proj.weight")


def hf_axis(hf_name: str) -> int:
    """The axis along which an HF tensor is split by tensor parallelism (1 for row-parallel)."""
    return 1 if hf_name.endswith(_ROW_SUFFIXES) else 0


def hf_shapes(dims: ModelDims) -> dict[str, tuple[int, ...]]:
    """Every HF tensor of the model with its shape, in table order."""
    d = dims
    q, kv = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    base = {
        "model.embed_tokens.weight": (d.vocab_size, d.hidden_size),
        "lm_head.weight": (d.vocab_size, d.hidden_size),
        "model.norm.weight": (d.hidden_size,),
    }
    per_layer = {
        "self_attn.q_proj.weight": (q, d.hidden_size),
        "self_attn.k_proj.weight": (kv, d.hidden_size),
        "self_attn.v_proj.weight": (kv, d.hidden_size),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (d.hidden_size, q),
        "self_attn.q_norm.weight": (d.head_dim,),
        "self_attn.k_norm.weight": (d.head_dim,),
        "input_layernorm.weight": (d.hidden_size,),
        "post_attention_layernorm.weight": (d.hidden_size,),
        "mlp.gate_proj.weight": (d.intermediate_size, d.hidden_size),
        "mlp.up_proj.weight": (d.intermediate_size, d.hidden_size),
        "mlp.down_proj.weight": (d.hidden_size, d.intermediate_size),
        "mlp.gate.weight": (d.num_experts, d.hidden_size),
        "mlp.experts.E.gate_proj.weight": (d.moe_intermediate_size, d.hidden_size),
        "mlp.experts.E.up_proj.weight": (d.moe_intermediate_size, d.hidden_size),
        "mlp.experts.E.down_proj.weight": (d.hidden_size, d.moe_intermediate_size),
    }
    out: dict[str, tuple[int, ...]] = {}
    for rule in d.table.rules:
        if not d.condition(rule.when):
            continue
        layers = range(d.num_layers) if rule.stage in ("layer", "expert") else [None]
        experts = range(d.num_experts) if rule.stage == "expert" else [None]
        for i in layers:
            for e in experts:
                for h in rule.hf:
                    name = h.format(layer=i, expert=e)
                    key = _EXPERT_IDX.sub(".experts.E.", name.split(f"layers.{i}.", 1)[1]) if i is not None else name
                    out[name] = base[name] if i is None else per_layer[key]
    return out


_EXPERT_IDX = re.compile(r"\.experts\.\d+\.")


# ---------------------------------------------------------------------------------------------
# Kinds: runs of one shard (rank r of t) of a parameter holding HF tensors `hf`
# Each returns (shape, axis, segs).
# ---------------------------------------------------------------------------------------------
def _chunk(n: int, t: int, what: str) -> int:
    if n % t:
        raise WeightSyncError(f"{what}: size {n} is not divisible by tensor-parallel size {t}")
    return n // t


def _clip(segs: list[Seg], lo: int, hi: int) -> list[Seg]:
    """Runs of a full tensor restricted to [lo, hi) and shifted to start at 0."""
    out = []
    for s in segs:
        a, b = max(s.lo, lo), min(s.lo + s.length, hi)
        if a < b:
            out.append(Seg(s.hf, s.hf_lo + a - s.lo, a - lo, b - a))
    return out


def megatron_qkv(d: ModelDims, hf: tuple[str, ...], t: int, r: int, shapes: dict) -> tuple:
    """Megatron interleaves per query group ``[q x heads_per_group, k, v]``; a TP shard is a
    contiguous chunk of those rows (also when num_query_groups < TP: then a group spans ranks)."""
    hd, g_n = d.head_dim, d.num_kv_heads
    qpg = d.num_heads // g_n
    grp = (qpg + 2) * hd
    full = []
    for g in range(g_n):
        full += [Seg(hf[0], g * qpg * hd, g * grp, qpg * hd),
                 Seg(hf[1], g * hd, g * grp + qpg * hd, hd),
                 Seg(hf[2], g * hd, g * grp + (qpg + 1) * hd, hd)]
    n = g_n * grp
    per = _chunk(n, t, f"{hf[0]} (Megatron linear_qkv rows)")
    shape = (per,) + tuple(shapes[hf[0]][1:])
    return shape, 0, _clip(full, r * per, (r + 1) * per)


def gated(d: ModelDims, hf: tuple[str, ...], t: int, r: int, shapes: dict) -> tuple:
    """A TP shard of a fused gate/up projection is ``[gate_r; up_r]`` (Megatron fc1 and vLLM
    gate_up_proj alike)."""
    f = shapes[hf[0]][0]
    per = _chunk(f, t, hf[0])
    return (2 * per,) + tuple(shapes[hf[0]][1:]), 0, [Seg(hf[0], r * per, 0, per), Seg(hf[1], r * per, per, per)]


def row(d: ModelDims, hf: tuple[str, ...], t: int, r: int, shapes: dict) -> tuple:
    """Row-parallel linear (o_proj, down_proj): contiguous column chunks."""
    rows, cols = shapes[hf[0]]
    per = _chunk(cols, t, hf[0])
    return (rows, per), 1, [Seg(hf[0], r * per, 0, per)]


def column(d: ModelDims, hf: tuple[str, ...], t: int, r: int, shapes: dict) -> tuple:
    """Plain column-parallel: contiguous row chunks."""
    n = shapes[hf[0]][0]
    per = _chunk(n, t, hf[0])
    return (per,) + tuple(shapes[hf[0]][1:]), 0, [Seg(hf[0], r * per, 0, per)]


def replicated(d: ModelDims, hf: tuple[str, ...], t: int, r: int, shapes: dict) -> tuple:
    """The whole tensor on every rank (norms)."""
    shape = tuple(shapes[hf[0]])
    return shape, 0, [Seg(hf[0], 0, 0, shape[0])]


def vocab_rows(padded: int, vocab: int, hf: str, t: int, r: int, cols: tuple) -> tuple:
    """Vocab-parallel rows: ``padded/t`` rows per rank, rows past the real vocab are padding."""
    per = _chunk(padded, t, f"{hf} (padded vocab)")
    lo = r * per
    n = max(0, min(per, vocab - lo))
    return (per,) + cols, 0, ([Seg(hf, lo, 0, n)] if n else [])


KINDS: dict[str, Callable[..., tuple]] = {"qkv": megatron_qkv, "gated": gated, "row": row, "column": column,
                                          "replicated": replicated}


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------
Layout = dict[tuple[tuple[int, ...], str], ParamSpec]


def _rules(d: ModelDims) -> list[Rule]:
    return [r for r in d.table.rules if d.condition(r.when)]


def local_experts(d: ModelDims, par: MegatronParallel) -> int:
    """Experts per expert-parallel rank (global index = ``ep_rank * local_experts + local``)."""
    if d.num_experts % par.ep:
        raise WeightSyncError(f"num_experts {d.num_experts} is not divisible by expert-parallel size {par.ep}")
    return d.num_experts // par.ep


def _expert_specs(d: ModelDims, par: MegatronParallel, p: int, v: int, layers: list[int], shapes: dict,
                  dtype: torch.dtype) -> dict:
    """Expert shards of one (pp, vp) chunk, at locations ``(pp, vp, expert_tp_rank, ep_rank)``."""
    out = {}
    n_local = local_experts(d, par)
    etp = par.expert_tp
    for rule in _rules(d):
        if rule.stage != "expert":
            continue
        for e in range(par.ep):
            for tr in range(etp):
                loc = (p, v, tr, e)
                for li, g in enumerate(layers):
                    for i in range(n_local):
                        name = rule.megatron.format(layer=li, expert=i)
                        hf = tuple(h.format(layer=g, expert=e * n_local + i) for h in rule.hf)
                        shape, axis, segs = KINDS[rule.kind](d, hf, etp, tr, shapes)
                        out[(loc, name)] = ParamSpec(name, loc, tuple(shape), axis, tuple(segs), dtype)
    return out


def megatron_layout(d: ModelDims, par: MegatronParallel, dtype: torch.dtype = torch.float32) -> Layout:
    """Every Megatron parameter shard: keys ``((pp, vp, tp), local_name)``.

    Local names use the local layer spec and stage-local layer numbering (``decoder.layers.N``
    counts from 0 in each (pp, vp) chunk). With tied embeddings and PP > 1 the last stage holds its
    own copy ``output_layer.weight``, a replica of ``embed_tokens`` (the HF model has only that);
    the plan reads one copy (the first stage's unless ``prefer`` says otherwise) and loading
    writes both. The copies are equal: megatron all-reduces their gradients.
    """
    shapes = hf_shapes(d)
    padded = par.padded_vocab(d.vocab_size)
    chunks = stage_layers(d.num_layers, par)
    vp = par.vp or 1
    out: Layout = {}
    for (p, v), layers in chunks.items():
        first = p == 0 and v == 0
        last = p == par.pp - 1 and v == vp - 1
        for tr in range(par.tp):
            loc = (p, v, tr)
            for rule in _rules(d):
                if rule.stage == "layer":
                    items = [(rule.megatron.format(layer=li), tuple(h.format(layer=g) for h in rule.hf))
                             for li, g in enumerate(layers)]
                elif rule.stage == "expert":
                    items = []  # see _expert_specs
                elif (rule.stage == "first" and first) or (rule.stage == "last" and last):
                    items = [(rule.megatron, rule.hf)]
                else:
                    items = []
                for name, hf in items:
                    if rule.kind == "vocab":
                        shape, axis, segs = vocab_rows(padded, d.vocab_size, hf[0], par.tp, tr, (d.hidden_size,))
                    else:
                        shape, axis, segs = KINDS[rule.kind](d, hf, par.tp, tr, shapes)
                    out[(loc, name)] = ParamSpec(name, loc, tuple(shape), axis, tuple(segs), dtype)
            if d.tied and last and par.pp > 1:
                # The last stage's copy of the tied embedding holds the same rows as the first
                # stage's: a replica of embed_tokens (the plan reads one copy, loading fills both).
                shape, axis, segs = vocab_rows(padded, d.vocab_size, "model.embed_tokens.weight", par.tp, tr, (d.hidden_size,))
                out[(loc, "output_layer.weight")] = ParamSpec("output_layer.weight", loc, shape, axis, tuple(segs), dtype)
        if d.num_experts:
            out.update(_expert_specs(d, par, p, v, layers, shapes, dtype))
    return out


def hf_layout(d: ModelDims, dtype: torch.dtype = torch.float32, loc: tuple[int, ...] = ()) -> Layout:
    """Full HF tensors at one location (the universal path's and the exporter's target)."""
    out: Layout = {}
    for name, shape in hf_shapes(d).items():
        ax = hf_axis(name)
        out[(loc, name)] = ParamSpec(name, loc, shape, ax, (Seg(name, 0, 0, shape[ax]),), dtype)
    return out


def target_layout(published: Any) -> Layout:
    """An engine's published :class:`~genbackends.weight_layout.WeightLayout` as a plan target:
    keys ``((rank,), engine_param_name)``. The engine owns this knowledge (its sharding, fusions,
    vocab padding, a tied head's absence); the adapter only reads it."""
    out: Layout = {}
    for p in published:
        segs = tuple(Seg(r.hf, r.hf_lo, r.lo, r.length) for r in p.runs)
        # MoE: an entry describing one expert's slice of a fused tensor is keyed name[e] (TargetParam.key)
        key = getattr(p, "key", p.name)
        out[((p.rank,), key)] = ParamSpec(key, (p.rank,), tuple(p.shape), p.axis, segs, p.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Names of a live model
# ---------------------------------------------------------------------------------------------
_MODULE_PREFIX = re.compile(r"^(module\.)+")


@functools.lru_cache(maxsize=65536)
def canonical_megatron_name(name: str, d: ModelDims) -> str | None:
    """Strip ``module.`` wrappers and map TE fused-norm spellings to local-spec names.

    Returns None for entries that are not weights (``_extra_state``); raises
    :class:`WeightSyncError` naming a parameter no table knows.
    """
    name = _MODULE_PREFIX.sub("", name)
    if name.endswith("_extra_state"):
        return None
    m = re.match(r"^decoder\.layers\.(\d+)\.(.*)$", name)
    li, rest = (m.group(1), m.group(2)) if m else (None, name)
    for rule in d.table.rules:
        for spelled in (rule.megatron,) + rule.aliases:
            if rule.stage == "expert":
                if li is None:
                    continue
                # {expert} is the local expert index (SequentialMLP's local_experts.i, TEGroupedMLP's weight<i>)
                rx = re.escape(spelled.replace("{layer}", li)).replace(re.escape("{expert}"), r"(\d+)")
                em = re.fullmatch(rx, name)
                if em:
                    return rule.megatron.format(layer=li, expert=em.group(1))
                continue
            pat = spelled.replace("{layer}", "") if li is None else spelled.format(layer=li)
            if pat == name:
                return rule.megatron.format(layer=li) if li is not None else rule.megatron
    if name == "output_layer.weight" and d.tied:
        return name
    from genbackends_megatron.tables import GROUPED_MLP_NAMES

    if rest in GROUPED_MLP_NAMES:
        raise WeightSyncError(f"Megatron parameter {name!r} is a GroupedMLP tensor (all local experts in one); "
                              "build the model with SequentialMLP (moe_grouped_gemm=False) or TEGroupedMLP")
    raise WeightSyncError(f"Megatron parameter {name!r} is not in the {d.arch} mapping table")
