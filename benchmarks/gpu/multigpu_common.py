"""Rank-side helpers of the multi-GPU script (:mod:`multigpu`): process setup, timing, the link
floors, deterministic weight perturbation, probes and the backend configs.

Every helper runs unchanged on GPUs (NCCL, bf16) and on the CPU (gloo, fp32, ``--cpu``); the few
places that differ ask :func:`on_gpu`.
"""
from __future__ import annotations

import json
import os
import statistics
import time
import zlib
from pathlib import Path
from typing import Any, Callable

# What each rank learns from the launcher, as JSON in the GENBACKENDS_MULTIGPU_SPEC variable.
SPEC_ENV = "GENBACKENDS_MULTIGPU_SPEC"


def load_spec() -> dict[str, Any]:
    """The scenario spec the launcher passed to this rank."""
    return json.loads(os.environ[SPEC_ENV])


def on_gpu(spec: dict[str, Any]) -> bool:
    return not spec["cpu"]


def setup_process(spec: dict[str, Any]) -> tuple[int, int]:
    """Environment every rank needs before torch/vLLM start; returns ``(rank, world)``.

    GPU: one device per rank (``LOCAL_RANK``). CPU: one OpenMP core per rank, so two ranks on a
    2-core machine do not fight over threads.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    os.environ.setdefault("LOCAL_RANK", str(rank))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import warnings

    for cat in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=cat)
    import torch

    if spec["cpu"]:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world)))
    elif torch.cuda.device_count() > 1:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return rank, world


def torch_dtype(spec: dict[str, Any]) -> Any:
    import torch

    return torch.float32 if spec["cpu"] else torch.bfloat16


def device_sync(spec: dict[str, Any]) -> None:
    if not spec["cpu"]:
        import torch

        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], spec: dict[str, Any], barrier: Callable[[], None] | None = None) -> tuple[float, Any]:
    """Wall time of ``fn`` between two barriers (so it is the slowest rank's time) with the device
    drained before reading the clock."""
    if barrier is not None:
        barrier()
    device_sync(spec)
    t0 = time.perf_counter()
    out = fn()
    device_sync(spec)
    if barrier is not None:
        barrier()
    return time.perf_counter() - t0, out


def summarize(times: list[float]) -> dict[str, Any]:
    """Median/min/max of the timed repeats (the warm-up is not among them)."""
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": len(times)}


def model_bytes(manifest: dict[str, Any]) -> int:
    """Bytes of every HF tensor of the model (what a full sync must deliver to one engine)."""
    return int(sum(s.nbytes for s in manifest.values()))


def allgather_floor(nbytes: int, spec: dict[str, Any], repeats: int, group: Any = None, channel: Any = None) -> dict[str, Any]:
    """An all-gather whose output is ``nbytes`` (each rank contributes ``nbytes / world``) on the
    same group the sync uses: the least any sync that ends with every rank holding the full model
    can cost on that link. ``channel``: a :class:`~genbackends.channel.WeightChannel` (the
    separate scenario: its stand-alone group), else ``group`` of the default world (None = all ranks)."""
    import torch
    import torch.distributed as dist

    dtype = torch_dtype(spec)
    dev = "cpu" if spec["cpu"] else torch.device("cuda", torch.cuda.current_device())
    world = channel.world if channel is not None else dist.get_world_size(group)
    elt = torch.empty((), dtype=dtype).element_size()
    per = max(1, nbytes // elt // world)
    inp = torch.ones(per, dtype=dtype, device=dev)
    out = torch.empty(per * world, dtype=dtype, device=dev)

    def once() -> None:
        if channel is not None:
            channel.pg._allgather_base(out, inp).wait()
        else:
            dist.all_gather_into_tensor(out, inp, group=group)

    barrier = channel.barrier if channel is not None else (lambda: dist.barrier(group=group))
    once()  # warm-up (communicator set-up)
    times = [timed(once, spec, barrier)[0] for _ in range(repeats)]
    del inp, out
    _release(spec)
    return {"bytes": per * world * elt, **summarize(times), "gbps": per * world * elt / statistics.median(times) / 1e9}


def copy_floor(nbytes: int, spec: dict[str, Any], repeats: int) -> dict[str, Any]:
    """One device-to-device copy of ``nbytes`` on this rank's device (the least a sync that writes
    every engine byte can cost on one device)."""
    import torch

    dtype = torch_dtype(spec)
    dev = "cpu" if spec["cpu"] else torch.device("cuda", torch.cuda.current_device())
    n = max(1, nbytes // torch.empty((), dtype=dtype).element_size())
    a = torch.ones(n, dtype=dtype, device=dev)
    b = torch.empty_like(a)
    b.copy_(a)
    times = [timed(lambda: b.copy_(a), spec)[0] for _ in range(repeats)]
    out = {"bytes": n * a.element_size(), **summarize(times), "gbps_rw": 2 * n * a.element_size() / statistics.median(times) / 1e9}
    del a, b
    _release(spec)
    return out


def _release(spec: dict[str, Any]) -> None:
    """Hand cached blocks back to the driver: vLLM sizes its memory from what is free."""
    if not spec["cpu"]:
        import torch

        torch.cuda.empty_cache()


def perturb(model: Any, round_: int) -> None:
    """Change every trainer weight by a per-parameter factor derived from its canonical name (the
    same on every rank, so replicated norms stay identical across TP ranks): a sync that left any
    tensor stale shows up in the parity check."""
    import torch

    with torch.no_grad():
        for (loc, name), t in model.named_shards().items():
            h = zlib.crc32(f"{name}/{round_}".encode()) % 1000 / 1000.0
            t.mul_(0.9 + 0.2 * h)


def probes(vocab: int, n: int, length: int, seed: int = 7) -> list[list[int]]:
    """Token-id prompts (ids 4..vocab-1: no special tokens) for the parity check."""
    import random

    rnd = random.Random(seed)
    return [[rnd.randrange(4, vocab) for _ in range(length)] for _ in range(n)]


def backend_config(spec: dict[str, Any], *, tp: int, executor: str | None, seq_length: int = 256, extra_options: dict | None = None) -> Any:
    """The backend's GenConfig for ``spec``'s model: fp32 and a 64 MiB KV cache on the CPU, bf16
    and a small memory fraction on GPUs (the trainer shares the device)."""
    from genbackends.config import GenConfig

    opts: dict[str, Any] = {"enforce_eager": spec.get("enforce_eager", True)}
    if spec.get("load_format"):
        opts["load_format"] = spec["load_format"]
    opts.update(extra_options or {})
    parallel: dict[str, Any] = {"tensor_parallel_size": tp}
    if executor:
        parallel["executor"] = executor
    cache = ({"kv_cache_memory_bytes": 64 << 20} if spec["cpu"]
             else {"gpu_memory_utilization": float(spec.get("gpu_memory_utilization", 0.3))})
    return GenConfig.model_validate({
        "backend": "vllm", "model": spec["model"], "seq_length": seq_length,
        "dtype": "float32" if spec["cpu"] else "bfloat16", "device": "cpu" if spec["cpu"] else "cuda",
        "sampling": {"temperature": 0.0, "max_new_tokens": 1, "seed": 0},
        "cache": cache, "parallel": parallel, "options": {"vllm": opts},
    })


def parity_ok(par: dict[str, Any] | None, spec: dict[str, Any]) -> bool:
    """fp32 on the CPU: max |diff| <= 1e-4. bf16 on GPUs: max <= 0.5 and mean <= 0.05 (random
    weights; vLLM vs transformers on the same bf16 weights gave max 0.06-0.33 on these shapes)."""
    if not par:
        return False
    if spec["cpu"]:
        return par["max_abs_diff"] <= 1e-4
    return par["max_abs_diff"] <= 0.5 and par["mean_abs_diff"] <= 0.05


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str))
