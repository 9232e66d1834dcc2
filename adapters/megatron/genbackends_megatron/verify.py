"""Built-in verification: the backend's prompt logprobs against the trainer's own forward pass."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from genbackends_megatron.model_builder import MegatronModel, forward_logprobs


def backend_prompt_logprobs(backend: Any, probes: Sequence[Sequence[int]]) -> list[list[float]]:
    """Logprob of every prompt token after the first, as the backend computes it."""
    with backend.sampling_overrides(temperature=0.0, max_new_tokens=1, prompt_logprobs=0, n=1, ignore_eos=True):
        recs = backend.decode_internal(backend.forward_step([list(map(int, p)) for p in probes]))
    # Records come in prompt order, then completion index; one completion per prompt here.
    return [[float(x) for x in r.prompt_logprobs[1:]] for r in recs if r.index == 0]


def parity(model: MegatronModel, backend: Any | None, probes: Sequence[Sequence[int]]) -> dict[str, float] | None:
    """Collective over the trainer ranks (they all run the forward pass); on the rank with the
    backend returns ``{"max_abs_diff", "mean_abs_diff", "num_tokens"}``, elsewhere None."""
    diffs = []
    engine = backend_prompt_logprobs(backend, probes) if backend is not None else None
    for i, p in enumerate(probes):
        ours = forward_logprobs(model, torch.tensor([list(p)]))[0].double().cpu()
        if engine is not None:
            diffs.append((ours - torch.tensor(engine[i], dtype=torch.float64)).abs())
    if engine is None:
        return None
    d = torch.cat(diffs)
    return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()), "num_tokens": float(d.numel())}
