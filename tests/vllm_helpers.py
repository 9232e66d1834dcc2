"""Shared helpers of the vLLM backend tests: configs, a sampling override context, and the
independent transformers reference (a manual greedy loop and log-softmax on the same folder)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch

from genbackends.config import GenConfig

PROMPTS = ["the quick brown fox", "a b c", "hello world, this is a longer prompt about the sea"]


def vllm_config(model: Path | str, **over: Any) -> GenConfig:
    """A small CPU config for the tiny model (32 MiB KV cache, eager, fp32)."""
    sampling = {"temperature": 0.0, "max_new_tokens": 12, "seed": 0, **over.pop("sampling", {})}
    options = {"vllm": {"enforce_eager": True, **over.pop("vllm", {})}}
    cfg = dict(
        backend="vllm",
        model=str(model),
        seq_length=128,
        dtype="float32",
        sampling=sampling,
        cache={"kv_cache_memory_bytes": 32 << 20, **over.pop("cache", {})},
        options=options,
    )
    cfg.update(over)
    return GenConfig.model_validate(cfg)


@contextlib.contextmanager
def sampling(backend: Any, **upd: Any) -> Iterator[None]:
    """Temporarily change the backend's sampling knobs (sampling is per request in vLLM, so one
    engine serves every variant)."""
    with backend.sampling_overrides(**upd):
        yield


class HFReference:
    """transformers on the same folder: greedy by a manual argmax loop, prompt log-softmax."""

    def __init__(self, model_dir: Path | str, state_dict: dict[str, torch.Tensor] | None = None):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        if state_dict:
            self.model.load_state_dict(state_dict, strict=False)

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([ids])).logits[0].double()

    @torch.no_grad()
    def greedy(self, ids: list[int], max_new: int, eos: int | None = None) -> list[int]:
        seq = list(ids)
        out = []
        for _ in range(max_new):
            nxt = int(self.logits(seq)[-1].argmax())
            out.append(nxt)
            seq.append(nxt)
            if eos is not None and nxt == eos:
                break
        return out

    @torch.no_grad()
    def prompt_logprobs(self, ids: list[int]) -> list[float]:
        lp = torch.log_softmax(self.logits(ids), dim=-1)
        return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]
