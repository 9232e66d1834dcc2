"""Asynchronous rollouts on one GPU (also runs on the CPU with ``--tiny`` as a smoke test).

    python benchmarks/gpu/async_gpu.py --out DIR [--size 8b|1b] [--tiny]

Writes ``DIR/async_gpu.json`` after every section and ``DIR/async_gpu.md`` at the end:

* ``engine``: the vLLM backend's asynchronous engine (``AsyncLLM``, dummy weights for 1b/8b);
* ``long_tail``: a long-tailed workload (most responses ``--median-len`` tokens, ``--tail-frac``
  of them ``--tail-mult`` x longer; ``ignore_eos``). *Synchronous*: the batch is consumed when its
  last response ends (what ``generate()`` gives). *Asynchronous*: records are consumed as they
  finish. Reported: time until ``--consume`` records are consumed, both ways, and the ratio;
* ``ours_vs_raw``: the same workload through our ``submit``/``stream`` and through raw
  ``AsyncLLM.generate`` tasks on the same engine (alternating, best of ``--repeats``):
  makespan and output tokens/s, ratio ours/raw (aim >= 0.97);
* ``pause_sync_resume``: with the workload in flight, ``pause("keep")``, ``sync_weights`` (new
  weights as tensors on ``--sync-device``, the default transport = ``sync_ms``: vLLM's ipc engine
  on a GPU, our gloo group on the CPU; ``--sync-group`` / ``--sync-bytes`` also time our group /
  the raw-byte RPC path), then
  ``resume()``: each step timed, all records accounted for afterwards, and how many records
  span two weight versions.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_backend_gpu import SHAPES, random_weights, write_llama_config  # noqa: E402


class Results:
    """JSON rewritten after each section; markdown summary at the end."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.data: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def section(self, name: str, fn: Any) -> Any:
        print(f"== {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            val = fn()
            self.data[name] = val
            return val
        except Exception as e:
            self.data[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            print(traceback.format_exc(), file=sys.stderr)
            return None
        finally:
            if isinstance(self.data.get(name), dict):
                self.data[name]["section_seconds"] = time.perf_counter() - t0
            (self.out / "async_gpu.json").write_text(json.dumps(self.data, indent=1, default=str))

    def markdown(self) -> None:
        d = self.data
        lines = ["# Asynchronous rollouts", "", f"engine: {json.dumps({k: v for k, v in d.get('engine', {}).items() if k != 'shape'})}", ""]
        lt = d.get("long_tail", {})
        if "sync_seconds" in lt:
            lines += ["| row | time until N consumed (s) |", "|---|---|",
                      f"| synchronous (batch barrier) | {lt['sync_seconds']:.3f} |",
                      f"| asynchronous (as they finish) | {lt['async_seconds']:.3f} |",
                      f"| ratio sync/async | {lt['speedup']:.2f} |", ""]
        ovr = d.get("ours_vs_raw", {})
        if "ratio" in ovr:
            lines += [f"ours vs raw AsyncLLM: ours {ovr['ours_tokens_per_s']:.0f} tok/s, raw {ovr['raw_tokens_per_s']:.0f} tok/s, "
                      f"ratio {ovr['ratio']:.3f}", ""]
        psr = d.get("pause_sync_resume", {})
        if "pause_ms" in psr:
            lines += [f"pause(keep) {psr['pause_ms']:.1f} ms, sync {psr['sync_ms']:.1f} ms ({psr['sync_transport']}), "
                      f"resume {psr['resume_ms']:.1f} ms, total {psr['total_ms']:.1f} ms (pause + tensor sync + resume); "
                      f"tensor sync {psr.get('sync_tensors_ms', float('nan')):.1f} ms ({psr.get('sync_tensors_transport')}); "
                      f"records accounted: {psr['accounted']}, spanning two versions: {psr.get('spanning_records')}"
                      + "".join(f"; {k} {psr[k]:.1f}" for k in ("sync_group_ms", "sync_bytes_ms") if k in psr), ""]
        for k, v in d.items():
            if isinstance(v, dict) and "error" in v:
                lines.append(f"- {k}: ERROR {v['error']}")
        (self.out / "async_gpu.md").write_text("\n".join(lines) + "\n")


def long_tail_lengths(n: int, median: int, tail_frac: float, mult: int, seed: int = 0) -> list[int]:
    """``n`` response lengths: most near ``median`` (+-25 %), ``tail_frac`` of them ``mult`` x."""
    import random

    rng = random.Random(seed)
    n_tail = max(1, round(n * tail_frac))
    lens = [max(1, int(median * rng.uniform(0.75, 1.25))) for _ in range(n - n_tail)] + [median * mult] * n_tail
    rng.shuffle(lens)
    return lens


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke test)")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--median-len", type=int, default=128)
    ap.add_argument("--tail-frac", type=float, default=0.04)
    ap.add_argument("--tail-mult", type=int, default=10)
    ap.add_argument("--consume", type=int, default=None, help="records to consume (default: all but the tail)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gpu-mem", type=float, default=0.6)
    ap.add_argument("--sections", default="long_tail,ours_vs_raw,pause_sync_resume",
                    help="comma-separated sections to run after the engine starts")
    ap.add_argument("--sync-bytes", action="store_true", help="also time the raw-byte RPC weight path (slow at 8B)")
    ap.add_argument("--sync-group", action="store_true", help="also time our gloo group (sync_transport: group) in the same pause")
    ap.add_argument("--sync-device", choices=("cpu", "cuda"), default="cpu", help="where the synced tensors live")
    args = ap.parse_args(argv)
    if args.tiny:
        args.num_prompts, args.prompt_len, args.median_len = min(args.num_prompts, 24), min(args.prompt_len, 16), min(args.median_len, 8)
        args.repeats = 1
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")

    import torch

    from genbackends.config import GenConfig
    from genbackends.registry import get_registry
    from genbackends_vllm import compat
    from genbackends_vllm.hf_layout import expected_hf_weights

    res = Results(Path(args.out))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="async_gpu_"))
    if args.tiny:
        from genbackends.tiny import build_tiny_model

        model_dir = build_tiny_model(work / "tiny")
        dtype_name, tdtype = ("bfloat16", torch.bfloat16) if device == "cuda" else ("float32", torch.float32)
    else:
        model_dir = write_llama_config(work / f"llama_{args.size}", args.size)
        dtype_name, tdtype = "bfloat16", torch.bfloat16
    lens = long_tail_lengths(args.num_prompts, args.median_len, args.tail_frac, args.tail_mult)
    n_tail = sum(1 for n in lens if n == args.median_len * args.tail_mult)
    consume = args.consume or (args.num_prompts - n_tail)
    seq_length = args.prompt_len + max(lens) + 8
    vllm_opts: dict[str, Any] = {"enforce_eager": device != "cuda", "max_model_len": seq_length}
    cache: dict[str, Any] = {"gpu_memory_utilization": args.gpu_mem}
    if device == "cpu":
        cache["kv_cache_memory_bytes"] = 64 << 20
    if not args.tiny:
        vllm_opts.update(load_format="dummy", skip_tokenizer_init=True)
    cfg = GenConfig.model_validate(dict(
        backend="vllm", model=str(model_dir), seq_length=seq_length, dtype=dtype_name, cache=cache,
        sampling={"temperature": 1.0, "seed": 0, "ignore_eos": True, "max_new_tokens": args.median_len},
        options={"vllm": vllm_opts}))
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, vocab, (args.num_prompts, args.prompt_len), generator=g).tolist()
    requests = [{"prompt_token_ids": p, "sampling": {"max_new_tokens": n}} for p, n in zip(prompts, lens)]
    state: dict[str, Any] = {}

    def engine() -> dict[str, Any]:
        t0 = time.perf_counter()
        b = get_registry().create_backend(cfg)
        b.start_async()  # AsyncLLM is the only engine
        state["b"] = b
        return {"device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
                "vllm_version": compat.vllm_version(), "model": "tiny" if args.tiny else args.size, "dtype": dtype_name,
                "engine_start_seconds": time.perf_counter() - t0, "num_prompts": args.num_prompts,
                "lengths": {"median": args.median_len, "tail": args.median_len * args.tail_mult, "n_tail": n_tail},
                "consume": consume, "shape": json.loads((model_dir / "config.json").read_text())}

    res.section("engine", engine)
    b = state.get("b")
    if b is None:
        res.markdown()
        return 1
    eng = b.start_async()

    async def run_ours() -> tuple[list[float], int]:
        t0 = time.perf_counter()
        b.submit(requests)
        stamps, toks = [], 0
        async for r in b.stream(timeout=3600):
            stamps.append(time.perf_counter() - t0)
            toks += len(r.token_ids)
        return stamps, toks

    def long_tail() -> dict[str, Any]:
        asyncio.run(run_ours())  # warm-up
        stamps, toks = asyncio.run(run_ours())
        sync_s = stamps[-1]  # a synchronous batch hands its records over when the last one ends
        async_s = stamps[consume - 1]
        return {"sync_seconds": sync_s, "async_seconds": async_s, "speedup": sync_s / async_s,
                "output_tokens": toks, "consumed": consume}

    if "long_tail" in args.sections:
        res.section("long_tail", long_tail)

    async def raw_once() -> tuple[float, int]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        async def one(i: int, p: list[int], n: int) -> int:
            sp = SamplingParams(max_tokens=n, temperature=1.0, ignore_eos=True, logprobs=0, seed=0,
                                output_kind=RequestOutputKind.DELTA)
            got = 0
            async for out in eng.llm.generate({"prompt_token_ids": p}, sp, f"raw-{time.time_ns()}-{i}"):
                got += len(out.outputs[0].token_ids)
            return got

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(zip(prompts, lens))))
        return time.perf_counter() - t0, sum(counts)

    def ours_vs_raw() -> dict[str, Any]:
        ours, raw = [], []
        for _ in range(args.repeats):
            st, toks = asyncio.run(run_ours())
            ours.append((st[-1], toks))
            raw.append(eng._call(raw_once()))  # raw AsyncLLM lives on the engine's own loop
        o, r = min(ours), min(raw)
        return {"ours_seconds": o[0], "raw_seconds": r[0], "ours_tokens_per_s": o[1] / o[0],
                "raw_tokens_per_s": r[1] / r[0], "ratio": (o[1] / o[0]) / (r[1] / r[0]), "repeats": args.repeats}

    if "ours_vs_raw" in args.sections:
        res.section("ours_vs_raw", ours_vs_raw)

    def pause_sync_resume() -> dict[str, Any]:
        # tensors, not a folder: vLLM 0.24 refuses to reload an engine started with dummy weights
        # from a folder ("Model reloading with `dummy` format")
        expected = expected_hf_weights(str(model_dir))
        weights = random_weights(expected, tdtype, args.sync_device, seed=1)
        out: dict[str, Any] = {}

        async def go() -> None:
            ids = b.submit(requests)
            await asyncio.sleep(0.5 if args.tiny else 2.0)
            t0 = time.perf_counter()
            await b.pause("keep")
            t1 = time.perf_counter()
            # the new weights as tensors: the default transport (sync_transport: auto: vLLM's ipc
            # engine on a GPU, else our gloo group into the engine process); --sync-group and
            # --sync-bytes also time our group and the raw-byte RPC transport in the same pause
            rep = b.sync_weights(weights)
            t2 = time.perf_counter()
            out["sync_tensors_ms"], out["sync_tensors_transport"] = rep.seconds * 1e3, rep.transport
            for flag, transport, key in ((args.sync_group, "group", "sync_group_ms"), (args.sync_bytes, "rpc", "sync_bytes_ms")):
                if flag:
                    b.options.sync_transport = transport
                    try:
                        out[key] = b.sync_weights(weights).seconds * 1e3
                    finally:
                        b.options.sync_transport = "auto"
            t3 = time.perf_counter()
            await b.resume()
            t4 = time.perf_counter()
            recs = [r async for r in b.stream(timeout=3600)]
            spanning = sum(1 for r in recs if r.weight_versions and len(r.weight_versions) > 1)
            out.update(pause_ms=(t1 - t0) * 1e3, sync_ms=(t2 - t1) * 1e3, resume_ms=(t4 - t3) * 1e3,
                       total_ms=((t1 - t0) + (t2 - t1) + (t4 - t3)) * 1e3, sync_transport=rep.transport,
                       sync_phases=rep.phases, spanning_records=spanning,
                       accounted=sorted(r.request_id for r in recs) == sorted(ids))

        asyncio.run(go())
        return out

    if "pause_sync_resume" in args.sections:
        res.section("pause_sync_resume", pause_sync_resume)
    b.shutdown()
    res.markdown()
    print((Path(args.out) / "async_gpu.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
