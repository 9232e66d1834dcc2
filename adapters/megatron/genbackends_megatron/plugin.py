"""Entry-point plugin: registers the Megatron weight adapter and the ``export`` / ``plan`` CLI
commands. Imports neither megatron nor vLLM at load time."""
from __future__ import annotations

import argparse
from typing import Any

from genbackends.hookspecs import hookimpl


class MegatronAdapter:
    """Weight adapter ``megatron`` -> HF-named / vLLM layouts for llama, qwen2, qwen3."""

    source = "megatron"

    @property
    def architectures(self) -> list[str]:
        from genbackends_megatron.tables import TABLES

        return list(TABLES)

    def make_source(self, model: Any, **kwargs: Any) -> Any:
        """A :class:`~genbackends_megatron.source.MegatronWeightSource` over a live model."""
        from genbackends_megatron import make_source

        return make_source(model, **kwargs)


@hookimpl
def genbackends_register_weight_adapters() -> list[Any]:
    return [MegatronAdapter()]


def _cmd_plan(args: argparse.Namespace) -> int:
    from genbackends.errors import ConfigError
    from genbackends.registry import get_registry
    from genbackends_megatron.layout import MegatronParallel, ModelDims, hf_layout, megatron_layout, target_layout
    from genbackends_megatron.plan import check_exact_cover, make_plan

    dims = ModelDims.from_hf_config(args.hf_config)
    par = MegatronParallel(tp=args.tp, pp=args.pp, vp=args.vp)
    src = megatron_layout(dims, par)
    if args.target == "hf":
        dst = hf_layout(dims)
    else:
        # The engine's layout is the engine plugin's knowledge: ask its backend class (no engine starts).
        cls = get_registry().backend_class(args.target)
        planned = getattr(cls, "planned_weight_layout", None)
        if planned is None:
            raise ConfigError(f"backend {args.target!r} publishes no weight layout to plan against")
        dst = target_layout(planned(args.hf_config, args.vllm_tp))
    plan = make_plan(src, dst)
    check_exact_cover(plan)
    print(plan.describe(max_lines=args.max_lines))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from genbackends_megatron.export import export_saved

    out = export_saved(args.shards, args.out)
    print(out)
    return 0


@hookimpl
def genbackends_add_cli_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("plan", help="print the Megatron -> vLLM (or HF) resharding plan (dry run, no processes)")
    p.add_argument("hf_config", help="HF model folder or config.json")
    p.add_argument("--tp", type=int, default=1, help="Megatron tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="Megatron pipeline-parallel size")
    p.add_argument("--vp", type=int, default=None, help="Megatron virtual pipeline size")
    p.add_argument("--vllm-tp", type=int, default=1, help="vLLM tensor-parallel size")
    p.add_argument("--target", choices=["vllm", "hf"], default="vllm")
    p.add_argument("--max-lines", type=int, default=None)
    p.set_defaults(func=_cmd_plan)
    e = subparsers.add_parser("export", help="saved Megatron shards (genbackends_megatron.export.save_shards) -> HF folder")
    e.add_argument("shards", help="folder written by save_shards")
    e.add_argument("out", help="output HF folder (transformers and vLLM load it)")
    e.set_defaults(func=_cmd_export)
