"""Start the demo: build the tiny HF model folder (tokenizer + initial weights), then run one
process per Megatron TP rank (gloo on the CPU, NCCL on GPUs)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from genbackends_demo.config import DemoConfig


def prepare_model(cfg: DemoConfig, work_dir: Path) -> Path:
    """The tiny HF folder the trainer starts from and the engine first loads (deterministic)."""
    from genbackends.tiny import build_tiny_model

    out = work_dir / f"tiny-{cfg.arch}-s{cfg.seed}"
    if not (out / "model.safetensors").exists():
        build_tiny_model(out, arch=cfg.arch, seed=cfg.seed)
    return out


def launch(cfg: DemoConfig) -> int:
    """Run the whole demo; returns an exit status."""
    tp = cfg.resolved_tp()
    with tempfile.TemporaryDirectory(prefix="genbackends-demo-") as tmp:
        work = Path(cfg.work_dir) if cfg.work_dir else Path(tmp)
        model_dir = str(prepare_model(cfg, work))
        if tp == 1:
            from genbackends_demo.run import run_rank

            run_rank(0, 1, cfg, model_dir)
        else:
            import torch.multiprocessing as mp

            from genbackends_demo.run import _spawn_entry

            mp.spawn(_spawn_entry, args=(tp, cfg, model_dir), nprocs=tp, join=True)
    return 0
