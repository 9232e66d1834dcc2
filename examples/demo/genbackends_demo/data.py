"""Training data: the corpus shipped with genbackends, one line per sequence, as a padded batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from genbackends.tiny import corpus_lines


@dataclass
class CorpusBatch:
    """``tokens`` [n, s] (right-padded, each line followed by EOS), ``loss_mask`` [n, s-1] (true
    where the next token is real)."""

    tokens: torch.Tensor
    loss_mask: torch.Tensor

    @property
    def num_target_tokens(self) -> int:
        return int(self.loss_mask.sum())


def corpus_batch(tokenizer) -> CorpusBatch:
    """Every corpus line tokenized (no BOS: the engines get prompts without it too) plus EOS."""
    seqs = [tokenizer(line, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for line in corpus_lines()]
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s) - 1] = True
    return CorpusBatch(tokens, mask)


def corpus_continuations(tokenizer, prompts: list[str]) -> dict[str, list[int]]:
    """For prompts that start a corpus line: the token ids the corpus continues them with (the
    demo reports how much of each greedy sample matches it)."""
    out: dict[str, list[int]] = {}
    for p in prompts:
        for line in corpus_lines():
            if line.startswith(p):
                full = tokenizer(line, add_special_tokens=False)["input_ids"]
                head = tokenizer(p, add_special_tokens=False)["input_ids"]
                if full[: len(head)] == head:
                    out[p] = full[len(head):] + [tokenizer.eos_token_id]
                break
    return out
