"""The Megatron side of the sync benchmarks: a single-process (world size 1, TP 1) megatron-core
GPTModel matching the model folder, built with the Megatron adapter's own builder, and the
adapter's weight source over it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


class BenchMegatron:
    """The built model and the adapter source (reused across repeats: building the plan is part
    of setup, not of each sync)."""

    def __init__(self, model: Any):
        self.model = model
        self._source: Any = None

    def parameters(self) -> list[torch.Tensor]:
        return [p for c in self.model.chunks for p in c.parameters()]

    def source(self, bucket_bytes: int | None) -> Any:
        if self._source is None:
            from genbackends_megatron import make_source

            self._source = make_source(self.model, engine_ranks=(0,), bucket_bytes=bucket_bytes)
        return self._source


def build_single_rank_model(model_dir: Path, device: str, dtype: torch.dtype, port: int) -> BenchMegatron:
    """World size 1 (gloo on the CPU, NCCL on GPUs), TP 1; the folder's weights if it has any
    (else megatron's random init: timing does not depend on values)."""
    import torch.distributed as dist

    from genbackends_megatron.model_builder import build_model, init_parallel, load_hf_weights

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if not dist.is_initialized():
        dist.init_process_group("gloo" if device == "cpu" else "nccl", rank=0, world_size=1)
    init_parallel(tp=1, pp=1)
    if device == "cuda":
        model = _build_on_gpu(model_dir, dtype)
    else:
        model = build_model(str(model_dir), dtype=dtype, init_parallel_state=False)
    if list(model_dir.glob("*.safetensors")):
        load_hf_weights(model, str(model_dir))
    return BenchMegatron(model)


def _build_on_gpu(model_dir: Path, dtype: torch.dtype) -> Any:
    """The adapter's builder, with parameters allocated on the GPU and megatron's own init skipped
    (its CPU initialisation of an 8B model takes minutes), then filled with random values on the
    GPU. Sync timings do not depend on the values."""
    from genbackends_megatron import model_builder as mb

    orig = mb.transformer_config

    def fast_config(*args: Any, **kw: Any) -> Any:
        kw.setdefault("use_cpu_initialization", False)
        kw.setdefault("perform_initialization", False)
        return orig(*args, **kw)

    mb.transformer_config = fast_config  # restored below; only this benchmark process sees it
    try:
        model = mb.build_model(str(model_dir), dtype=dtype, init_parallel_state=False)
    finally:
        mb.transformer_config = orig
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for c in model.chunks:
            c.cuda()
            for name, p in c.named_parameters():
                p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02, generator=gen)
    return model


def make_source(side: BenchMegatron, path: str, bucket_bytes: int | None) -> Any:
    """What the timed ``sync_weights`` call receives for ``megatron-<path>``."""
    return _PathSource(side.source(bucket_bytes), path)


class _PathSource:
    """Marks which adapter path a bench sync asks for; :func:`sync_call` unwraps it."""

    def __init__(self, source: Any, path: str):
        self.source, self.path = source, path


def sync_call(backend: Any, source: Any) -> Any:
    """Run a sync the way a trainer does. For a :class:`_PathSource` that is the adapter's own
    driver, ``MegatronWeightSource.sync(backend, path=...)``: ``universal`` hands HF-named
    buckets to ``backend.sync_weights``; ``direct`` validates a plan against the engine's own
    parameters and writes into them (an error for backends whose capabilities offer no
    ``direct`` sync path)."""
    if not isinstance(source, _PathSource):
        return backend.sync_weights(source)
    if source.path == "direct" and not backend.capabilities().offers("direct"):
        raise NotImplementedError(f"backend {backend.name!r} offers no direct write target (capabilities: no 'direct' sync path)")
    report = source.source.sync(backend, path=source.path)
    if report is None:  # pragma: no cover - single process: this rank always hosts the engine
        raise RuntimeError("the adapter returned no report on the engine rank")
    return report
