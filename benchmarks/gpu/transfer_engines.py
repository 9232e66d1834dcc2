"""Separate-process weight sync: vLLM's own weight-transfer engine against our own group, side by side.

    python benchmarks/gpu/transfer_engines.py --out DIR [--hidden 512 --layers 4] [--reps 3]

One vLLM engine whose worker lives in another process (``in_process=False``, TP 1), built with
``weight_transfer_config`` and the worker extension that registers our CPU engine. The same
HF-named tensors (a second model of the same shape) are synced by both transports, alternating,
``--reps`` times each:

* ``ours/group``: our own gloo group (:mod:`genbackends_vllm.transport`): each bucket broadcast,
  then ``reload_weights`` on the worker (what ``sync_weights`` does today for worker processes);
* ``vllm/transfer_engine``: vLLM's API ``start_weight_update`` -> ``update_weights`` per bucket ->
  ``finish_weight_update`` (its layerwise reload); the wire is vLLM's ``ipc`` engine on CUDA when
  the engine's worker shares the trainer's GPU (CUDA IPC handles: the worker reads the trainer's
  tensors in place), its ``nccl`` engine when it has a GPU of its own, and
  :class:`genbackends_vllm.weight_transfer.GlooWeightTransferEngine` (registered in vLLM's factory)
  on the CPU, where vLLM's engines need CUDA.

On one GPU our group is gloo through host memory (NCCL refuses two ranks on one device): the
comparison is then what the colocated, separate-process case costs each way.

Before each timed sync the engine is put back on the base weights (untimed), so every sync
changes them; after each, the engine's prompt logprobs are compared with transformers' forward on
the synced weights (fp32 on the CPU, bf16 on GPUs). The one-time rendezvous of each transport is
reported apart. Writes ``DIR/transfer_engines.json`` and ``DIR/transfer_engines.md``.
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

PROBES = [[5, 17, 42, 99, 200, 7, 8, 250, 33, 61], [280, 12, 140, 9, 77, 299, 150, 3, 4, 5]]


def _pairs(folder: Path, dtype) -> list:
    from safetensors.torch import load_file

    out = []
    for f in sorted(folder.glob("*.safetensors")):
        out += [(n, t.to(dtype)) for n, t in load_file(str(f)).items()]
    return out


def _hf_logprobs(folder: Path, dtype, device: str) -> list[list[float]]:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device)
    out = []
    with torch.no_grad():
        for p in PROBES:
            ids = torch.tensor([p], device=device)
            lp = torch.log_softmax(m(ids).logits.float(), -1)[0]
            out.append([float(lp[i, p[i + 1]]) for i in range(len(p) - 1)])
    del m
    return out


def _engine_logprobs(engine) -> list[list[float]]:
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = engine.generate(PROBES, [sp] * len(PROBES))
    res = []
    for o, p in zip(outs, PROBES):
        res.append([float(d[t].logprob) for d, t in zip(o.prompt_logprobs[1:], p[1:])])
    return res


def _maxdiff(a, b) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bucket-mb", type=int, default=256)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--engine-gpu", choices=["auto", "same", "other"], default="auto",
                    help="CUDA: the engine's worker on the trainer's GPU (vLLM's ipc engine) or on a second "
                         "GPU (its nccl engine); auto: other when there are 2 GPUs")
    args = ap.parse_args(argv)

    import torch

    from genbackends.tiny import TinyShape, build_tiny_model
    from genbackends.weights import bucketize
    from genbackends_vllm import compat, weight_transfer
    from genbackends_vllm.engine import LocalEngine

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    same_gpu = device == "cuda" and (args.engine_gpu == "same" or torch.cuda.device_count() < 2)
    if device == "cuda":
        torch.cuda.set_device(0)
        torch.zeros(1, device="cuda")
        if not same_gpu:
            # NCCL refuses two ranks on one GPU: this process (the sender) keeps GPU 0, the engine's
            # worker processes see only the second GPU (CUDA here is initialised before the change).
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(str(i) for i in range(torch.cuda.device_count())))
            os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[1]
        # the engine's worker is a child process started after CUDA is initialised here
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tmp = Path(tempfile.mkdtemp(prefix="transfer_engines_"))
    heads = max(4, args.hidden // 64)
    shape = TinyShape(hidden_size=args.hidden, num_layers=args.layers, num_heads=heads, num_kv_heads=max(1, heads // 4),
                      head_dim=64, intermediate_size=4 * args.hidden, vocab_size=args.vocab)
    base = build_tiny_model(tmp / "base", "llama", seed=0, shape=shape)
    alt = build_tiny_model(tmp / "alt", "llama", seed=1, shape=shape)
    # the trainer's tensors live where the trainer computes (GPU 0 on CUDA)
    base_pairs = [(n, t.to(device)) for n, t in _pairs(Path(base), dtype)]
    alt_pairs = [(n, t.to(device)) for n, t in _pairs(Path(alt), dtype)]
    nbytes = sum(t.numel() * t.element_size() for _, t in alt_pairs)
    ref = _hf_logprobs(Path(alt), dtype, device)
    tol = 1e-3 if dtype == torch.float32 else 0.5

    kw = dict(model=str(base), dtype=str(dtype).replace("torch.", ""), enforce_eager=True, max_model_len=128,
              tensor_parallel_size=1, distributed_executor_backend="mp",
              worker_extension_cls="genbackends_vllm.weight_transfer.TransferWorkerExtension",
              weight_transfer_config={"backend": weight_transfer.backend_for(device, same_gpu)})
    kw.update(compat.kv_cache_args(0.3, 64 << 20 if device == "cpu" else None))
    engine = LocalEngine(kw, in_process=False).start()
    result: dict = {"machine": platform.node(), "device": device, "transfer_engine": weight_transfer.backend_for(device, same_gpu),
                    "card": torch.cuda.get_device_name(0) if device == "cuda" else None, "vllm": compat.vllm_version(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
                                                      "dtype": str(dtype), "bytes": nbytes, "tensors": len(alt_pairs)},
                    "bucket_bytes": args.bucket_mb << 20, "reps": args.reps, "runs": {},
                    "load_average_at_start": os.getloadavg()}
    buckets = lambda pairs: list(bucketize(iter(pairs), args.bucket_mb << 20))  # noqa: E731

    def ours(pairs):
        for b in buckets(pairs):
            engine.load_bucket(b, "group")

    t0 = time.perf_counter()
    ours(base_pairs)  # the first use opens our group
    setup = {"ours/group": time.perf_counter() - t0}
    t0 = time.perf_counter()
    sender = weight_transfer.make_sender(engine.llm, 1, device, same_gpu)
    sender.send(buckets(base_pairs))
    setup["vllm/transfer_engine"] = time.perf_counter() - t0
    methods = {"ours/group": ours, "vllm/transfer_engine": lambda pairs: sender.send(buckets(pairs))}
    for name in methods:
        result["runs"][name] = {"seconds": [], "max_abs_diff": [], "setup_s_incl_first_sync": setup[name]}
    for _ in range(args.reps):
        for name, fn in methods.items():
            ours(base_pairs)  # back to the base weights (untimed): every timed sync changes them
            before = _maxdiff(_engine_logprobs(engine), ref)
            t0 = time.perf_counter()
            fn(alt_pairs)
            if device == "cuda":
                torch.cuda.synchronize()
            result["runs"][name]["seconds"].append(time.perf_counter() - t0)
            engine.reset_prefix_cache()
            diff = _maxdiff(_engine_logprobs(engine), ref)
            result["runs"][name]["max_abs_diff"].append(diff)
            result["runs"][name]["before_max_abs_diff"] = before
            assert before > 0.05 and diff < tol, (name, before, diff)
    sender.close()
    engine.shutdown()
    for r in result["runs"].values():
        r["median_s"] = statistics.median(r["seconds"])
        r["GB_per_s"] = nbytes / r["median_s"] / 1e9
    a, b = result["runs"]["ours/group"]["median_s"], result["runs"]["vllm/transfer_engine"]["median_s"]
    result["vllm_over_ours"] = b / a
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "transfer_engines.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Separate-process weight sync: vLLM weight-transfer engine ({result['transfer_engine']}) vs our group ({device}"
             + (f", {result['card']}" if result["card"] else "") + ")", "",
             f"Machine `{result['machine']}` ({result['cpus']} CPUs), vLLM {result['vllm']}, torch {result['torch']}; "
             f"Llama-shaped model hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {result['model']['dtype']}, "
             f"{nbytes / 2**20:.1f} MiB in {len(alt_pairs)} tensors; engine TP 1 with its worker in another process; "
             f"buckets of {args.bucket_mb} MiB; median of {args.reps} alternating runs; load average at start "
             f"{result['load_average_at_start'][0]:.1f} (a shared machine: compare the rows, not the absolute times).", "",
             "| transport | median s | GB/s | max abs logprob diff vs transformers | setup s (rendezvous + first sync) |",
             "|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        lines.append(f"| {name} | {r['median_s']:.3f} | {r['GB_per_s']:.2f} | {max(r['max_abs_diff']):.2e} | {r['setup_s_incl_first_sync']:.2f} |")
    lines += ["", f"vLLM's transfer engine / our group: {result['vllm_over_ours']:.2f}x", ""]
    (out / "transfer_engines.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
