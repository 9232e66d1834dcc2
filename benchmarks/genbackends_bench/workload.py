"""The shared workload: the exact token ids every backend gets, built once by the parent.

Prompts are random token ids (deterministic in the seed) drawn from the ordinary, non-special part
of the tokenizer's vocabulary; each item also carries the decoded text, so our backends receive
the same ``{"prompt", "input_ids"}`` items their ``build_dataset`` produces, and raw vLLM the same
ids as ``TokensPrompt``. Lengths are exact (no re-tokenisation drift between backends).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def make_prompts(model_dir: Path, num_prompts: int, prompt_tokens: int, seed: int) -> list[dict[str, Any]]:
    """``num_prompts`` items of exactly ``prompt_tokens`` ids (plus their decoded text)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    vocab = min(len(tok), AutoConfig.from_pretrained(str(model_dir)).vocab_size)
    special = set(tok.all_special_ids)
    lo = max(special) + 1 if special else 0  # tiny and synthetic tokenizers put specials first
    if lo >= vocab:
        raise ValueError(f"tokenizer of {model_dir} has no ordinary tokens below the model vocab {vocab}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(lo, vocab, (num_prompts, prompt_tokens), generator=gen).tolist()
    return [{"prompt": tok.decode(row), "input_ids": row} for row in ids]


def batches(items: list[Any], batch_size: int | None) -> list[list[Any]]:
    """Split ``items`` into consecutive batches of ``batch_size`` (one batch for ``None``)."""
    size = batch_size or max(1, len(items))
    return [items[i : i + size] for i in range(0, len(items), size)]
