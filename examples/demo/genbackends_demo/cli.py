"""``genbackends demo [--backend vllm|hf] [--device cpu|cuda] [--config FILE] ...``"""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``demo`` command's arguments (the CLI hook and ``python -m genbackends_demo``)."""
    p.add_argument("--config", help="YAML file of demo settings (examples/demo/configs/*.yaml)")
    p.add_argument("--backend", help="generation backend: vllm (default) or hf, or any registered name")
    p.add_argument("--device", choices=["cpu", "cuda"], help="cpu (default) or cuda")
    p.add_argument("--tp", type=int, help="Megatron tensor-parallel size (default: 2 on a 2-core machine, else 1)")
    p.add_argument("--phases", type=int, help="training phases after the untrained phase 0 (default 3)")
    p.add_argument("--steps", dest="steps_per_phase", type=int, help="Adam steps per phase (default 3)")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-3)")
    p.add_argument("--placement", choices=["auto", "colocated", "rank0"],
                   help="engine inside every trainer rank (colocated, vLLM TP = trainer TP) or on rank 0 only")
    p.add_argument("--sync-path", dest="sync_path", choices=["auto", "universal", "direct"])
    p.add_argument("--master-port", dest="master_port", type=int)
    p.add_argument("--json", dest="json_out", help="also write per-phase results as JSON")
    p.add_argument("--async", dest="async_mode", action="store_true", default=None,
                   help="asynchronous rounds: stream records, sync while long responses are in flight")


def run_from_args(args: argparse.Namespace) -> int:
    from genbackends.errors import GenBackendsError
    from genbackends_demo.config import load_demo_config
    from genbackends_demo.launch import launch

    keys = ("backend", "device", "tp", "phases", "steps_per_phase", "lr", "sync_path", "placement", "master_port", "json_out", "async_mode")
    try:
        cfg = load_demo_config(args.config, {k: getattr(args, k, None) for k in keys})
        if cfg.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise GenBackendsError("--device cuda: torch sees no CUDA device; use --device cpu")
        from genbackends.registry import get_registry

        get_registry().backend_class(cfg.backend)  # unknown backend: one line listing the known ones
    except GenBackendsError as e:
        print(f"genbackends demo: {e}", file=sys.stderr)
        return 2
    return launch(cfg)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="genbackends demo", description=__doc__)
    add_arguments(p)
    return run_from_args(p.parse_args(argv))
