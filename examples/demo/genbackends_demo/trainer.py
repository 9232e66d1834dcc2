"""The training side: next-token loss and Adam on a Megatron-core GPTModel (any TP size).

Gradients under tensor parallelism, and why a plain ``torch.optim.Adam`` over the rank's own
parameters is right here:

* TP-sharded weights (QKV/fc1 columns, proj/fc2 rows, vocab rows of the embedding and output
  layer): megatron's autograd functions (copy-to / reduce-from / gather-from the TP region) make
  each rank's gradient exactly the gradient of its own shard.
* Replicated weights (RMSNorm weights): their inputs and outputs are full on every rank and the
  input-gradient of every column-parallel layer is all-reduced across TP in backward, so each rank
  computes the *full* gradient of its replica. Without sequence parallelism no extra all-reduce is
  needed, provided every rank sees the same batch (it does: the batch is the whole corpus). The
  same gradients give the same Adam updates, so the replicas stay identical;
  :meth:`Trainer.replica_drift` checks that after every phase instead of trusting it.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from genbackends_demo.data import CorpusBatch


class Trainer:
    """Trains ``model`` (a ``genbackends_megatron.model_builder.MegatronModel`` with one chunk,
    PP = 1) on a fixed batch."""

    def __init__(self, model: Any, lr: float):
        if len(model.chunks) != 1 or model.par.pp != 1:
            raise ValueError("the demo trainer handles pipeline-parallel size 1 only")
        self.model = model
        self.chunk = model.chunks[0]
        self.params = [p for p in self.chunk.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=lr, betas=(0.9, 0.98))
        self.device = next(self.chunk.parameters()).device

    def loss(self, batch: CorpusBatch) -> torch.Tensor:
        """Mean next-token cross-entropy over the real (non-pad) targets, on the HF vocab (the
        padded vocab rows are cut, as the engines never see them)."""
        from genbackends_megatron.model_builder import causal_mask

        tokens = batch.tokens.to(self.device)
        b, s = tokens.shape
        pos = torch.arange(s, device=self.device).unsqueeze(0).expand(b, s)
        logits = self.chunk(input_ids=tokens, position_ids=pos, attention_mask=causal_mask(s))
        logits = logits[:, :-1, : self.model.dims.vocab_size].float()
        mask = batch.loss_mask.to(self.device)
        return F.cross_entropy(logits[mask], tokens[:, 1:][mask])

    def step(self, batch: CorpusBatch) -> float:
        """One forward/backward/Adam step; returns the loss."""
        self.chunk.train()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        self.opt.step()
        self.chunk.eval()
        return float(loss.detach())

    @torch.no_grad()
    def eval_loss(self, batch: CorpusBatch) -> float:
        self.chunk.eval()
        return float(self.loss(batch))

    def train_phase(self, batch: CorpusBatch, steps: int, on_step: Callable[[int, float], None] | None = None) -> list[float]:
        """``steps`` optimizer steps; ``on_step(i, loss)`` after each (progress bars)."""
        losses = []
        for i in range(steps):
            losses.append(self.step(batch))
            if on_step is not None:
                on_step(i, losses[-1])
        return losses

    @torch.no_grad()
    def replica_drift(self) -> float:
        """Max |difference| between TP ranks' copies of the replicated (non-sharded) parameters:
        0.0 when the replicas stayed in sync. Collective over the TP group."""
        from megatron.core import parallel_state

        tp = parallel_state.get_tensor_model_parallel_world_size()
        if tp == 1:
            return 0.0
        group = parallel_state.get_tensor_model_parallel_group()
        worst = torch.zeros((), device=self.device)
        for name, p in self.chunk.named_parameters():
            if getattr(p, "tensor_model_parallel", False):
                continue  # sharded: each rank owns a different slice
            copies = [torch.empty_like(p) for _ in range(tp)]
            dist.all_gather(copies, p.detach().contiguous(), group=group)
            for c in copies[1:]:
                worst = torch.maximum(worst, (c - copies[0]).abs().max())
        return float(worst)
