"""The pure resharding plan against an independent reference.

The reference shards HF tensors the way megatron-core and vLLM lay them out, written with plain
tensor ops (reshape/cat/chunk, KV-head repeat) and no interval arithmetic: the plan applied to the
reference Megatron shards must give exactly the reference vLLM shards and the original HF tensors,
for many (TP, PP, VP) x vLLM TP combinations, KV replication included.
"""
from __future__ import annotations

import pytest
import torch

from genbackends.errors import WeightSyncError
from genbackends_megatron.layout import (
    MegatronParallel, ModelDims, canonical_megatron_name, hf_layout, hf_shapes, megatron_layout, stage_layers,
    target_layout,
)
from genbackends_megatron.plan import apply_local, check_exact_cover, make_plan
from genbackends_vllm.published_layout import planned_layout


def vllm_layout(d: ModelDims, tp: int, dtype: torch.dtype = torch.float32):
    """The layout the vLLM plugin publishes for this model at TP ``tp`` (computed without an
    engine), as the adapter's plan target."""
    cfg = {"hidden_size": d.hidden_size, "num_attention_heads": d.num_heads, "num_key_value_heads": d.num_kv_heads,
           "head_dim": d.head_dim, "tie_word_embeddings": d.tied}
    return target_layout(planned_layout(hf_shapes(d), cfg, tp, dtype))


def dims(arch: str, layers: int = 4, heads: int = 8, kv: int = 2, vocab: int = 300) -> ModelDims:
    return ModelDims(arch=arch, hidden_size=32, num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=8,
                     intermediate_size=48, vocab_size=vocab, tied=arch == "qwen2", qkv_bias=arch == "qwen2",
                     qk_norm=arch == "qwen3")


def hf_tensors(d: ModelDims, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in hf_shapes(d).items()}


# ---- independent reference layouts --------------------------------------------------------
def ref_megatron(d: ModelDims, par: MegatronParallel, hf: dict) -> dict:
    """Shards as megatron-core holds them (written from its documented layout, not from the plan)."""
    t = par.tp
    vpad = -(-d.vocab_size // (128 * t)) * 128 * t
    qpg = d.num_heads // d.num_kv_heads
    out = {}

    def pad_vocab(w):
        return torch.cat([w, torch.zeros(vpad - w.shape[0], w.shape[1], dtype=w.dtype)])

    for (p, v), layers in stage_layers(d.num_layers, par).items():
        first, last = p == 0 and v == 0, p == par.pp - 1 and v == (par.vp or 1) - 1
        for r in range(t):
            loc = (p, v, r)
            if first:
                out[(loc, "embedding.word_embeddings.weight")] = pad_vocab(hf["model.embed_tokens.weight"]).chunk(t)[r]
            if last:
                out[(loc, "decoder.final_layernorm.weight")] = hf["model.norm.weight"]
                if not d.tied:
                    out[(loc, "output_layer.weight")] = pad_vocab(hf["lm_head.weight"]).chunk(t)[r]
                elif par.pp > 1:
                    out[(loc, "output_layer.weight")] = pad_vocab(hf["model.embed_tokens.weight"]).chunk(t)[r]
            for li, gl in enumerate(layers):
                h, m = f"model.layers.{gl}.", f"decoder.layers.{li}."
                for suf in ("weight",) + (("bias",) if d.qkv_bias else ()):
                    q = hf[h + f"self_attn.q_proj.{suf}"].reshape(d.num_kv_heads, qpg * d.head_dim, -1)
                    k = hf[h + f"self_attn.k_proj.{suf}"].reshape(d.num_kv_heads, d.head_dim, -1)
                    vv = hf[h + f"self_attn.v_proj.{suf}"].reshape(d.num_kv_heads, d.head_dim, -1)
                    full = torch.cat([q, k, vv], dim=1).reshape(-1, q.shape[-1])
                    out[(loc, m + f"self_attention.linear_qkv.{suf}")] = full.chunk(t)[r].reshape(
                        (-1,) if suf == "bias" else (-1, d.hidden_size))
                out[(loc, m + "self_attention.linear_proj.weight")] = hf[h + "self_attn.o_proj.weight"].chunk(t, 1)[r]
                gate, up = hf[h + "mlp.gate_proj.weight"].chunk(t)[r], hf[h + "mlp.up_proj.weight"].chunk(t)[r]
                out[(loc, m + "mlp.linear_fc1.weight")] = torch.cat([gate, up])
                out[(loc, m + "mlp.linear_fc2.weight")] = hf[h + "mlp.down_proj.weight"].chunk(t, 1)[r]
                out[(loc, m + "input_layernorm.weight")] = hf[h + "input_layernorm.weight"]
                out[(loc, m + "pre_mlp_layernorm.weight")] = hf[h + "post_attention_layernorm.weight"]
                if d.qk_norm:
                    out[(loc, m + "self_attention.q_layernorm.weight")] = hf[h + "self_attn.q_norm.weight"]
                    out[(loc, m + "self_attention.k_layernorm.weight")] = hf[h + "self_attn.k_norm.weight"]
    return out


def ref_vllm(d: ModelDims, t: int, hf: dict) -> dict:
    """Per-rank parameters as vLLM's weight loaders build them (KV heads repeated when t > kv)."""
    vpad = -(-d.vocab_size // 64) * 64
    rep = max(1, t // d.num_kv_heads)
    out = {}
    for r in range(t):
        loc = (r,)
        emb = torch.cat([hf["model.embed_tokens.weight"], torch.zeros(vpad - d.vocab_size, d.hidden_size, dtype=torch.float64)])
        out[(loc, "model.embed_tokens.weight")] = emb.chunk(t)[r]
        if not d.tied:
            lm = torch.cat([hf["lm_head.weight"], torch.zeros(vpad - d.vocab_size, d.hidden_size, dtype=torch.float64)])
            out[(loc, "lm_head.weight")] = lm.chunk(t)[r]
        out[(loc, "model.norm.weight")] = hf["model.norm.weight"]
        for i in range(d.num_layers):
            h = f"model.layers.{i}."
            for suf in ("weight",) + (("bias",) if d.qkv_bias else ()):
                q = hf[h + f"self_attn.q_proj.{suf}"].chunk(t)[r]
                k = hf[h + f"self_attn.k_proj.{suf}"].reshape(d.num_kv_heads, d.head_dim, *q.shape[1:])
                vv = hf[h + f"self_attn.v_proj.{suf}"].reshape(d.num_kv_heads, d.head_dim, *q.shape[1:])
                k = k.repeat_interleave(rep, 0).reshape(-1, *q.shape[1:]).chunk(t)[r]
                vv = vv.repeat_interleave(rep, 0).reshape(-1, *q.shape[1:]).chunk(t)[r]
                out[(loc, h + f"self_attn.qkv_proj.{suf}")] = torch.cat([q, k, vv])
            out[(loc, h + "self_attn.o_proj.weight")] = hf[h + "self_attn.o_proj.weight"].chunk(t, 1)[r]
            out[(loc, h + "mlp.gate_up_proj.weight")] = torch.cat(
                [hf[h + "mlp.gate_proj.weight"].chunk(t)[r], hf[h + "mlp.up_proj.weight"].chunk(t)[r]])
            out[(loc, h + "mlp.down_proj.weight")] = hf[h + "mlp.down_proj.weight"].chunk(t, 1)[r]
            for n in ("input_layernorm.weight", "post_attention_layernorm.weight") + (
                    ("self_attn.q_norm.weight", "self_attn.k_norm.weight") if d.qk_norm else ()):
                out[(loc, h + n)] = hf[h + n]
    return out


def run_plan(src_layout, dst_layout, src_tensors):
    plan = make_plan(src_layout, dst_layout)
    check_exact_cover(plan)
    dst = {k: torch.full(s.shape, float("nan"), dtype=torch.float64) for k, s in dst_layout.items()}
    apply_local(plan, lambda k: src_tensors[k], lambda k: dst[k])
    return plan, dst


COMBOS = [  # (tp, pp, vp, vllm_tp)
    (1, 1, None, 1), (2, 1, None, 1), (1, 2, None, 1), (2, 2, None, 2), (1, 1, None, 2), (2, 1, None, 4),
    (4, 1, None, 1), (4, 1, None, 2), (4, 2, None, 4), (1, 2, 2, 2), (2, 2, 2, 1), (1, 4, None, 8),
]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("tp,pp,vp,vtp", COMBOS)
def test_plan_matches_independent_reference(arch, tp, pp, vp, vtp):
    d = dims(arch)
    par = MegatronParallel(tp=tp, pp=pp, vp=vp)
    hf = hf_tensors(d)
    mshards = ref_megatron(d, par, hf)
    mlayout = megatron_layout(d, par, torch.float64)
    assert set(mlayout) == set(mshards)
    for k, spec in mlayout.items():
        assert tuple(mshards[k].shape) == spec.shape, k

    # Megatron -> vLLM (direct path): exactly vLLM's own sharding, padding zero, nothing left NaN.
    _, got = run_plan(mlayout, vllm_layout(d, vtp, torch.float64), mshards)
    want = ref_vllm(d, vtp, hf)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k

    # Megatron -> HF (universal path, export): the original tensors.
    _, back = run_plan(mlayout, hf_layout(d, torch.float64), mshards)
    for (_, n), t in back.items():
        assert torch.equal(t, hf[n]), n

    # HF -> Megatron (loading): the reference shards, vocab padding zero.
    _, shards = run_plan(hf_layout(d, torch.float64), mlayout, {((), n): t for n, t in hf.items()})
    for k in mshards:
        assert torch.equal(shards[k], mshards[k]), k


def test_kv_replication_rows_and_vocab_padding():
    d = dims("llama", heads=8, kv=2)
    lay = vllm_layout(d, 8)
    segs = lay[((5,), "model.layers.0.self_attn.qkv_proj.weight")].segs
    # rank 5 of 8 with 2 KV heads: Q head 5, KV head 5 // 4 = 1
    assert [(s.hf.rsplit(".", 2)[-2], s.hf_lo, s.length) for s in segs] == [("q_proj", 40, 8), ("k_proj", 8, 8), ("v_proj", 8, 8)]
    plan = make_plan(megatron_layout(d, MegatronParallel(tp=2)), lay)
    fills = [f for f in plan.fills if f.dst[1] == "model.embed_tokens.weight"]
    # vLLM pads 300 -> 320 rows = 8 x 40; rank 7 holds rows 280..319, 20 of them padding
    assert [(f.dst[0], f.lo, f.length) for f in fills] == [((7,), 20, 20)]


def test_tied_embedding_pp2_reads_one_copy():
    d = dims("qwen2")
    plan = make_plan(megatron_layout(d, MegatronParallel(pp=2)), hf_layout(d))
    srcs = {p.src for p in plan.pieces if p.dst[1] == "model.embed_tokens.weight"}
    assert srcs == {((0, 0, 0), "embedding.word_embeddings.weight")}


def test_plan_describe_and_errors():
    d = dims("llama")
    text = make_plan(megatron_layout(d, MegatronParallel(tp=2)), vllm_layout(d, 2)).describe()
    assert "rank1 model.layers.3.self_attn.qkv_proj.weight" in text and "pp0/vp0/tp1 decoder.layers.3" in text
    with pytest.raises(WeightSyncError, match="tensor-parallel size 3"):
        vllm_layout(d, 3)
    with pytest.raises(WeightSyncError, match="not divisible by pp"):
        megatron_layout(d, MegatronParallel(pp=3))
    # a target needing a tensor no source holds
    src = megatron_layout(d, MegatronParallel())
    src = {k: v for k, v in src.items() if "linear_fc2" not in k[1] or "layers.1." not in k[1]}
    with pytest.raises(WeightSyncError, match="model.layers.1.mlp.down_proj.weight"):
        make_plan(src, vllm_layout(d, 1))
    # dtype disagreement
    with pytest.raises(WeightSyncError, match="dtype mismatch"):
        make_plan(megatron_layout(d, MegatronParallel(), torch.bfloat16), vllm_layout(d, 1, torch.float32))


def test_names_prefixes_te_aliases_unknown():
    d = dims("qwen3")
    assert canonical_megatron_name("module.module.decoder.layers.3.self_attention.linear_qkv.layer_norm_weight", d) == \
        "decoder.layers.3.input_layernorm.weight"
    assert canonical_megatron_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", d) == "decoder.layers.0.pre_mlp_layernorm.weight"
    assert canonical_megatron_name("decoder.layers.0.self_attention.linear_qkv._extra_state", d) is None
    with pytest.raises(WeightSyncError, match="decoder.layers.0.mlp.router.weight"):
        canonical_megatron_name("decoder.layers.0.mlp.router.weight", d)


def test_virtual_pipeline_and_uneven_stage_numbering():
    assert stage_layers(8, MegatronParallel(pp=2, vp=2)) == {(0, 0): [0, 1], (0, 1): [4, 5], (1, 0): [2, 3], (1, 1): [6, 7]}
    assert stage_layers(7, MegatronParallel(pp=3, first_stage_layers=1, last_stage_layers=2)) == \
        {(0, 0): [0], (1, 0): [1, 2, 3, 4], (2, 0): [5, 6]}


def test_engine_layout_mismatch_rejected_before_any_write():
    """The vLLM plugin checks the layout it publishes against the engine's own parameter list (a
    pure check; the engine side of it runs for real in test_megatron_sync)."""
    from genbackends.weight_layout import check_live_params

    d = dims("llama")
    cfg = {"hidden_size": d.hidden_size, "num_attention_heads": d.num_heads, "num_key_value_heads": d.num_kv_heads,
           "head_dim": d.head_dim, "tie_word_embeddings": d.tied}
    published = planned_layout(hf_shapes(d), cfg, 2)
    engine = {r: {n: (p.shape, p.dtype) for n, p in published.rank(r).items()} for r in range(2)}
    check_live_params(published, engine)  # identical: fine
    engine[1]["model.layers.0.mlp.experts.w13_weight"] = ((4, 8), torch.float32)
    with pytest.raises(WeightSyncError, match="experts.w13_weight"):
        check_live_params(published, engine)
    del engine[1]["model.layers.0.mlp.experts.w13_weight"]
    engine[0]["model.layers.2.self_attn.o_proj.weight"] = ((32, 33), torch.float32)
    with pytest.raises(WeightSyncError, match=r"o_proj.weight is \(32, 33\)"):
        check_live_params(published, engine)


def test_published_layout_describes_fused_pieces_and_padding():
    """What the vLLM plugin publishes per parameter: HF sources, fused pieces, padding."""
    d = dims("llama", heads=8, kv=2)
    cfg = {"hidden_size": d.hidden_size, "num_attention_heads": d.num_heads, "num_key_value_heads": d.num_kv_heads,
           "head_dim": d.head_dim, "tie_word_embeddings": d.tied}
    lay = planned_layout(hf_shapes(d), cfg, 2)
    qkv = lay.rank(1)["model.layers.0.self_attn.qkv_proj.weight"]
    assert qkv.sources == ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                           "model.layers.0.self_attn.v_proj.weight")
    assert [(h.rsplit(".", 2)[-2], off, n) for h, off, n in qkv.fused_pieces] == [("q_proj", 0, 32), ("k_proj", 32, 8), ("v_proj", 40, 8)]
    emb = lay.rank(1)["model.embed_tokens.weight"]
    assert emb.shape == (160, 32) and emb.padding == ((140, 20),)  # 300 -> 320 rows, rank 1 holds 160..319
