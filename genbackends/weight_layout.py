"""The engine-neutral description of where an engine keeps its weights (what a backend publishes
through ``weight_layout()``), and the format of the writes a planner hands back to it.

A backend that offers the ``"direct"`` sync path says, per engine rank and per target parameter:
its shape and dtype, the one axis along which it is assembled from HF tensors, and the *runs* that
fill it: ``Run(hf, hf_lo, lo, length)`` = "indices ``lo .. lo+length`` of this parameter along
``axis`` are indices ``hf_lo .. hf_lo+length`` of HF tensor ``hf`` along the same axis" (the other
axes are whole). From the runs follow the HF source names, the fused pieces (several HF tensors in
one parameter, e.g. q/k/v in ``qkv_proj``), each rank's shard range and the padding (indices no run
covers: zero-filled by the writer). This is the same knowledge vLLM hangs on each parameter as its
``weight_loader``, written down as data so that a planner on the trainer side (the Megatron
adapter) can compute which of its shard slices land where, without knowing the engine.

Writes (:data:`WriteOps`) are what a planner hands to the backend's writer
(``backend.apply_writes``): per engine rank, copies ``(src_key, dst_param, axis, src_lo, dst_lo,
length)`` from tensors the caller supplies and zero fills ``(dst_param, axis, lo, length)``.
Nothing here touches an engine or a tensor's data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from genbackends.errors import WeightSyncError

# Per engine rank: {"copy": [(src_key, dst_param, axis, src_lo, dst_lo, length)],
#                   "fill": [(dst_param, axis, lo, length)]}
WriteOps = dict[int, dict[str, list[tuple]]]


@dataclass(frozen=True)
class Run:
    """``length`` indices of a parameter (from ``lo``) are HF tensor ``hf`` indices from ``hf_lo``."""

    hf: str
    hf_lo: int
    lo: int
    length: int


@dataclass(frozen=True)
class TargetParam:
    """One engine parameter on one engine rank, as the engine stores it (logical shape: what it
    loaded, also where the platform repacks it into a kernel handle afterwards).

    ``index`` (mixture of experts): the entry describes only ``param[index]`` (leading indices;
    ``(e,)`` = expert ``e`` of a fused ``(experts, ...)`` tensor such as vLLM's ``w13_weight``);
    ``shape``/``axis``/``runs`` are then those of that slice and :attr:`key` tells the entries of one
    parameter apart."""

    name: str
    rank: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    axis: int
    runs: tuple[Run, ...]
    index: tuple[int, ...] = ()

    @property
    def key(self) -> str:
        """``name``, or ``name[i,j]`` for an entry describing a slice (the key in ``params[rank]``)."""
        return f"{self.name}[{','.join(map(str, self.index))}]" if self.index else self.name

    @property
    def sources(self) -> tuple[str, ...]:
        """The HF tensors this parameter is made of, in storage order."""
        out: list[str] = []
        for r in sorted(self.runs, key=lambda r: r.lo):
            if r.hf not in out:
                out.append(r.hf)
        return tuple(out)

    @property
    def fused_pieces(self) -> tuple[tuple[str, int, int], ...]:
        """``(hf_name, offset, size)`` along :attr:`axis`, one per run, in storage order (for an
        unfused parameter: one piece, or none when the rank holds only padding)."""
        return tuple((r.hf, r.lo, r.length) for r in sorted(self.runs, key=lambda r: r.lo))

    @property
    def padding(self) -> tuple[tuple[int, int], ...]:
        """``(lo, length)`` ranges along :attr:`axis` that no HF tensor fills (zeroed on write)."""
        out, pos = [], 0
        for r in sorted(self.runs, key=lambda r: r.lo):
            if r.lo > pos:
                out.append((pos, r.lo - pos))
            pos = max(pos, r.lo + r.length)
        if pos < self.shape[self.axis]:
            out.append((pos, self.shape[self.axis] - pos))
        return tuple(out)


@dataclass(frozen=True)
class WeightLayout:
    """Every target parameter of one engine (every replica has the same layout), by rank.

    ``engine`` names who published it (``"vllm"``); ``tensor_parallel_size`` is the number of ranks
    in ``params``; ``local_ranks`` the engine ranks whose workers the publishing process reaches
    (all of them, or with colocated engines only its own); ``details`` carries engine facts a
    planner may show but must not branch on.
    """

    engine: str
    tensor_parallel_size: int
    params: dict[int, dict[str, TargetParam]]
    num_replicas: int = 1
    local_ranks: tuple[int, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[TargetParam]:
        for r in sorted(self.params):
            yield from self.params[r].values()

    def rank(self, r: int) -> dict[str, TargetParam]:
        """The parameters of engine rank ``r``."""
        return self.params[r]

    def hf_names(self) -> set[str]:
        """Every HF tensor some parameter is (partly) made of."""
        return {run.hf for p in self for run in p.runs}

    def check(self) -> None:
        """Internal consistency: runs inside the parameter, none overlapping (one-line error)."""
        for p in self:
            pos = 0
            for r in sorted(p.runs, key=lambda r: r.lo):
                if r.lo < pos or r.length <= 0 or r.lo + r.length > p.shape[p.axis]:
                    raise WeightSyncError(
                        f"published layout of rank {p.rank} {p.name}: run {r.hf}[{r.hf_lo}:{r.hf_lo + r.length}] "
                        f"at {r.lo} does not fit axis {p.axis} of {p.shape} (or overlaps)")
                pos = r.lo + r.length

    def describe(self, max_lines: int | None = None) -> str:
        """One line per parameter and fused piece (for ``genbackends plan`` style dumps)."""
        lines = [f"{self.engine} layout: TP {self.tensor_parallel_size}, {sum(len(v) for v in self.params.values())} parameters"]
        for p in self:
            lines.append(f"rank{p.rank} {p.key} {p.shape} {str(p.dtype).replace('torch.', '')} axis {p.axis}")
            for hf, off, n in p.fused_pieces:
                lines.append(f"    [{off}:{off + n}] {hf}")
            for lo, n in p.padding:
                lines.append(f"    [{lo}:{lo + n}] padding")
        if max_lines is not None and len(lines) > max_lines:
            lines = lines[:max_lines] + [f"... ({len(lines) - max_lines} more lines)"]
        return "\n".join(lines)


def check_live_params(layout: WeightLayout, live: dict[int, dict[str, tuple[tuple[int, ...], torch.dtype]]]) -> None:
    """A layout derived from knowledge (config, sharding rules) against the engine's real parameter
    list per rank: names, shapes, dtypes. One-line :class:`WeightSyncError` naming the first few."""
    probs = []
    for r, params in live.items():
        want = _whole_params(layout.params.get(r, {}))
        unknown = [n for n in params if n not in want]
        absent = [n for n in want if n not in params]
        if unknown:
            probs.append(f"rank {r}: engine parameter(s) the published layout does not describe: {unknown[:4]}")
        if absent:
            probs.append(f"rank {r}: described parameter(s) the engine lacks: {absent[:4]}")
        for n, (shape, dtype) in params.items():
            if n in want and (tuple(shape) != tuple(want[n].shape) or dtype != want[n].dtype):
                probs.append(f"rank {r}: {n} is {tuple(shape)} {dtype} in the engine, described {want[n].shape} {want[n].dtype}")
    if probs:
        raise WeightSyncError("direct sync rejected, nothing written: " + "; ".join(probs[:6]))


def _whole_params(entries: dict[str, TargetParam]) -> dict[str, TargetParam]:
    """Entries keyed by engine parameter: slice entries (``index``) of one parameter become one
    entry with the parameter's full shape (the number of slices per leading index in front)."""
    out: dict[str, TargetParam] = {}
    counts: dict[str, list[int]] = {}
    for p in entries.values():
        if not p.index:
            out[p.name] = p
            continue
        c = counts.setdefault(p.name, [0] * len(p.index))
        for i, v in enumerate(p.index):
            c[i] = max(c[i], v + 1)
        out[p.name] = p
    for name, c in counts.items():
        p = out[name]
        out[name] = TargetParam(name, p.rank, tuple(c) + tuple(p.shape), p.dtype, p.axis + len(c), ())
    return out


def runs_view(t: torch.Tensor, axis: int, lo: int, length: int, count: int, step: int) -> torch.Tensor:
    """``count`` runs of ``length`` indices of ``t`` along ``axis`` from ``lo``, ``step`` apart, as
    one strided view (no copy): how both sides turn regular runs (the Q/K/V rows of every query
    group) into one copy instead of one per run."""
    shape = list(t.shape)
    shape[axis] = length
    strides = list(t.stride())
    return t.as_strided([count] + shape, [step * strides[axis]] + strides, t.storage_offset() + lo * strides[axis])
