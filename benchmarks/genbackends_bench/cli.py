"""``genbackends bench CONFIG [--backends vllm,hf,raw-vllm] [--set k=v ...] [--results DIR]``."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` command's arguments (shared by the CLI hook and ``python -m``)."""
    p.add_argument("config", help="bench config YAML (see benchmarks/configs/)")
    p.add_argument("--backends", help="comma-separated rows to run, e.g. vllm,hf,raw-vllm (default: the config's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a bench config field (dotted path), e.g. --set workload.num_prompts=8")
    p.add_argument("--results", help="results root (default: benchmarks/results); a folder <name>/ is written")
    p.add_argument("--name", help="results folder name (default: the config's name)")
    p.add_argument("--append", action="store_true",
                   help="keep rows of an existing results.json for backends this run does not measure")


def run_from_args(args: argparse.Namespace) -> int:
    """Validate, run, print where the results are. Bad input: one line on stderr, exit 2."""
    from genbackends.errors import GenBackendsError
    from genbackends_bench.config import load_bench_config, parse_override
    from genbackends_bench.runner import run_bench

    try:
        overrides: dict[str, Any] = dict(parse_override(o) for o in args.overrides)
        if args.backends:
            overrides["backends"] = [b.strip() for b in args.backends.split(",") if b.strip()]
        if args.name:
            overrides["name"] = args.name
        cfg = load_bench_config(args.config, overrides)
    except GenBackendsError as e:
        print(f"genbackends bench: {e}", file=sys.stderr)
        return 2
    command = _command_line(args)
    out = run_bench(cfg, Path(args.results) if args.results else None,
                    config_text=Path(args.config).read_text(), command=command,
                    log=lambda s: print(s, file=sys.stderr, flush=True), append=args.append)
    print((out / "results.md").read_text())
    print(f"results written to {out}/results.{{json,md,png}}", file=sys.stderr)
    failed = [r for r in __import__("json").loads((out / "results.json").read_text())["rows"] if "error" in r]
    return 1 if failed else 0


def _command_line(args: argparse.Namespace) -> str:
    """The equivalent ``genbackends bench`` command, recorded in the results."""
    parts = ["genbackends", "bench", args.config]
    if args.backends:
        parts += ["--backends", args.backends]
    for o in args.overrides:
        parts += ["--set", o]
    if args.name:
        parts += ["--name", args.name]
    if args.results:
        parts += ["--results", args.results]
    if args.append:
        parts.append("--append")
    return " ".join(shlex.quote(p) for p in parts)


def main(argv: list[str] | None = None) -> int:
    """``python -m genbackends_bench CONFIG ...``"""
    p = argparse.ArgumentParser(prog="genbackends bench", description="benchmark generation backends on the same work")
    add_arguments(p)
    return run_from_args(p.parse_args(argv))
