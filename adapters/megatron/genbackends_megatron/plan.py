"""A resharding plan: which slice of which source parameter goes into which slice of which target
parameter. Pure: built from two layouts (metadata), validated before any byte moves.

The same composition serves every direction: Megatron shards -> vLLM rank parameters (direct
path), Megatron shards -> full HF tensors (universal path, export), full HF tensors -> Megatron
shards (loading an HF checkpoint into a Megatron model).
"""
from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from genbackends.errors import WeightSyncError
from genbackends_megatron.layout import Layout, ParamSpec

Key = tuple[tuple[int, ...], str]


@dataclass(frozen=True)
class Piece:
    """Copy ``length`` indices along ``axis``: ``src[src_lo:]`` -> ``dst[dst_lo:]``."""

    src: Key
    dst: Key
    axis: int
    src_lo: int
    dst_lo: int
    length: int


@dataclass(frozen=True)
class Fill:
    """Zero-fill ``length`` indices of ``dst`` along ``axis`` from ``lo`` (padding rows)."""

    dst: Key
    axis: int
    lo: int
    length: int


@dataclass
class Plan:
    """Pieces and fills for every target parameter, plus both layouts they refer to."""

    src: Layout
    dst: Layout
    pieces: list[Piece] = field(default_factory=list)
    fills: list[Fill] = field(default_factory=list)

    def piece_bytes(self, p: Piece) -> int:
        spec = self.dst[p.dst]
        other = 1
        for i, d in enumerate(spec.shape):
            if i != p.axis:
                other *= d
        return p.length * other * torch.empty((), dtype=spec.dtype).element_size()

    @property
    def bytes(self) -> int:
        return sum(self.piece_bytes(p) for p in self.pieces)

    def for_dst_loc(self, loc: tuple[int, ...]) -> "Plan":
        """The part of the plan writing into parameters at ``loc``."""
        return Plan(self.src, {k: v for k, v in self.dst.items() if k[0] == loc},
                    [p for p in self.pieces if p.dst[0] == loc], [f for f in self.fills if f.dst[0] == loc])

    def describe(self, max_lines: int | None = None) -> str:
        """Human-readable plan: one line per piece, grouped by target parameter."""
        by_dst: dict[Key, list[Piece]] = defaultdict(list)
        for p in self.pieces:
            by_dst[p.dst].append(p)
        fills: dict[Key, list[Fill]] = defaultdict(list)
        for f in self.fills:
            fills[f.dst].append(f)
        lines = [f"plan: {len(self.pieces)} pieces, {len(self.fills)} zero fills, {self.bytes / 2**20:.2f} MiB, "
                 f"{len(self.dst)} target parameters from {len(self.src)} source shards"]
        for key, spec in self.dst.items():
            lines.append(f"{_loc(key[0])} {key[1]} {tuple(spec.shape)} {str(spec.dtype).replace('torch.', '')} axis {spec.axis}")
            for p in sorted(by_dst[key], key=lambda p: p.dst_lo):
                lines.append(f"    [{p.dst_lo}:{p.dst_lo + p.length}] <- {_loc(p.src[0])} {p.src[1]} [{p.src_lo}:{p.src_lo + p.length}]")
            for f in fills[key]:
                lines.append(f"    [{f.lo}:{f.lo + f.length}] <- zeros (padding)")
        if max_lines is not None and len(lines) > max_lines:
            lines = lines[:max_lines] + [f"... ({len(lines) - max_lines} more lines)"]
        return "\n".join(lines)


def _loc(loc: tuple[int, ...]) -> str:
    if len(loc) == 3:
        return f"pp{loc[0]}/vp{loc[1]}/tp{loc[2]}"
    if len(loc) == 1:
        return f"rank{loc[0]}"
    return "hf" if not loc else str(loc)


def make_plan(
    src: Layout,
    dst: Layout,
    prefer: Callable[[ParamSpec, ParamSpec], int] | None = None,
) -> Plan:
    """Compose two layouts into a validated :class:`Plan`.

    For every run of every target parameter, find the source runs holding the same HF indices.
    Where several sources hold the same indices (replicated norms on every TP rank), ``prefer``
    (lower is better; default: same TP rank) picks one, so every target element is written once.
    Raises :class:`WeightSyncError` naming the first target parameter with an uncovered run or a
    mismatching shape/dtype.
    """
    prefer = prefer or _prefer_same_rank
    index: dict[str, list[tuple[int, int, ParamSpec, int]]] = defaultdict(list)
    for spec in src.values():
        for s in spec.segs:
            index[s.hf].append((s.hf_lo, s.length, spec, s.lo))
    for lst in index.values():
        lst.sort(key=lambda e: (e[0], e[1]))
    starts = {hf: [e[0] for e in lst] for hf, lst in index.items()}

    plan = Plan(src, dst)
    for key, dspec in dst.items():
        covered: list[tuple[int, int]] = []
        for seg in dspec.segs:
            cands = index.get(seg.hf)
            if not cands:
                raise WeightSyncError(f"no source holds HF tensor {seg.hf!r} needed by {_loc(key[0])} {key[1]}")
            lo, hi = seg.hf_lo, seg.hf_lo + seg.length
            # Candidate runs overlapping [lo, hi): runs are short lists, scan from the last start <= lo.
            i = max(0, bisect.bisect_right(starts[seg.hf], lo) - 1)
            while i > 0 and cands[i - 1][0] + cands[i - 1][1] > lo:
                i -= 1
            groups: dict[tuple[int, int], list[tuple[int, int, ParamSpec, int]]] = defaultdict(list)
            while i < len(cands) and cands[i][0] < hi:
                c = cands[i]
                if c[0] + c[1] > lo:
                    groups[(c[0], c[1])].append(c)
                i += 1
            pos = lo
            for (c_lo, c_len), reps in sorted(groups.items()):
                hf_lo_, hf_len, sspec, s_lo = min(reps, key=lambda c: prefer(c[2], dspec))
                a, b = max(c_lo, lo), min(c_lo + c_len, hi)
                if a != pos:
                    raise WeightSyncError(
                        f"{_loc(key[0])} {key[1]}: HF tensor {seg.hf!r} indices {pos}:{a} are held by no source shard"
                        if a > pos else f"{_loc(key[0])} {key[1]}: HF tensor {seg.hf!r} indices {a}:{pos} held twice")
                _check_compatible(sspec, dspec, seg.hf)
                plan.pieces.append(Piece(sspec.key, key, dspec.axis, s_lo + a - c_lo, seg.lo + a - lo, b - a))
                pos = b
            if pos != hi:
                raise WeightSyncError(f"{_loc(key[0])} {key[1]}: HF tensor {seg.hf!r} indices {pos}:{hi} are held by no source shard")
            covered.append((seg.lo, seg.length))
        # Everything not covered by runs is padding: zero-filled, so the target is covered exactly once.
        pos = 0
        for lo, n in sorted(covered):
            if lo < pos:
                raise WeightSyncError(f"{_loc(key[0])} {key[1]}: target indices {lo}:{pos} written twice")
            if lo > pos:
                plan.fills.append(Fill(key, dspec.axis, pos, lo - pos))
            pos = lo + n
        if pos > dspec.shape[dspec.axis]:
            raise WeightSyncError(f"{_loc(key[0])} {key[1]}: runs reach index {pos} past size {dspec.shape[dspec.axis]}")
        if pos < dspec.shape[dspec.axis]:
            plan.fills.append(Fill(key, dspec.axis, pos, dspec.shape[dspec.axis] - pos))
    return plan


def _prefer_same_rank(s: ParamSpec, d: ParamSpec) -> int:
    # Replicated sources: take the copy on the TP rank equal to the target's rank (colocated
    # ranks then copy locally), else the lowest.
    s_tp = s.loc[-1] if s.loc else 0
    d_rank = d.loc[-1] if d.loc else 0
    return 0 if s_tp == d_rank else 1 + s_tp


def _check_compatible(s: ParamSpec, d: ParamSpec, hf: str) -> None:
    if s.axis != d.axis or len(s.shape) != len(d.shape):
        raise WeightSyncError(f"{s.name} and {d.name} disagree on the layout of {hf!r} (axis/rank)")
    for i, (a, b) in enumerate(zip(s.shape, d.shape)):
        if i != d.axis and a != b:
            raise WeightSyncError(f"shape mismatch for {hf!r}: source {s.name} {tuple(s.shape)} vs target {d.name} {tuple(d.shape)}")
    if s.dtype != d.dtype:
        raise WeightSyncError(f"dtype mismatch for {hf!r}: source {s.name} {s.dtype} vs target {d.name} {d.dtype}")


def check_exact_cover(plan: Plan) -> None:
    """Independent re-check that every target element is written exactly once (counts per index)."""
    counts: dict[Key, torch.Tensor] = {k: torch.zeros(v.shape[v.axis], dtype=torch.int32) for k, v in plan.dst.items()}
    for p in plan.pieces:
        counts[p.dst][p.dst_lo:p.dst_lo + p.length] += 1
    for f in plan.fills:
        counts[f.dst][f.lo:f.lo + f.length] += 1
    for k, c in counts.items():
        if not bool((c == 1).all()):
            bad = int((c != 1).nonzero()[0])
            raise WeightSyncError(f"{_loc(k[0])} {k[1]}: index {bad} written {int(c[bad])} times")


def apply_local(plan: Plan, get_src: Callable[[Key], torch.Tensor], get_dst: Callable[[Key], torch.Tensor],
                keys: Iterable[Key] | None = None) -> int:
    """Execute pieces (and fills) whose tensors are all at hand; returns bytes copied."""
    wanted = set(keys) if keys is not None else None
    n = 0
    for p in plan.pieces:
        if wanted is not None and p.dst not in wanted:
            continue
        d = get_dst(p.dst).narrow(p.axis, p.dst_lo, p.length)
        d.copy_(get_src(p.src).narrow(p.axis, p.src_lo, p.length))
        n += d.numel() * d.element_size()
    for f in plan.fills:
        if wanted is not None and f.dst not in wanted:
            continue
        get_dst(f.dst).narrow(f.axis, f.lo, f.length).zero_()
    return n
