"""Summarize one GPU-lane pytest run (its JUnit XML) into ``summary.json`` and ``summary.md``.

    python benchmarks/gpu/lane_summary.py JUNIT.xml OUT_DIR --command "..." [--log pytest.log]

``summary.json`` holds ``passed``, ``failed``, ``skipped``, ``errors``, ``total``, ``seconds``,
``command``, ``card``, ``torch``, ``vllm``, ``megatron_core``, ``failures`` (test ids of failed
and errored tests), ``skips`` (test id -> reason) and ``tests`` (one row per test: id, outcome,
seconds, message). Versions are read from the running interpreter (the lane's), each ``null``
when the package is missing there. A run with failures is summarized the same way: the point is
to commit it with the failures named.
"""
from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def parse_junit(path: str | Path) -> dict[str, Any]:
    """Counts and per-test rows of a pytest JUnit XML file (``<testsuites>`` or one ``<testsuite>``).

    Outcome per ``<testcase>``: ``failed`` (a ``<failure>`` child), ``error`` (``<error>``: a
    fixture or collection error), ``skipped`` (``<skipped>``), else ``passed``. A test with both a
    failure and a teardown error counts once, as failed."""
    root = ET.parse(str(path)).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    if not suites:
        raise ValueError(f"{path}: no <testsuite> element (not a pytest JUnit XML file?)")
    rows: list[dict[str, Any]] = []
    for suite in suites:
        for case in suite.iter("testcase"):
            cls, name = case.get("classname", ""), case.get("name", "")
            test_id = f"{cls}::{name}" if cls else name
            outcome, message = "passed", ""
            for tag, label in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
                el = case.find(tag)
                if el is not None:
                    outcome, message = label, (el.get("message") or (el.text or "")).strip()
                    break
            rows.append({"id": test_id, "outcome": outcome, "seconds": float(case.get("time") or 0.0),
                         "message": message[:500]})
    count = {k: sum(r["outcome"] == k for r in rows) for k in ("passed", "failed", "skipped", "error")}
    seconds = sum(float(s.get("time") or 0.0) for s in suites)
    return {
        "passed": count["passed"], "failed": count["failed"], "skipped": count["skipped"],
        "errors": count["error"], "total": len(rows), "seconds": round(seconds, 2),
        "failures": [r["id"] for r in rows if r["outcome"] in ("failed", "error")],
        "skips": {r["id"]: r["message"] for r in rows if r["outcome"] == "skipped"},
        "tests": rows,
    }


def environment() -> dict[str, Any]:
    """Card, torch, vLLM and megatron-core versions of this interpreter (None where missing)."""
    env: dict[str, Any] = {"card": None, "gpu_count": 0, "torch": None, "vllm": None, "megatron_core": None}
    try:
        import torch

        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["card"] = torch.cuda.get_device_name(0)
            env["gpu_count"] = torch.cuda.device_count()
    except ImportError:
        pass
    try:
        import vllm

        env["vllm"] = vllm.__version__
    except ImportError:
        pass
    try:
        from megatron.core import package_info

        env["megatron_core"] = package_info.__version__
    except ImportError:
        pass
    return env


def summary_markdown(s: dict[str, Any]) -> str:
    """The human-readable table of one summary."""
    lines = [
        "# GPU test lane",
        "",
        f"Command: `{s['command']}`",
        "",
        f"Card: {s.get('card')} x {s.get('gpu_count')} | torch {s.get('torch')} | vLLM {s.get('vllm')} | "
        f"megatron-core {s.get('megatron_core')}",
        "",
        f"**{s['passed']} passed, {s['failed']} failed, {s['errors']} errors, {s['skipped']} skipped** "
        f"({s['total']} tests, {s['seconds']:.0f} s)",
        "",
        "| test | outcome | seconds | message |",
        "|---|---|---:|---|",
    ]
    for r in s["tests"]:
        msg = r["message"].splitlines()[0][:160].replace("|", "\\|") if r["message"] else ""
        lines.append(f"| `{r['id']}` | {r['outcome']} | {r['seconds']:.1f} | {msg} |")
    if s["failures"]:
        lines += ["", "Failures: " + ", ".join(f"`{f}`" for f in s["failures"])]
    return "\n".join(lines) + "\n"


def write_summary(junit: str | Path, out_dir: str | Path, command: str, exit_code: int | None = None,
                  env: dict[str, Any] | None = None) -> dict[str, Any]:
    """Parse ``junit``, add the environment and command, write ``summary.json`` and ``summary.md``
    into ``out_dir``; returns the summary."""
    s: dict[str, Any] = {"command": command, "exit_code": exit_code}
    s.update(environment() if env is None else env)
    s.update(parse_junit(junit))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(s, indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(s))
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("junit")
    ap.add_argument("out_dir")
    ap.add_argument("--command", required=True, help="the pytest command line that produced the XML")
    ap.add_argument("--exit-code", type=int, default=None, help="pytest's exit status")
    args = ap.parse_args(argv)
    s = write_summary(args.junit, args.out_dir, args.command, args.exit_code)
    print(f"GPU lane: {s['passed']} passed, {s['failed']} failed, {s['errors']} errors, {s['skipped']} skipped "
          f"-> {Path(args.out_dir) / 'summary.json'}")
    for f in s["failures"]:
        print(f"  FAILED {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
