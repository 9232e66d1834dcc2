"""One phase of the loop, the way an RL step drives the generation side:

    train (all ranks) -> wake -> sync_weights through the adapter (+ prompt-logprob probe)
    -> generate (engine rank) -> trainer logprobs of the sampled tokens (all ranks) -> sleep
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from genbackends_demo.data import CorpusBatch
from genbackends_demo.engine import GenerationSide, sampled_logprob_parity, share_sequences
from genbackends_demo.trainer import Trainer


@dataclass
class PhaseResult:
    """What one phase produced (filled on the engine rank; loss figures on every rank)."""

    phase: int
    steps: int
    loss_before: float
    loss_after: float
    train_s: float
    replica_drift: float = 0.0
    sync: dict[str, Any] | None = None
    generation: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    sampled_parity: dict[str, float] = field(default_factory=dict)
    sleep_s: float = 0.0


def run_phase(phase: int, steps: int, trainer: Trainer, gen: GenerationSide, batch: CorpusBatch,
              prompts: list[str], probes: list[list[int]], continuations: dict[str, list[int]],
              on_step: Callable[[int, float], None] | None = None) -> PhaseResult:
    """Train ``steps`` steps (none for phase 0: the untrained baseline), then sync and generate."""
    loss_before = trainer.eval_loss(batch)
    t0 = time.perf_counter()
    if steps:
        trainer.train_phase(batch, steps, on_step)
    train_s = time.perf_counter() - t0
    res = PhaseResult(phase, steps, loss_before, trainer.eval_loss(batch), train_s, trainer.replica_drift())
    res.sync = gen.sync(trainer.model, probes)
    records = None
    if gen.is_engine:
        records, res.generation = gen.generate(prompts)
        for r in records:
            want = continuations.get(r.prompt)
            match = None
            if want:
                # share of the corpus continuation reproduced, over as many tokens as were asked for
                n = min(len(want), gen.cfg.max_new_tokens)
                match = sum(a == b for a, b in zip(r.token_ids[:n], want[:n])) / n
            res.samples.append({"prompt": r.prompt, "text": r.text, "tokens": len(r.token_ids),
                                "corpus_match": match, "finish_reason": r.finish_reason})
    res.sampled_parity = sampled_logprob_parity(trainer.model, share_sequences(records))
    res.sleep_s = gen.sleep()
    return res
