"""HF-named tensors written straight into the engine's parameters through the published layout.

vLLM's own ``model.load_weights`` walks the module tree, builds a name -> parameter dict and calls
one ``weight_loader`` per tensor on every call: at 8B that is about 10 ms of Python for 291
tensors, more than the copies themselves, and it is paid again for every bucket. Where the engine
lives in this process and its parameters are plain tensors (GPUs), the layout this plugin publishes
(:mod:`genbackends_vllm.published_layout`: per parameter, which rows of which HF tensor go where)
turns a set of HF names into copy/fill operations once; the direct writer
(:mod:`genbackends_vllm.direct_writer`) then runs them as one ``torch._foreach_copy_``, which
issues one device copy per tensor and nothing else. Same bytes, same destinations as vLLM's
loader (the GPU lane checks the two bitwise against each other).
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from genbackends.weight_layout import WeightLayout


def hf_write_ops(layout: WeightLayout, names: Iterable[str]) -> dict[int, dict[str, list[tuple]]]:
    """Per engine rank, the copies ``(hf_name, param, axis, hf_lo, lo, length)`` and the zero fills
    (padding) that load exactly the HF tensors ``names``: every parameter all of whose sources are
    in ``names``. (A parameter with only some of its sources is impossible here: syncs are refused
    up front when they hold part of a fused module.)"""
    have = set(names)
    ops: dict[int, dict[str, list[tuple]]] = {}
    for rank, params in layout.params.items():
        copies: list[tuple] = []
        fills: list[tuple] = []
        for pname, tp in params.items():
            srcs = tp.sources
            if not srcs or not all(s in have for s in srcs):
                continue
            copies.extend((r.hf, pname, tp.axis, r.hf_lo, r.lo, r.length) for r in tp.runs)
            fills.extend((pname, tp.axis, lo, n) for lo, n in tp.padding)
        ops[rank] = {"copy": copies, "fill": fills}
    return ops


def can_write_hf(backend: Any, transports: Sequence[str]) -> bool:
    """Whether HF-named tensors may bypass ``load_weights``: every replica is loaded in this
    process by ``direct_load`` (an engine whose parameters stay plain tensors: GPUs), and the
    backend offers direct writes."""
    return bool(transports) and all(t == "direct_load" for t in transports) and backend.capabilities().direct_writes


class HFWriter:
    """Writes buckets of HF-named tensors through the published layout; the operations of a
    given set of names are computed once and reused (the layout is fixed for the engine's life)."""

    def __init__(self, backend: Any):
        self.backend = backend
        self._ops: dict[frozenset[str], tuple[dict, int]] = {}

    def write(self, bucket: Sequence[tuple[str, Any]]) -> dict[str, Any]:
        """Copy ``bucket`` (``(hf_name, tensor)`` pairs, already validated) into the engine."""
        key = frozenset(n for n, _ in bucket)
        cached = self._ops.get(key)
        if cached is None:
            ops = hf_write_ops(self.backend.weight_layout(), key)
            # plan ids only need to differ between operation sets of one engine
            cached = self._ops[key] = (ops, hash(("hf", key)))
        ops, plan_id = cached
        srcs = {n: t.detach() for n, t in bucket}
        return self.backend.apply_writes(ops, srcs, plan_id=plan_id)


def hf_writer(backend: Any) -> HFWriter:
    """The backend's writer (one per backend, created on first use)."""
    w = getattr(backend, "_genbackends_hf_writer", None)
    if w is None:
        w = backend._genbackends_hf_writer = HFWriter(backend)
    return w
