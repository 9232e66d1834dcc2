"""The demo on one trainer rank (TP ranks are processes; rank 0 also hosts the engine)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from genbackends_demo.config import DemoConfig


def _setup_process(rank: int, world: int, cfg: DemoConfig) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(cfg.master_port))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # The demo's own lines are the point; engine INFO logs and library deprecation chatter are
    # not (set VLLM_LOGGING_LEVEL=INFO to see them).
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    import warnings

    for cat in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=cat)
    import torch

    if cfg.device == "cpu" and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # one core per TP rank
    if cfg.device == "cuda":
        torch.cuda.set_device(rank)


def run_rank(rank: int, world: int, cfg: DemoConfig, model_dir: str) -> list[Any] | None:
    """Build the Megatron model for this rank, then run every phase; returns the phase results
    on rank 0 (after printing them)."""
    _setup_process(rank, world, cfg)
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from genbackends_demo.data import corpus_batch, corpus_continuations
    from genbackends_demo.engine import GenerationSide
    from genbackends_demo.report import phase_text, summary_text, to_json
    from genbackends_demo.rl_step import run_phase
    from genbackends_demo.trainer import Trainer
    from genbackends_megatron.model_builder import build_model, init_parallel, load_hf_weights

    t_start = time.perf_counter()
    say = (lambda s: print(s, flush=True)) if rank == 0 else (lambda s: None)
    init_parallel(tp=world, pp=1)
    model = build_model(model_dir, dtype=torch.float32, init_parallel_state=False, seed=cfg.seed)
    load_hf_weights(model, model_dir)  # trainer and engine start from the same weights
    if cfg.device == "cuda":
        for c in model.chunks:
            c.cuda()
    trainer = Trainer(model, cfg.lr)
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = corpus_batch(tok)
    continuations = corpus_continuations(tok, cfg.prompts)
    probes = [row[: int(m.sum()) + 1][:48].tolist() for row, m in zip(batch.tokens[:3], batch.loss_mask[:3])]
    say(f"Megatron GPT ({cfg.arch}, {sum(p.numel() for p in model.chunks[0].parameters()) * world / 1e6:.2f}M "
        f"params over TP {world}, {batch.tokens.shape[0]} corpus lines / {batch.num_target_tokens} target tokens); "
        f"starting the {cfg.backend} backend ...")
    placement = cfg.resolved_placement(world)
    gen = GenerationSide(cfg, Path(model_dir), rank, world, placement)
    start_s = gen.start()
    where = f"colocated in the {world} trainer ranks (vLLM TP {world})" if placement == "colocated" else "on trainer rank 0"
    say(f"{cfg.backend} backend ready in {start_s:.1f}s, {where}")
    results = []
    if cfg.async_mode:
        return _run_async(rank, world, cfg, trainer, gen, batch, start_s, t_start, say)
    try:
        for phase in range(cfg.phases + 1):
            steps = 0 if phase == 0 else cfg.steps_per_phase
            bar = tqdm(total=steps, desc=f"phase {phase} training", file=sys.stdout, leave=False,
                       disable=rank != 0 or steps == 0, dynamic_ncols=True)

            def on_step(i: int, loss: float) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")

            res = run_phase(phase, steps, trainer, gen, batch, cfg.prompts, probes, continuations, on_step)
            bar.close()
            results.append(res)
            say(phase_text(res, cfg.backend))
    finally:
        gen.shutdown()
    total = time.perf_counter() - t_start
    say(summary_text(results, cfg.backend, world, start_s, total))
    if rank == 0 and cfg.json_out:
        Path(cfg.json_out).write_text(to_json(results, {"backend": cfg.backend, "tp": world, "device": cfg.device,
                                                         "engine_start_s": start_s, "total_s": total}))
    return results if rank == 0 else None


def _run_async(rank: int, world: int, cfg: DemoConfig, trainer: Any, gen: Any, batch: Any, start_s: float,
               t_start: float, say: Any) -> list[Any] | None:
    """``--async``: one asynchronous round per training phase (``async_round.py``)."""
    from genbackends_demo.async_round import run_async_round
    from genbackends_demo.report import async_round_text, async_summary_text, to_json

    results = []
    try:
        for phase in range(1, cfg.phases + 1):
            res = run_async_round(phase, cfg.steps_per_phase, trainer, gen, batch)
            results.append(res)
            say(async_round_text(res, cfg.backend))
    finally:
        gen.shutdown()
    total = time.perf_counter() - t_start
    say(async_summary_text(results, cfg.backend, world, start_s, total))
    if rank == 0 and cfg.json_out:
        Path(cfg.json_out).write_text(to_json(results, {"backend": cfg.backend, "tp": world, "device": cfg.device,
                                                         "async": True, "engine_start_s": start_s, "total_s": total}))
    return results if rank == 0 else None


def _spawn_entry(rank: int, world: int, cfg: DemoConfig, model_dir: str) -> None:
    run_rank(rank, world, cfg, model_dir)
