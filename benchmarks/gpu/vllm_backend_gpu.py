"""GPU benchmark of the vLLM backend (also runs on the CPU with ``--tiny`` for debugging).

    python benchmarks/gpu/vllm_backend_gpu.py --out DIR [--size 1b|8b] [--tiny]

Writes ``DIR/vllm_backend_gpu.json`` after every section (a crash keeps what was measured):

* ``engine``: device, vLLM version, model shape, engine start time;
* ``throughput``: our backend (``forward_step`` + ``decode_internal``) against raw
  ``vllm.LLM.generate`` on the *same engine* and the same workload (token-id prompts,
  ``ignore_eos``), alternating order, best of ``--repeats``; ratio = ours / raw;
* ``weight_paths``: each sync path timed (in-process ``load_weights``, in-process
  ``reload_weights``, safetensors folder, and with ``--mp-paths`` worker processes over our own
  group and through RPC bytes);
* ``atomic_sync``: the atomic sync (snapshot + manifest/finite checks, the default) against the
  plain sync (``sync_atomic``/``check_finite`` off) of the same tensors: ``atomic_sync_ms`` (a dict:
  checked whole, no snapshot), ``atomic_lazy_sync_ms`` (a bucket-by-bucket source: snapshot),
  ``plain_sync_ms``, ``finite_check_ms``, ``snapshot_bytes``, a rolled-back sync and the KV scrub;
* ``sleep``: level-1 sleep/wake (time, freed bytes, logprobs identical after waking) and the
  level-2 RL cycle ``sleep(2) -> wake_up(["weights"]) -> sync_weights -> wake_up(["kv_cache"])``
  with per-step times and prompt-logprob agreement with the state before sleeping;
* ``parity``: prompt logprobs and greedy tokens of the engine against HF transformers on the
  same weights (bf16 on GPUs; fp32 with ``--tiny``).

Models: ``--size 1b``/``8b`` writes a Llama-shaped ``config.json`` (no weights on disk: vLLM's
``load_format: dummy``), then syncs known random weights so transformers can be given the same
ones. ``--tiny`` builds the tiny test model. Each section records its error instead of stopping.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

SHAPES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=5632, vocab_size=32000),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256),
}


def write_llama_config(folder: Path, size: str) -> Path:
    """A Llama ``config.json`` of the given shape (dummy weights: no safetensors needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "hidden_act": "silu",
        **SHAPES[size],
    }
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return folder


class Results:
    """The JSON result file, rewritten after each section."""

    def __init__(self, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "vllm_backend_gpu.json"
        self.data: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def section(self, name: str, fn: Any, *args: Any) -> Any:
        print(f"== {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            val = fn(*args)
            self.data[name] = val if isinstance(val, dict) else {"value": val}
            return val
        except Exception as e:
            self.data[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            print(traceback.format_exc(), file=sys.stderr)
            return None
        finally:
            if isinstance(self.data.get(name), dict):
                self.data[name]["section_seconds"] = time.perf_counter() - t0
            self.save()

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, default=str))


def random_weights(expected: dict[str, tuple[int, ...]], dtype: Any, device: str, seed: int) -> dict[str, Any]:
    """Known random HF-named weights (norms near 1) so transformers can get the same ones."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for name, shape in expected.items():
        if "norm" in name:
            t = 1.0 + 0.05 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) * (1.0 / max(1, shape[-1]) ** 0.5)
        out[name] = t.to(dtype=dtype, device=device)
    return out


def sync_clock(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--tiny", action="store_true", help="tiny model (CPU debugging)")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpu-mem", type=float, default=None,
                    help="gpu_memory_utilization (default 0.6 at 1b, 0.35 at 8b: the script also holds the "
                         "random weights on the GPU and later builds the HF model for parity)")
    ap.add_argument("--mp-paths", action="store_true", help="also time syncs into worker processes (starts a 2nd engine)")
    ap.add_argument("--no-parity", action="store_true")
    args = ap.parse_args(argv)
    if args.gpu_mem is None:
        args.gpu_mem = 0.35 if args.size == "8b" and not args.tiny else 0.6
    if args.tiny:
        args.num_prompts, args.prompt_len, args.gen_len = min(args.num_prompts, 16), min(args.prompt_len, 16), min(args.gen_len, 16)
        args.repeats = min(args.repeats, 2)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")

    import torch

    from genbackends.config import GenConfig
    from genbackends.registry import get_registry
    from genbackends_vllm import compat
    from genbackends_vllm.hf_layout import expected_hf_weights
    from genbackends_vllm.sampling import sampling_params

    res = Results(Path(args.out))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="vllm_gpu_bench_"))
    if args.tiny:
        from genbackends.tiny import build_tiny_model

        model_dir = build_tiny_model(work / "tiny")
        dtype_name, tdtype = ("bfloat16", torch.bfloat16) if device == "cuda" else ("float32", torch.float32)
    else:
        model_dir = write_llama_config(work / f"llama_{args.size}", args.size)
        dtype_name, tdtype = "bfloat16", torch.bfloat16
    seq_length = args.prompt_len + args.gen_len + 8
    vllm_opts: dict[str, Any] = {"enforce_eager": device != "cuda", "max_model_len": max(seq_length, 256)}
    cache: dict[str, Any] = {"gpu_memory_utilization": args.gpu_mem}
    if device == "cpu":
        cache["kv_cache_memory_bytes"] = 64 << 20
    if not args.tiny:
        vllm_opts.update(load_format="dummy", skip_tokenizer_init=True)

    def make_config(**over: Any) -> GenConfig:
        vo = {**vllm_opts, **over.pop("vllm", {})}
        return GenConfig.model_validate(dict(
            backend="vllm", model=str(model_dir), seq_length=seq_length, dtype=dtype_name, cache=cache,
            sampling={"temperature": 1.0, "seed": 0, "ignore_eos": True, "max_new_tokens": args.gen_len},
            options={"vllm": vo}, **over))

    state: dict[str, Any] = {}

    def engine() -> dict[str, Any]:
        t0 = time.perf_counter()
        b = get_registry().create_backend(make_config())
        b.setup()
        state["backend"] = b
        return {
            "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
            "vllm_version": compat.vllm_version(), "torch": torch.__version__, "model": "tiny" if args.tiny else args.size,
            "shape": json.loads((model_dir / "config.json").read_text()), "dtype": dtype_name,
            "engine_start_seconds": time.perf_counter() - t0,
        }

    res.section("engine", engine)
    b = state.get("backend")
    if b is None:
        return 1
    expected = expected_hf_weights(str(model_dir))
    weights = random_weights(expected, tdtype, device, seed=1)
    # At 8B a second 16 GB set does not fit beside the engine on an 80 GB card: alternate with
    # the same set there (the timed copies are the same size either way).
    weights_b = weights if args.size == "8b" and not args.tiny else random_weights(expected, tdtype, device, seed=2)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)
    workload = torch.randint(5, vocab, (args.num_prompts, args.prompt_len), generator=g).tolist()
    probes = workload[:4]

    def throughput() -> dict[str, Any]:
        b.sync_weights(weights)  # real (non-dummy) weights, same as every later section
        llm = b.replicas[0].llm
        params = sampling_params(b.config, [len(p) for p in workload], eval_mode=False)
        ours, raw = [], []

        def run_ours() -> float:
            t0 = time.perf_counter()
            recs = b.decode_internal(b.forward_step(workload))
            dt = time.perf_counter() - t0
            assert sum(len(r.token_ids) for r in recs) == args.num_prompts * args.gen_len
            return dt

        def run_raw() -> float:
            t0 = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": p} for p in workload], params, use_tqdm=False)
            dt = time.perf_counter() - t0
            assert sum(len(o.outputs[0].token_ids) for o in outs) == args.num_prompts * args.gen_len
            return dt

        run_raw()  # warm-up (both paths: first calls pay one-off costs)
        run_ours()
        for i in range(args.repeats):
            order = (run_ours, run_raw) if i % 2 == 0 else (run_raw, run_ours)
            for fn in order:
                (ours if fn is run_ours else raw).append(fn())
        toks = args.num_prompts * args.gen_len
        return {
            "workload": {"prompts": args.num_prompts, "prompt_len": args.prompt_len, "gen_len": args.gen_len},
            "ours_seconds": ours, "raw_seconds": raw,
            "ours_tokens_per_s": toks / min(ours), "raw_tokens_per_s": toks / min(raw),
            "ratio_ours_over_raw": min(raw) / min(ours),
        }

    res.section("throughput", throughput)

    def probe_logprobs(backend: Any) -> list[list[float]]:
        with backend.sampling_overrides(prompt_logprobs=0, max_new_tokens=1, temperature=0.0):
            recs = backend.decode_internal(backend.forward_step(probes))
        return [r.prompt_logprobs[1:] for r in recs]

    def max_diff(a: list[list[float]], c: list[list[float]]) -> float:
        return max(abs(x - y) for ra, rc in zip(a, c) for x, y in zip(ra, rc))

    def weight_paths() -> dict[str, Any]:
        out: dict[str, Any] = {"bytes": sum(t.numel() * t.element_size() for t in weights.values()),
                               "copy_floor_seconds_at_3TBps": 2 * sum(t.numel() * t.element_size() for t in weights.values()) / 3.0e12}
        for transport in ("direct", "inprocess"):
            if transport == "direct" and not compat.direct_load_supported():
                out["direct_load"] = {"skipped": "a second load_weights is not allowed on this platform"}
                continue
            b.options.sync_transport = "direct" if transport == "direct" else "rpc"  # rpc on in-process = reload_weights
            times = []
            for i in range(3):
                sync_clock(device)
                rep = b.sync_weights(weights_b if i % 2 == 0 else weights)
                sync_clock(device)
                times.append(rep.seconds)
            out[rep.transport] = {"seconds": times, "phases_last": rep.phases}
        b.options.sync_transport = "auto"
        b.sync_weights(weights)
        lp_ref = probe_logprobs(b)
        if list(Path(model_dir).glob("*.safetensors")):
            rep = b.sync_weights(str(model_dir))
            out["folder"] = {"seconds": rep.seconds, "phases": rep.phases}
            b.sync_weights(weights)
        out["logprobs_identical_after_round_trips"] = max_diff(lp_ref, probe_logprobs(b)) == 0.0
        return out

    res.section("weight_paths", weight_paths)

    def atomic_sync() -> dict[str, Any]:
        """Issue 14: the atomic sync (snapshot of the touched modules + manifest and finite checks
        per bucket) against the plain sync (options off) of the same HF-named tensors, the finite
        check alone, a rolled-back sync (source raising at its last tensor) and the KV scrub."""
        from genbackends.sync_safety import nonfinite_problem
        from genbackends.weights import bucketize

        opts = b.options
        saved = (opts.sync_atomic, opts.check_finite, opts.kv_scrub, opts.sync_transport)
        out: dict[str, Any] = {"bytes": sum(t.numel() * t.element_size() for t in weights.values()),
                               "bucket_bytes": opts.bucket_bytes}
        try:
            opts.sync_transport = "auto"
            from genbackends.weights import TensorSpec

            class Lazy:
                """The same tensors from a source that produces them bucket by bucket (as a trainer
                gathering its shards does): it cannot be checked whole up front, so the atomic
                sync snapshots the engine (dicts of existing tensors are checked whole instead)."""

                def __init__(self, w: dict[str, Any]):
                    self.w = w

                def manifest(self) -> dict[str, Any]:
                    return {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in self.w.items()}

                def iter_buckets(self, bucket_bytes: Any = None) -> Any:
                    yield from bucketize(iter(self.w.items()), bucket_bytes)

            modes = ("plain", "atomic", "atomic_lazy")
            runs: dict[str, list[Any]] = {m: [] for m in modes}
            for rnd in range(args.repeats):  # rotate the order so drift hits every mode
                for k in range(len(modes)):
                    mode = modes[(k + rnd) % len(modes)]
                    opts.sync_atomic = opts.check_finite = mode != "plain"
                    opts.kv_scrub = "never" if mode == "plain" else "auto"
                    b._kv_may_be_nonfinite = False  # the scrub an unchecked sync triggers is timed on its own below
                    w = weights_b if (rnd + k) % 2 == 0 else weights
                    sync_clock(device)
                    t0 = time.perf_counter()
                    rep = b.sync_weights(Lazy(w) if mode == "atomic_lazy" else w)
                    sync_clock(device)
                    runs[mode].append((time.perf_counter() - t0, rep))
            for mode, rs in runs.items():
                best = min(rs, key=lambda r: r[0])
                out[f"{mode}_sync_ms"] = 1e3 * best[0]
                out[f"{mode}_sync_ms_all"] = [1e3 * r[0] for r in rs]
                out[f"{mode}_phases_ms"] = {k: 1e3 * v for k, v in best[1].phases.items()}
                out[f"{mode}_transport"] = best[1].transport
                out[f"{mode}_atomicity"] = best[1].details.get("atomic", "snapshot" if best[1].details.get("snapshot_bytes") else "none")
            det = min(runs["atomic_lazy"], key=lambda r: r[0])[1].details
            out["snapshot_bytes"] = det.get("snapshot_bytes")
            out["snapshot_bytes_host"] = det.get("snapshot_bytes_host")
            out["atomic_over_plain"] = out["atomic_sync_ms"] / out["plain_sync_ms"]
            out["atomic_lazy_over_plain"] = out["atomic_lazy_sync_ms"] / out["plain_sync_ms"]
            out["snapshot_ms"] = out["atomic_lazy_phases_ms"].get("snapshot")
            out["atomic_over_plain"] = out["atomic_sync_ms"] / out["plain_sync_ms"]
            fin = []
            tensors = list(weights.items())
            for _ in range(args.repeats):  # the finite check alone, bucket by bucket as the sync does it
                sync_clock(device)
                t0 = time.perf_counter()
                for bucket in bucketize(iter(tensors), opts.bucket_bytes):
                    assert nonfinite_problem(bucket) is None
                fin.append(time.perf_counter() - t0)
            out["finite_check_ms"] = 1e3 * min(fin)
            out["finite_check_GBps"] = out["bytes"] / min(fin) / 1e9
            # rollback: every tensor but the last is written, then the source fails
            opts.sync_atomic = opts.check_finite = True
            opts.kv_scrub = "auto"
            b.sync_weights(weights)
            lp_before = probe_logprobs(b)

            class Failing:
                def manifest(self) -> dict[str, Any]:
                    from genbackends.weights import TensorSpec

                    return {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in weights_b.items()}

                def iter_buckets(self, bucket_bytes: Any = None) -> Any:
                    def gen() -> Any:
                        items = list(weights_b.items())
                        yield from items[:-1]
                        raise RuntimeError("benchmark: the source fails at its last tensor")

                    yield from bucketize(gen(), bucket_bytes)

            sync_clock(device)
            t0 = time.perf_counter()
            try:
                b.sync_weights(Failing())
                out["rollback"] = {"error": "the failing sync was accepted"}
            except Exception as e:  # noqa: BLE001 - expected
                sync_clock(device)
                out["rollback"] = {"seconds": time.perf_counter() - t0, "message": str(e)[:300]}
            out["rollback"]["logprobs_identical_after_rollback"] = max_diff(lp_before, probe_logprobs(b)) == 0.0
            t0 = time.perf_counter()
            scrubbed = b.replicas[0].scrub_kv_cache()
            sync_clock(device)
            out["scrub_kv_ms"] = 1e3 * (time.perf_counter() - t0)
            out["scrub_kv_bytes"] = scrubbed
        finally:
            opts.sync_atomic, opts.check_finite, opts.kv_scrub, opts.sync_transport = saved
        return out

    res.section("atomic_sync", atomic_sync)

    def sleep_cycle() -> dict[str, Any]:
        out: dict[str, Any] = {"sleep_is_noop_here": compat.sleep_is_noop()}
        b.sync_weights(weights)
        before = probe_logprobs(b)
        mem0 = compat.memory_stats()
        t0 = time.perf_counter()
        b.sleep(1)
        t1 = time.perf_counter()
        mem1 = compat.memory_stats()
        b.wake_up()
        t2 = time.perf_counter()
        out["level1"] = {"sleep_seconds": t1 - t0, "wake_seconds": t2 - t1,
                         "freed_bytes": (mem1.get("free_bytes", 0) - mem0.get("free_bytes", 0)) if mem0 else None,
                         "max_logprob_diff_after_wake": max_diff(before, probe_logprobs(b))}
        steps: dict[str, float] = {}
        t = time.perf_counter()
        b.sleep(2)
        steps["sleep2"] = time.perf_counter() - t
        mem2 = compat.memory_stats()
        t = time.perf_counter()
        b.wake_up(["weights"])
        steps["wake_weights"] = time.perf_counter() - t
        t = time.perf_counter()
        rep = b.sync_weights(weights)
        sync_clock(device)
        steps["sync_weights"] = time.perf_counter() - t
        t = time.perf_counter()
        b.wake_up(["kv_cache"])
        steps["wake_kv_cache"] = time.perf_counter() - t
        after = probe_logprobs(b)
        out["level2_cycle"] = {
            "steps_seconds": steps, "total_seconds": sum(steps.values()), "sync_transport": rep.transport,
            "freed_bytes": (mem2.get("free_bytes", 0) - mem0.get("free_bytes", 0)) if mem0 else None,
            "max_logprob_diff_vs_before": max_diff(before, after),
        }
        return out

    res.section("sleep", sleep_cycle)

    def mp_paths() -> dict[str, Any]:
        b.shutdown()
        state["backend"] = None
        b2 = get_registry().create_backend(make_config(vllm={"in_process": False}))
        b2.setup()
        out: dict[str, Any] = {}
        try:
            for transport in ("group", "rpc"):
                b2.options.sync_transport = transport
                times = [b2.sync_weights(weights if i % 2 else weights_b).seconds for i in range(2)]
                out[transport] = {"seconds": times}
        finally:
            b2.shutdown()
        return out

    engine_lp: dict[str, Any] = {}

    def parity() -> dict[str, Any]:
        from transformers import AutoConfig, AutoModelForCausalLM

        bk = state.get("backend")
        if bk is not None:
            bk.sync_weights(weights)
            engine_lp["lp"] = probe_logprobs(bk)
            with bk.sampling_overrides(temperature=0.0, max_new_tokens=16):
                engine_lp["greedy"] = [r.token_ids for r in bk.decode_internal(bk.forward_step(probes))]
            bk.shutdown()
            state["backend"] = None
        cfg = AutoConfig.from_pretrained(str(model_dir))
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(cfg, dtype=tdtype)
        hf.load_state_dict(weights, strict=True)
        hf.eval()
        diffs = []
        agree = []
        with torch.no_grad():
            for p, lp_engine, toks in zip(probes, engine_lp["lp"], engine_lp["greedy"]):
                logits = hf(torch.tensor([p], device=device)).logits[0].float()
                lp = torch.log_softmax(logits, -1)
                ref = [float(lp[i - 1, p[i]]) for i in range(1, len(p))]
                diffs.extend(abs(a - c) for a, c in zip(lp_engine, ref))
                seq = list(p)
                for _ in range(len(toks)):
                    seq.append(int(hf(torch.tensor([seq], device=device)).logits[0, -1].argmax()))
                hf_toks = seq[len(p):]
                same = next((i for i, (x, y) in enumerate(zip(hf_toks, toks)) if x != y), len(toks))
                agree.append(same)
        return {"dtype": dtype_name, "prompt_logprob_max_abs_diff": max(diffs),
                "prompt_logprob_mean_abs_diff": sum(diffs) / len(diffs),
                "greedy_tokens_equal_prefix": agree, "greedy_len": len(engine_lp["greedy"][0])}

    if not args.no_parity:
        res.section("parity", parity)
    if args.mp_paths:
        res.section("mp_paths", mp_paths)
    if state.get("backend") is not None:
        state["backend"].shutdown()
    res.data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    res.save()
    print(json.dumps({k: v for k, v in res.data.items() if k != "engine"}, indent=1, default=str)[:6000])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
