"""Printing the demo's progress: per-phase samples, sync figures, throughput, parity, and the
closing summary table. Only the engine rank prints."""
from __future__ import annotations

import json
from typing import Any

from genbackends_demo.rl_step import PhaseResult


def _kib(n: Any) -> str:
    return "-" if n is None else f"{n / 1024:,.0f} KiB"


def phase_text(r: PhaseResult, backend: str) -> str:
    """The block printed after each phase."""
    lines = []
    head = "untrained (initial weights)" if r.steps == 0 else f"after {r.steps} Adam steps ({r.train_s:.1f}s)"
    lines.append(f"\n=== phase {r.phase}: {head}; corpus loss {r.loss_before:.3f} -> {r.loss_after:.3f}")
    if r.replica_drift:
        lines.append(f"    warning: TP replicas of replicated weights differ by {r.replica_drift:.3g}")
    s = r.sync or {}
    par = s.get("parity") or {}
    lines.append(
        f"    sync_weights -> {backend}: path {s.get('path')} ({s.get('transport')}), {s.get('num_tensors')} tensors, "
        f"{_kib(s.get('bytes_moved'))} in {s.get('seconds', 0):.3f}s (wake {s.get('wake_s', 0):.3f}s)"
    )
    if par:
        lines.append(f"    prompt-logprob parity (probe): max |diff| {par.get('max_abs_diff', float('nan')):.2e}, "
                     f"mean {par.get('mean_abs_diff', float('nan')):.2e}")
    sp = r.sampled_parity
    lines.append(f"    sampled-token logprob parity (engine vs trainer, {sp.get('num_tokens', 0)} tokens): "
                 f"max |diff| {sp.get('max_abs_diff', 0):.2e}, mean {sp.get('mean_abs_diff', 0):.2e}")
    g = r.generation
    lines.append(f"    generation: {g.get('output_tokens', 0):.0f} tokens in {g.get('seconds', 0):.2f}s "
                 f"= {g.get('tokens_per_s', 0):.1f} tokens/s")
    for smp in r.samples:
        match = "" if smp["corpus_match"] is None else f"  [{smp['corpus_match'] * 100:.0f}% of the corpus line]"
        lines.append(f"    {smp['prompt']!r} -> {smp['text']!r}{match}")
    return "\n".join(lines)


def summary_text(results: list[PhaseResult], backend: str, tp: int, start_s: float, total_s: float) -> str:
    """The closing table: one row per phase."""
    rows = ["", f"summary ({backend} backend, Megatron TP {tp}, engine start {start_s:.1f}s, total {total_s:.1f}s)",
            "| phase | Adam steps | corpus loss | sync s | sync KiB | gen tok/s | sampled-lp max diff | corpus match |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r.sync or {}
        matches = [x["corpus_match"] for x in r.samples if x["corpus_match"] is not None]
        m = f"{100 * sum(matches) / len(matches):.0f}%" if matches else "-"
        rows.append(f"| {r.phase} | {r.steps} | {r.loss_after:.3f} | {s.get('seconds', 0):.3f} | "
                    f"{(s.get('bytes_moved') or 0) / 1024:,.0f} | {r.generation.get('tokens_per_s', 0):.1f} | "
                    f"{r.sampled_parity.get('max_abs_diff', 0):.1e} | {m} |")
    return "\n".join(rows)


def to_json(results: list[PhaseResult], meta: dict[str, Any]) -> str:
    from dataclasses import asdict

    return json.dumps({**meta, "phases": [asdict(r) for r in results]}, indent=2, default=str)


def async_round_text(r: Any, backend: str) -> str:
    """The block printed after each asynchronous round (``genbackends demo --async``)."""
    lines = [f"\n=== async round {r.phase}: {r.steps} Adam steps ({r.train_s:.1f}s) overlapping generation; "
             f"corpus loss {r.loss_before:.3f} -> {r.loss_after:.3f}"]
    lines.append(f"    trainer started at {r.train_start_at:.2f}s (after the short rollouts), done at {r.train_end_at:.2f}s; "
                 f"pause at {r.pause_at:.2f}s{' (staleness bound)' if r.paused_early else ''} with "
                 f"{r.in_flight_at_pause} request(s) in flight")
    s = r.sync or {}
    lines.append(f"    pause('keep') {r.pause_s * 1e3:.0f} ms -> sync_weights -> {backend} v{r.old_version}->v{r.new_version} "
                 f"({s.get('num_tensors')} tensors, {_kib(s.get('bytes_moved'))}) {r.sync_s * 1e3:.0f} ms "
                 f"-> resume() {r.resume_s * 1e3:.0f} ms")
    lines.append("    consumed (completion order): " + ", ".join(
        f"{x['request_id']}@{x['consumed_at']:.2f}s[{len(x['token_ids'])} tok, v{'/'.join(str(v) for _, v in x['weight_versions']) or '?'}]"
        for x in r.records))
    p = r.parity
    for half in ("old", "new"):
        h = p.get(half) or {}
        lines.append(f"    parity, tokens of the {half} weights vs the trainer on the {half} weights ({h.get('num_tokens', 0)} tokens): "
                     f"max |diff| {h.get('max_abs_diff', 0):.2e}, mean {h.get('mean_abs_diff', 0):.2e}")
    for sp in p.get("spanning", []):
        lines.append(f"    {sp['request_id']} spans the sync at token {sp['sync_token_index']} of {sp['tokens']}: "
                     f"old half {sp['old_half_max_abs_diff']:.1e}, new half {sp['new_half_max_abs_diff']:.1e} "
                     f"(new half on the old weights: {sp['new_half_on_old_weights_max_abs_diff']:.1e})")
    return "\n".join(lines)


def async_summary_text(results: list[Any], backend: str, tp: int, start_s: float, total_s: float) -> str:
    """The closing table of the asynchronous mode: one row per round."""
    rows = ["", f"summary ({backend} backend, async, Megatron TP {tp}, engine start {start_s:.1f}s, total {total_s:.1f}s)",
            "| round | corpus loss | spanning records | pause ms | sync ms | resume ms | old-half max diff | new-half max diff |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        p = r.parity
        rows.append(f"| {r.phase} | {r.loss_after:.3f} | {p.get('spanning_records', 0)} | {r.pause_s * 1e3:.0f} | "
                    f"{r.sync_s * 1e3:.0f} | {r.resume_s * 1e3:.0f} | {p['old']['max_abs_diff']:.1e} | "
                    f"{p['new']['max_abs_diff']:.1e} |")
    return "\n".join(rows)
