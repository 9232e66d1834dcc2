"""Per-architecture knowledge as data: which Megatron parameter holds which HF tensors, and how.

Each architecture is one :class:`ArchTable`: a list of :class:`Rule` rows read by the shared
machinery in :mod:`genbackends_megatron.layout`. A rule names the Megatron parameter (local-spec
spelling, ``{layer}`` for the stage-local layer index), the HF tensors it holds, the *kind* of
layout (how rows/columns of the Megatron tensor map onto the HF tensors, see ``layout.KINDS``),
where it lives (every layer, first stage, last stage) and an optional condition on the model
dimensions (``qkv_bias``, ``qk_norm``, ``untied``).

Transformer-Engine layer specs fuse the norms into the following linear layer; those spellings are
``aliases`` of the local-spec name, so one table serves both specs.

MoE (Qwen3-MoE): expert rules have ``stage="expert"`` and an ``{expert}`` placeholder: the
Megatron name carries the *local* expert index (``SequentialMLP``'s
``mlp.experts.local_experts.{expert}``; ``TEGroupedMLP``'s ``mlp.experts.linear_fc1.weight{expert}``
is an alias), the HF name the *global* one (``ep_rank * local_experts + local``). Expert shards
live at ``(pp, vp, expert_tp_rank, ep_rank)``, dense ones at ``(pp, vp, tp_rank)``. The router
(``mlp.router.weight`` -> ``mlp.gate.weight``) is replicated. ``GroupedMLP``'s
``mlp.experts.weight1/weight2`` (all local experts in one tensor, transposed) are known names
(:data:`GROUPED_MLP_NAMES`) that a sync refuses with a clear message.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Stage = Literal["layer", "first", "last", "expert"]


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter and the HF tensors it holds."""

    megatron: str
    kind: str
    hf: tuple[str, ...]
    stage: Stage = "layer"
    when: str | None = None
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class ArchTable:
    """Mapping table of one architecture (HF ``model_type``)."""

    arch: str
    rules: tuple[Rule, ...]


_L = "decoder.layers.{layer}."
_H = "model.layers.{layer}."

_EMBED = Rule("embedding.word_embeddings.weight", "vocab", ("model.embed_tokens.weight",), stage="first")
_FINAL_NORM = Rule("decoder.final_layernorm.weight", "replicated", ("model.norm.weight",), stage="last")
_OUTPUT = Rule("output_layer.weight", "vocab", ("lm_head.weight",), stage="last", when="untied")
_QKV = Rule(
    _L + "self_attention.linear_qkv.weight", "qkv",
    (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
)
_QKV_BIAS = Rule(
    _L + "self_attention.linear_qkv.bias", "qkv",
    (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"),
    when="qkv_bias",
)
_PROJ = Rule(_L + "self_attention.linear_proj.weight", "row", (_H + "self_attn.o_proj.weight",))
_IN_NORM = Rule(
    _L + "input_layernorm.weight", "replicated", (_H + "input_layernorm.weight",),
    aliases=(_L + "self_attention.linear_qkv.layer_norm_weight",),
)
_FC1 = Rule(_L + "mlp.linear_fc1.weight", "gated", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"))
_FC2 = Rule(_L + "mlp.linear_fc2.weight", "row", (_H + "mlp.down_proj.weight",))
_MLP_NORM = Rule(
    _L + "pre_mlp_layernorm.weight", "replicated", (_H + "post_attention_layernorm.weight",),
    aliases=(_L + "mlp.linear_fc1.layer_norm_weight",),
)
_Q_NORM = Rule(_L + "self_attention.q_layernorm.weight", "replicated", (_H + "self_attn.q_norm.weight",), when="qk_norm")
_K_NORM = Rule(_L + "self_attention.k_layernorm.weight", "replicated", (_H + "self_attn.k_norm.weight",), when="qk_norm")

LLAMA = ArchTable("llama", (_EMBED, _IN_NORM, _QKV, _PROJ, _MLP_NORM, _FC1, _FC2, _FINAL_NORM, _OUTPUT))
# Qwen2: QKV bias; tied embeddings (the `untied` condition drops output_layer).
QWEN2 = ArchTable("qwen2", (_EMBED, _IN_NORM, _QKV, _QKV_BIAS, _PROJ, _MLP_NORM, _FC1, _FC2, _FINAL_NORM, _OUTPUT))
# Qwen3: per-head q/k RMSNorm before RoPE.
QWEN3 = ArchTable(
    "qwen3", (_EMBED, _IN_NORM, _QKV, _Q_NORM, _K_NORM, _PROJ, _MLP_NORM, _FC1, _FC2, _FINAL_NORM, _OUTPUT)
)

_E = _L + "mlp.experts."
_HE = _H + "mlp.experts.{expert}."
_ROUTER = Rule(_L + "mlp.router.weight", "replicated", (_H + "mlp.gate.weight",))
_EXPERT_FC1 = Rule(_E + "local_experts.{expert}.linear_fc1.weight", "gated", (_HE + "gate_proj.weight", _HE + "up_proj.weight"),
                   stage="expert", aliases=(_E + "linear_fc1.weight{expert}",))
_EXPERT_FC2 = Rule(_E + "local_experts.{expert}.linear_fc2.weight", "row", (_HE + "down_proj.weight",),
                   stage="expert", aliases=(_E + "linear_fc2.weight{expert}",))
# Qwen3-MoE: Qwen3 attention (q/k norms), every layer sparse, no shared expert.
QWEN3_MOE = ArchTable(
    "qwen3_moe",
    (_EMBED, _IN_NORM, _QKV, _Q_NORM, _K_NORM, _PROJ, _MLP_NORM, _ROUTER, _EXPERT_FC1, _EXPERT_FC2, _FINAL_NORM, _OUTPUT),
)
# megatron-core's legacy GroupedMLP holds all local experts in two tensors ([hidden, E*2*I/etp] and
# [E*I/etp, hidden]); recognised so that a sync can refuse it by name instead of "unknown parameter".
GROUPED_MLP_NAMES = ("mlp.experts.weight1", "mlp.experts.weight2")

TABLES: dict[str, ArchTable] = {t.arch: t for t in (LLAMA, QWEN2, QWEN3, QWEN3_MOE)}


def table_for(arch: str) -> ArchTable:
    """The table of ``arch`` (HF ``model_type``); unknown names list the known ones."""
    from genbackends.errors import WeightSyncError

    try:
        return TABLES[arch]
    except KeyError:
        raise WeightSyncError(f"no Megatron mapping table for architecture {arch!r}; known: {', '.join(TABLES)}") from None
