"""Output records: what ``decode_internal`` returns, and the padded batch RL trainers consume.

One :class:`GenerationRecord` per (prompt, completion) pair. The fields follow the seed's tables of
vLLM's ``RequestOutput``/``CompletionOutput``, flattened so a record stands on its own (JSONL
friendly) and every backend produces the same shape.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch


@dataclass
class GenerationRecord:
    """One completion of one prompt.

    ``prompt_logprobs`` has one entry per prompt token (the first is ``None``: nothing predicts
    it) or is ``None`` when not requested. ``logprobs`` has the logprob of each sampled token in
    ``token_ids``, in order (RL needs them, so backends always return them).
    """

    request_id: str
    prompt: str
    prompt_token_ids: list[int]
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    cumulative_logprob: float
    finish_reason: str | None
    prompt_logprobs: list[float | None] | None = None
    prompt_index: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # Asynchronous rollouts (genbackends.rollouts); None on synchronous records.
    weight_version: int | None = None
    """Version of the weights that produced the last token."""
    weight_versions: list[tuple[int, int]] | None = None
    """``(start token index, version)`` per span of ``token_ids`` (several when a sync landed mid-flight)."""
    loss_mask: list[int] | None = None
    """Multi-turn records: 1 where ``token_ids`` holds a model token, 0 at appended tool/env tokens."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (for JSONL output)."""
        return asdict(self)


@dataclass
class RLBatch:
    """A right-padded batch of prompt+response sequences, as RL trainers consume it.

    Shapes: ``B`` records, ``T`` = longest prompt+response.
    ``tokens`` [B, T] int64 (padded with ``pad_token_id``), ``attention_mask`` [B, T] bool,
    ``prompt_lengths`` [B], ``response_lengths`` [B], ``response_mask`` [B, T] bool (true at
    response positions), ``response_logprobs`` [B, T] float32 (the sampled tokens' logprobs at
    response positions, 0 elsewhere), ``prompt_indices`` [B] (which prompt each row answers).
    """

    tokens: torch.Tensor
    attention_mask: torch.Tensor
    prompt_lengths: torch.Tensor
    response_lengths: torch.Tensor
    response_mask: torch.Tensor
    response_logprobs: torch.Tensor
    prompt_indices: torch.Tensor

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def collate_records(records: Sequence[GenerationRecord], pad_token_id: int = 0) -> RLBatch:
    """Build the padded :class:`RLBatch` from records (in the given order)."""
    if not records:
        raise ValueError("collate_records needs at least one record")
    lengths = [len(r.prompt_token_ids) + len(r.token_ids) for r in records]
    width = max(lengths)
    batch = len(records)
    tokens = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.bool)
    response_mask = torch.zeros((batch, width), dtype=torch.bool)
    response_logprobs = torch.zeros((batch, width), dtype=torch.float32)
    for row, rec in enumerate(records):
        if len(rec.logprobs) != len(rec.token_ids):
            raise ValueError(
                f"record {row} (request {rec.request_id!r}) has {len(rec.token_ids)} tokens but "
                f"{len(rec.logprobs)} logprobs"
            )
        p, r = len(rec.prompt_token_ids), len(rec.token_ids)
        tokens[row, : p + r] = torch.tensor(list(rec.prompt_token_ids) + list(rec.token_ids), dtype=torch.long)
        attention_mask[row, : p + r] = True
        response_mask[row, p : p + r] = True
        if rec.loss_mask is not None:  # multi-turn: appended tool/env tokens are not the model's
            response_mask[row, p : p + r] = torch.tensor(rec.loss_mask, dtype=torch.bool)
        if r:
            response_logprobs[row, p : p + r] = torch.tensor(rec.logprobs, dtype=torch.float32)
    return RLBatch(
        tokens=tokens,
        attention_mask=attention_mask,
        prompt_lengths=torch.tensor([len(r.prompt_token_ids) for r in records], dtype=torch.long),
        response_lengths=torch.tensor([len(r.token_ids) for r in records], dtype=torch.long),
        response_mask=response_mask,
        response_logprobs=response_logprobs,
        prompt_indices=torch.tensor([r.prompt_index for r in records], dtype=torch.long),
    )
