"""Workarounds that let megatron-core run on a CPU with gloo. Test and CPU-demo code only.

Each one is a fact recorded in the project's ENVIRONMENT notes:

* ``model_parallel_cuda_manual_seed`` needs CUDA: initialise the RNG tracker directly instead;
* RoPE moves ``inv_freq`` to ``torch.cuda.current_device()``: patch that to the CPU device;
* MoE (megatron-core 0.16.1): the router, the first-dimension gather/reduce-scatter and the global
  memory buffer also call ``torch.cuda.current_device()`` (covered by the same patch); without
  Transformer Engine ``moe_utils.te_general_gemm`` is never defined and the router's gating
  function raises ``NameError``: set it to None (the plain matmul path);
* with tied embeddings and PP > 1, megatron copies the last stage's embedding copy ``.cuda()``
  before an all-reduce: during model construction ``Tensor.cuda`` is a no-op on the CPU.

On a machine with CUDA none of this is applied.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_applied = False


def on_cpu() -> bool:
    """True when megatron must run without CUDA."""
    return not torch.cuda.is_available()


def apply_cpu_workarounds() -> None:
    """Patch ``torch.cuda.current_device`` and set up megatron's RNG tracker (idempotent)."""
    global _applied
    if not on_cpu():
        return
    if not _applied:
        torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
        from megatron.core.transformer.moe import moe_utils

        if not hasattr(moe_utils, "te_general_gemm"):
            moe_utils.te_general_gemm = None  # type: ignore[attr-defined]
        _applied = True
    from megatron.core import tensor_parallel

    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


@contextlib.contextmanager
def cuda_copies_stay_on_cpu() -> Iterator[None]:
    """Make ``Tensor.cuda()`` return the tensor itself while building a model on the CPU."""
    if not on_cpu():
        yield
        return
    orig = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.Tensor.cuda = orig  # type: ignore[assignment]
