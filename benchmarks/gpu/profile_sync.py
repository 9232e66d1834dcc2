"""Where the time of a weight sync and of generation goes (GPU profiling run for issue 10).

    python benchmarks/gpu/profile_sync.py --out DIR [--size 8b] [--tiny]

One in-process vLLM engine (dummy weights) and one Megatron GPTModel of the same shape. Measures,
each against the device copy floor of the same run:

* HF-named tensors already on the device: raw ``model.load_weights`` in one call; the backend's
  ``sync_weights`` with its default bucket and with one bucket; the per-call overhead of
  ``run_on_workers`` and of ``named_parameters()``;
* the Megatron direct and universal paths, each with a torch.profiler table of one sync;
* generation through the backend against raw ``LLM.generate`` on the same engine, with a cProfile
  of our path (what Python work we add around the engine).

Writes ``DIR/profile_sync.json`` and the profiler tables as ``DIR/prof_*.txt``.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        out.append(time.perf_counter() - t)
    return out


def prof_table(fn, path: Path) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    _sync()
    with profile(activities=acts) as p:
        fn()
        _sync()
    ka = p.key_averages()
    txt = ka.table(sort_by="self_cpu_time_total", row_limit=30)
    if torch.cuda.is_available():
        txt += "\n\n" + ka.table(sort_by="self_cuda_time_total", row_limit=20)
    path.write_text(txt)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", default="8b")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    import megatron_sync_gpu as ms

    pair = ms.OneProcessPair(args.size, args.tiny, "29791", "gbprof_")
    dev, name, shape = pair.dev, pair.name, pair.shape
    src, backend, floor = pair.src, pair.backend, pair.floor
    res: dict = {"size": name, "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
                 "engine_init_s": pair.engine_init_s, "bytes": pair.nbytes, "copy_bw": pair.copy_bw,
                 "floor_ms": floor * 1e3}

    def save():
        (out / "profile_sync.json").write_text(json.dumps(res, indent=1, default=str))

    save()
    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731

    # ---- HF tensors on the device ---------------------------------------------------------
    weights = {}
    for bucket in src.iter_buckets(None):
        for n, t in bucket:
            weights[n] = t.clone()
    pairs = list(weights.items())

    def lw_all():
        backend.run_on_workers(ms._load_weights_on_worker, pairs)

    hf: dict = {}
    if dev.type == "cuda":
        lw_all()
        hf["raw_load_weights_one_call_ms"] = med(timed(lw_all, args.reps))
        prof_table(lw_all, out / "prof_raw_load_weights.txt")
    hf["noop_run_on_workers_ms"] = med(timed(lambda: backend.run_on_workers(lambda m, r: 0), 20))
    hf["named_parameters_dict_ms"] = med(timed(lambda: backend.run_on_workers(lambda m, r: len(dict(m.named_parameters()))), 20))
    for label, bb in (("default_bucket", None), ("one_bucket", 0)):
        if bb is not None:
            backend.options.bucket_bytes = bb
        reps = []
        backend.sync_weights(weights)
        for _ in range(args.reps):
            _sync()
            t = time.perf_counter()
            rep = backend.sync_weights(weights)
            _sync()
            reps.append((time.perf_counter() - t, rep.phases))
        hf[f"sync_{label}_ms"] = med([r[0] for r in reps])
        hf[f"sync_{label}_phases_last"] = reps[-1][1]
    backend.options.bucket_bytes = 256 << 20
    prof_table(lambda: backend.sync_weights(weights), out / "prof_sync_hf.txt")
    res["hf_tensors"] = hf
    save()

    # ---- Megatron direct / universal -------------------------------------------------------
    for path in ("direct", "universal"):
        try:
            src.sync(backend, path=path)
            ts, phases = [], None
            for _ in range(args.reps):
                _sync()
                t = time.perf_counter()
                rep = src.sync(backend, path=path)
                _sync()
                ts.append(time.perf_counter() - t)
                phases = rep.phases
            res[path] = {"ms": med(ts), "x_floor": statistics.median(ts) / floor, "phases_last": phases}
            prof_table(lambda: src.sync(backend, path=path), out / f"prof_{path}.txt")
            pr = cProfile.Profile()
            pr.enable()
            src.sync(backend, path=path)
            _sync()
            pr.disable()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(35)
            res[path]["cprofile"] = s.getvalue()[-6000:]
        except Exception as e:  # keep measuring the rest
            import traceback

            res[path] = {"error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()[-3000:]}
        save()
    del weights, pairs
    # ---- generation -------------------------------------------------------------------------
    try:
        from genbackends_vllm.sampling import sampling_params

        backend.sync_weights(src)
        n_p, p_len, g_len = (16, 16, 16) if args.tiny else (256, 128, 128)
        gen = torch.Generator().manual_seed(0)
        workload = torch.randint(5, shape["vocab_size"], (n_p, p_len), generator=gen).tolist()
        backend.config.sampling = backend.config.sampling.model_copy(
            update={"temperature": 1.0, "ignore_eos": True, "max_new_tokens": g_len, "seed": None})
        llm = backend.replicas[0].llm
        params = sampling_params(backend.config, [len(p) for p in workload], eval_mode=False)

        def ours():
            backend.decode_internal(backend.forward_step(workload))

        def raw():
            llm.generate([{"prompt_token_ids": p} for p in workload], params, use_tqdm=False)

        raw(); ours()
        o, r = [], []
        for i in range(3):
            for fn in ((ours, raw) if i % 2 == 0 else (raw, ours)):
                (o if fn is ours else r).append(timed(fn, 1)[0])
        res["generation"] = {"ours_s": o, "raw_s": r, "ours_over_raw": min(r) / min(o),
                             "tokens": n_p * g_len, "params_type": type(params).__name__}
        pr = cProfile.Profile()
        pr.enable()
        ours()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(40)
        (out / "prof_generation.txt").write_text(s.getvalue())
    except Exception as e:
        import traceback

        res["generation"] = {"error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()[-3000:]}
    save()
    print(json.dumps({k: v for k, v in res.items() if k not in ("direct", "universal")}, indent=1, default=str)[:5000])
    for p in ("direct", "universal"):
        print(p, {k: v for k, v in res.get(p, {}).items() if k != "cprofile"})
    backend.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
