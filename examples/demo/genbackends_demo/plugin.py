"""Plugin module of the demo: adds the ``genbackends demo`` subcommand."""
from __future__ import annotations

from typing import Any

from genbackends.hookspecs import hookimpl


@hookimpl
def genbackends_add_cli_commands(subparsers: Any) -> None:
    """Register ``demo`` with the core CLI."""
    from genbackends_demo.cli import add_arguments, run_from_args

    p = subparsers.add_parser("demo", help="train a small Megatron GPT and generate with the synced weights",
                              description="The main job: train -> wake -> sync_weights -> generate, in phases.")
    add_arguments(p)
    p.set_defaults(func=run_from_args)
