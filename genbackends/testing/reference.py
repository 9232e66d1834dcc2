"""The kit's independent reference: transformers' forward of the same HF weights in float64.

Every number a backend reports (greedy choices, sampled-token logprobs, prompt logprobs) is
checked against ``log_softmax`` of this forward, teacher-forced over the backend's own tokens, so
one near-tie early in a completion does not make the rest incomparable.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch


def checkpoint_tensors(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The HF-named tensors of a model folder's safetensors files (what any backend's
    ``sync_weights`` must accept)."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors file; the conformance kit needs an HF safetensors folder")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


class Float64Reference:
    """transformers' ``AutoModelForCausalLM`` of ``model_dir`` in float64 on the CPU, plus its
    tokenizer and EOS ids."""

    def __init__(self, model_dir: str | Path, tokenizer_dir: str | Path | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=torch.float64, attn_implementation="eager"
        ).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir))
        self.eos_ids: set[int] = set()
        for v in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(v, int):
                self.eos_ids.add(v)
            elif isinstance(v, (list, tuple)):
                self.eos_ids.update(int(x) for x in v)
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Replace weights by HF name (tied weights follow their source), as a sync would."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        unknown = [n for n in tensors if n not in params]
        if unknown:
            raise KeyError(f"reference model has no parameter(s) {unknown[:5]}")
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t.to(torch.float64))
        self._cache.clear()

    @torch.no_grad()
    def log_softmax(self, ids: Sequence[int]) -> torch.Tensor:
        """``[len(ids), vocab]`` float64 log-softmax; row ``i`` predicts token ``i + 1``."""
        key = tuple(int(i) for i in ids)
        if key not in self._cache:
            logits = self.model(torch.tensor([key])).logits[0].to(torch.float64)
            self._cache[key] = torch.log_softmax(logits, dim=-1)
        return self._cache[key]

    def completion_rows(self, prompt_ids: Sequence[int], token_ids: Sequence[int]) -> torch.Tensor:
        """``[len(token_ids), vocab]``: the distribution each generated token was drawn from."""
        p = len(prompt_ids)
        lp = self.log_softmax(list(prompt_ids) + list(token_ids))
        return lp[p - 1 : p - 1 + len(token_ids)]

    @torch.no_grad()
    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        return self.model(torch.tensor([list(ids)])).logits[0].to(torch.float64)

    def text(self, token_ids: Sequence[int]) -> str:
        """What a record's ``text`` must be for a completion without a stop string."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True).rstrip("\ufffd")


def perturbed(tensors: Mapping[str, torch.Tensor], seed: int = 1234) -> dict[str, torch.Tensor]:
    """Each tensor plus seeded noise of its own scale: weights that change every output."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in tensors.items():
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
        scale = float(t.float().std()) if t.numel() > 1 else 0.1
        out[name] = (t.float() + noise * max(scale, 1e-2)).to(t.dtype)
    return out
