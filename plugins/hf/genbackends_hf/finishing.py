"""Where a completion ends and why: EOS, stop strings, per-row token limits.

vLLM's semantics, which the HF backend reproduces so both give the same records:

* an EOS token (unless ``ignore_eos``) ends the completion; it stays in ``token_ids`` and is not
  in ``text`` (special tokens are skipped when decoding); ``finish_reason="stop"``;
* a stop string ends the completion at the token that completes it; that token stays in
  ``token_ids``, ``text`` is cut just before the stop string; ``finish_reason="stop"``;
* reaching the row's token limit gives ``finish_reason="length"``;
* trailing bytes of an unfinished UTF-8 character are left out of ``text`` (vLLM's incremental
  detokenizer holds them back waiting for the next token, which never comes), where a plain
  ``decode`` would show them as U+FFFD.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass
class Finish:
    """The outcome for one generated row."""

    length: int  # tokens kept
    reason: str  # "stop" or "length"
    text: str
    stop_reason: str | int | None = None


def find_stop_string(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """Earliest occurrence of any stop string in ``text``: ``(char offset, stop)``."""
    best: tuple[int, str] | None = None
    for s in stops:
        pos = text.find(s)
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, s)
    return best


def finish_row(
    tokens: Sequence[int],
    tokenizer: Any,
    *,
    limit: int,
    eos_ids: set[int],
    ignore_eos: bool,
    stops: Sequence[str],
) -> Finish:
    """Decide how many of the generated ``tokens`` a completion keeps (see the module docstring).

    ``tokens`` may run past the end (other rows kept the batch going; HF pads finished rows).
    """
    tokens = list(tokens[:limit])
    for i, t in enumerate(tokens):
        if stops:
            # Decoding the prefix each step is quadratic in the length, which is fine at RL lengths
            # and is the only way to catch stop strings that span token boundaries.
            text = tokenizer.decode(tokens[: i + 1], skip_special_tokens=True)
            hit = find_stop_string(text, stops)
            if hit is not None:
                return Finish(i + 1, "stop", text[: hit[0]], hit[1])
        if not ignore_eos and t in eos_ids:
            # vLLM leaves stop_reason None for EOS (it names stop strings and stop token ids)
            return Finish(i + 1, "stop", final_text(tokenizer, tokens[: i + 1]))
    return Finish(len(tokens), "length", final_text(tokenizer, tokens))


def final_text(tokenizer: Any, tokens: Sequence[int]) -> str:
    """Decoded completion text without the U+FFFD of an incomplete trailing UTF-8 sequence."""
    return tokenizer.decode(list(tokens), skip_special_tokens=True).rstrip("\ufffd")


class RowStopper:
    """A transformers ``StoppingCriteria`` marking rows done when they reach their own token
    limit or a stop string, so ``generate`` stops as soon as every row is done.

    ``prompt_width`` is the padded prompt length (generated tokens start there).
    """

    def __init__(self, prompt_width: int, limits: Sequence[int], tokenizer: Any, stops: Sequence[str]):
        self.prompt_width = prompt_width
        self.limits = torch.tensor(list(limits))
        self.tokenizer = tokenizer
        self.stops = list(stops)

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        produced = input_ids.shape[1] - self.prompt_width
        done = (produced >= self.limits).to(input_ids.device)
        if self.stops and produced > 0:
            gen = input_ids[:, self.prompt_width :].tolist()
            for row, toks in enumerate(gen):
                if not done[row]:
                    text = self.tokenizer.decode(toks, skip_special_tokens=True)
                    if find_stop_string(text, self.stops) is not None:
                        done[row] = True
        return done
