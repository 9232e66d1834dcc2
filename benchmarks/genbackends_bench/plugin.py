"""Plugin module of the benchmark harness: adds the ``genbackends bench`` subcommand."""
from __future__ import annotations

from typing import Any

from genbackends.hookspecs import hookimpl


@hookimpl
def genbackends_add_cli_commands(subparsers: Any) -> None:
    """Register ``bench`` with the core CLI."""
    from genbackends_bench.cli import add_arguments, run_from_args

    p = subparsers.add_parser("bench", help="benchmark backends (and raw vLLM) on the same workload",
                              description="Run every backend on the same prompts/sampling/lengths and write "
                                          "JSON, markdown and a PNG plot under benchmarks/results/<name>/.")
    add_arguments(p)
    p.set_defaults(func=run_from_args)
