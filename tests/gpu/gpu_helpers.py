"""Shared pieces of the GPU lane's tests (tests/gpu/, run by scripts/test-gpu on a CUDA machine).

Tiny models come from :func:`genbackends.tiny.build_tiny_model` (fp32 on disk) and run in bf16 on
the GPU, in vLLM and in transformers alike. Engines take a small slice of the card
(``GPU_MEM`` of it) so that several modules' engines, and transformers beside them, fit; each
module starts at most one in-process engine at a time.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # FlashInfer is not in the GPU bundle

# bf16 prompt-logprob tolerance of an engine against transformers on the same bf16 weights.
# /work/shared/ENVIRONMENT.md figures (H100/H200, vLLM 0.24): 1.1B max 0.063 mean 0.021; 8B max
# 0.33-0.36 mean 0.083. A sync that missed a tensor or a wrong layout gives diffs of several nats.
BF16_MAX_ABS = 0.4
BF16_MEAN_ABS = 0.1
GPU_MEM = 0.15  # gpu_memory_utilization of each engine (about 21 GB of an H200)

PROMPTS = ["the quick brown fox", "a b c", "hello world, this is a longer prompt about the sea"]


def gpu_config(model: Path | str, **over: Any) -> Any:
    """A bf16 vLLM config for the tiny model on one GPU (eager, in this process unless overridden)."""
    from genbackends.config import GenConfig

    sampling = {"temperature": 0.0, "max_new_tokens": 12, "seed": 0, "ignore_eos": True, **over.pop("sampling", {})}
    vllm_opts = {"enforce_eager": True, **over.pop("vllm", {})}
    cfg = dict(backend="vllm", model=str(model), seq_length=256, dtype="bfloat16", sampling=sampling,
               cache={"gpu_memory_utilization": over.pop("gpu_mem", GPU_MEM)}, options={"vllm": vllm_opts})
    cfg.update(over)
    return GenConfig.model_validate(cfg)


def start_backend(model: Path | str, **over: Any) -> Any:
    from genbackends.registry import get_registry

    b = get_registry().create_backend(gpu_config(model, **over))
    b.setup()
    return b


def weights(folder: Path | str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The folder's HF tensors, on ``device`` in ``dtype`` (what a trainer would hand over)."""
    from safetensors.torch import load_file

    return {n: t.to(device=device, dtype=dtype) for n, t in load_file(str(Path(folder) / "model.safetensors")).items()}


def engine_prompt_logprobs(backend: Any, ids: Sequence[Sequence[int]]) -> list[list[float]]:
    """The engine's logprob of every prompt token after the first."""
    with backend.sampling_overrides(prompt_logprobs=0, max_new_tokens=1, temperature=0.0):
        recs = backend.decode_internal(backend.forward_step([list(map(int, p)) for p in ids]))
    return [[float(x) for x in r.prompt_logprobs[1:]] for r in recs]


class HFGpuReference:
    """transformers on the GPU in ``dtype``: prompt log-softmax (computed in fp32 from its logits)."""

    def __init__(self, folder: Path | str, dtype: torch.dtype = torch.bfloat16):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to("cuda").eval()

    @torch.no_grad()
    def prompt_logprobs(self, ids: Sequence[Sequence[int]]) -> list[list[float]]:
        out = []
        for p in ids:
            logits = self.model(torch.tensor([list(p)], device="cuda")).logits[0].float()
            lp = torch.log_softmax(logits, -1)
            out.append([float(lp[i - 1, p[i]]) for i in range(1, len(p))])
        return out

    def free(self) -> None:
        del self.model
        torch.cuda.empty_cache()


def diffs(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(max, mean) absolute difference of two ragged logprob lists of the same shape."""
    assert [len(x) for x in a] == [len(y) for y in b], "logprob lists differ in shape"
    flat = [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return max(flat), sum(flat) / len(flat)


def assert_bf16_close(engine: Sequence[Sequence[float]], ref: Sequence[Sequence[float]], what: str) -> None:
    mx, mean = diffs(engine, ref)
    assert mx < BF16_MAX_ABS and mean < BF16_MEAN_ABS, f"{what}: max |diff| {mx:.4f}, mean {mean:.4f} (bf16 tolerance {BF16_MAX_ABS}/{BF16_MEAN_ABS})"


def free_bytes() -> int:
    """Free device memory as the driver reports it (sees memory freed outside torch's allocator)."""
    torch.cuda.synchronize()
    return int(torch.cuda.mem_get_info()[0])
