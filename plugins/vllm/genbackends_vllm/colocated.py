"""Colocated mode: the engine lives inside the trainer's own torch.distributed ranks.

Every trainer rank builds the same backend with ``parallel.executor: external_launcher``; vLLM
then uses the already-initialised default process group (the ranks a launcher such as torchrun
started) instead of spawning workers, so training and generation share the devices. With
``tensor_parallel_size = k`` each group of k consecutive ranks forms one engine; with 1 every
rank holds its own replica. All ranks must call ``generate``/``sync_weights`` together with the
same prompts and sampling seed (vLLM's requirement for this executor), and ``sync_weights``
takes the full HF tensors on every rank (each rank's engine cuts its own TP shard).

:func:`init_trainer_ranks` is the small helper tests, demos and scripts use to join the group
from torchrun-style environment variables.
"""
from __future__ import annotations

import os
from datetime import timedelta


def init_trainer_ranks(backend: str = "gloo", timeout_s: float = 300.0) -> tuple[int, int]:
    """Join the default process group from ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``
    (as torchrun sets them); returns ``(rank, world_size)``. Also sets ``LOCAL_RANK`` (vLLM's
    external launcher reads it) and keeps the engine core in-process (required)."""
    import torch.distributed as dist

    os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()
