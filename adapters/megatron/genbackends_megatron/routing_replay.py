"""Routing replay (R3): make the trainer's MoE forward use the experts the engine chose.

RL on mixtures of experts suffers when the engine and the trainer route a token to different
experts (numerics differ a little, a near-tie flips): the logprobs the trainer computes are then
not those of the policy that sampled. vLLM records the choice (``enable_return_routed_experts``:
``outputs[0].routed_experts``, an array ``(tokens, layers, top_k)`` per completion: every token of
prompt + completion except the last sampled one); megatron-core's ``RouterReplay``
(``megatron/core/transformer/moe/router_replay.py``, 0.16.1 and 0.19.2; built per router when the
config has ``moe_enable_routing_replay=True``) replays given top-k indices instead of its own.

This module converts between the two:

* :func:`replay_indices` -> per MoE layer of this rank, a ``[seq * batch, top_k]`` index tensor
  in megatron's token order (sequence-major: token ``(s, b)`` is row ``s * batch + b``);
* :func:`replaying` / :func:`recording` -> context managers around a forward pass;
* :func:`observed_routing` -> the experts each router really dispatched to (measures a replay);
* :func:`agreement` -> fraction of (token, layer) routing decisions that agree (as sets).

Rows the engine did not route (the last token of each sequence, padding) are filled with the
experts ``0..k-1``: with causal attention they only affect their own position's output, whose
logits no logprob of the sequence uses.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch

from genbackends.errors import WeightSyncError


def _routers(model: Any) -> list[tuple[int, Any]]:
    """``(global layer, router)`` of every MoE layer of this rank's chunks, in layer order."""
    out = []
    for chunk in model.chunks:
        for layer in chunk.decoder.layers:
            router = getattr(getattr(layer, "mlp", None), "router", None)
            if router is not None:
                out.append((layer.layer_number - 1, router))
    return out


def _router_replays(model: Any) -> list[Any]:
    """This rank's RouterReplay instances in layer order (one per MoE layer of its chunks)."""
    pairs = _routers(model)
    if any(getattr(r, "router_replay", None) is None for _, r in pairs):
        raise WeightSyncError("routing replay needs the model built with config_overrides="
                              "{'moe_enable_routing_replay': True}")
    return [(g, r.router_replay) for g, r in pairs]


def replay_indices(routed: Sequence[Any], seq_len: int, layers: Sequence[int], top_k: int) -> list[torch.Tensor]:
    """Per global layer in ``layers``: ``[seq_len * batch, top_k]`` int64 indices, megatron token
    order. ``routed[b]``: the engine's ``(tokens_b, num_layers, top_k)`` array of sample ``b``
    (``tokens_b <= seq_len``; missing rows get experts ``0..k-1``)."""
    batch = len(routed)
    out = []
    fill = torch.arange(top_k, dtype=torch.long)
    for g in layers:
        idx = fill.repeat(seq_len, batch, 1)  # [s, b, k]
        for b, r in enumerate(routed):
            t = _as_long(r)
            if t.dim() != 3 or t.shape[2] != top_k or g >= t.shape[1]:
                raise WeightSyncError(f"routed_experts of sample {b} has shape {tuple(t.shape)}; expected "
                                      f"(tokens, layers > {g}, top_k={top_k})")
            if t.shape[0] > seq_len:
                raise WeightSyncError(f"routed_experts of sample {b} covers {t.shape[0]} tokens, the batch only {seq_len}")
            idx[: t.shape[0], b] = t[:, g].long()
        out.append(idx.reshape(seq_len * batch, top_k))
    return out


@contextlib.contextmanager
def replaying(model: Any, routed: Sequence[Any], seq_len: int) -> Iterator[None]:
    """Within the block, every MoE router of this rank uses the engine's routing ``routed`` (one
    ``(tokens, layers, top_k)`` array per sample of the batch) for forward passes."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    pairs = _router_replays(model)
    k = model.dims.moe_top_k
    data = replay_indices(routed, seq_len, [g for g, _ in pairs], k)
    for (_, rr), idx in zip(pairs, data):
        rr.clear_indices()
        rr.set_target_indices(idx.to(next(model.chunks[0].parameters()).device))
        rr.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    try:
        yield
    finally:
        for _, rr in pairs:
            rr.clear_router_replay_action()
            rr.clear_indices()


@contextlib.contextmanager
def recording(model: Any) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, routers record their own top-k choice; the dict yielded is filled on exit
    with ``{global_layer: [seq * batch, top_k]}`` (megatron token order)."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    pairs = _router_replays(model)
    for _, rr in pairs:
        rr.clear_indices()
        rr.set_router_replay_action(RouterReplayAction.RECORD)
    got: dict[int, torch.Tensor] = {}
    try:
        yield got
    finally:
        for g, rr in pairs:
            if rr.get_recorded_indices() is not None:
                got[g] = rr.get_recorded_indices().detach().cpu()
            rr.clear_router_replay_action()
            rr.clear_indices()


@contextlib.contextmanager
def observed_routing(model: Any) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, the experts every router of this rank actually sent each token to,
    whatever chose them (its own top-k or a replay), read from the routers' outputs (the routing
    map megatron dispatches by), not from ``RouterReplay``'s bookkeeping: so it measures what a
    replay achieved. The dict yielded holds ``{global_layer: [seq * batch, top_k]}`` (megatron
    token order) of the last forward pass."""
    k = model.dims.moe_top_k
    got: dict[int, torch.Tensor] = {}

    def keeper(g: int) -> Any:
        def keep(_mod: Any, _inp: Any, out: Any) -> None:
            routing_map = out[1]  # [tokens, experts] bool: True where the token goes
            got[g] = routing_map.float().topk(k, dim=-1).indices.detach().cpu()
        return keep

    hooks = [router.register_forward_hook(keeper(g)) for g, router in _routers(model)]
    try:
        yield got
    finally:
        for h in hooks:
            h.remove()


def agreement(engine: Any, trainer: dict[int, torch.Tensor], tokens: int | None = None) -> float:
    """Fraction of (token, layer) decisions where the engine's expert set equals the trainer's.
    ``engine``: one sample's ``(tokens, layers, top_k)``; ``trainer``: :func:`recording`'s dict for a
    batch of that one sample; ``tokens``: compare only the first ``tokens`` rows."""
    e = _as_long(engine)
    n = tokens if tokens is not None else e.shape[0]
    same = total = 0
    for g, t in trainer.items():
        a = e[:n, g].sort(-1).values
        b = t[:n].long().sort(-1).values
        same += int((a == b).all(-1).sum())
        total += n
    return same / total if total else float("nan")


def _as_long(x: Any) -> torch.Tensor:
    """int64 tensor of an engine array (vLLM hands numpy arrays of small unsigned ints, which
    torch does not take for every dtype)."""
    if hasattr(x, "astype") and not isinstance(x, torch.Tensor):
        x = x.astype("int64")
    return torch.as_tensor(x).long()
