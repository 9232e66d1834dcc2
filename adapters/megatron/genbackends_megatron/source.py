"""The weight source over a live Megatron model: the universal (HF-named) path and the entry
point of the direct path.

Universal path, per Megatron parameter in model order: the stage's TP ranks gather their shards
to the stage's TP rank 0 (the stage leader), which cuts them into HF tensors by the plan (QKV
de-interleave, fc1 -> gate/up, vocab padding cut) and sends them to the engine rank(s); the
engine rank yields them in buckets of at most ``bucket_bytes``. Every trainer rank runs the same
loop in the same order (a sync is collective); only engine ranks see tensors.

Use :meth:`MegatronWeightSource.sync` on every trainer rank (``backend`` on engine ranks, None
elsewhere). With one trainer process, ``backend.sync_weights(source)`` works directly.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from genbackends.errors import WeightSyncError
from genbackends.weight_layout import runs_view
from genbackends.weights import SyncReport, TensorSpec, validate_manifest
from genbackends_megatron.layout import hf_layout, hf_shapes, megatron_layout
from genbackends_megatron.model_builder import MegatronModel
from genbackends_megatron.plan import Piece, Plan, apply_local, make_plan
from genbackends_megatron.topology import Topology, agree


class MegatronWeightSource:
    """A :class:`~genbackends.weights.WeightSource` (and ``DirectWeightSource``) over a
    :class:`MegatronModel`.

    ``engine_ranks``: global trainer ranks that host an engine (receive tensors); default rank 0.
    ``bucket_bytes``: cap of one bucket (bounds the extra memory of a sync).
    ``direct_transport``: how the direct path reaches engine workers in other processes:
    ``"auto"``/``"group"`` (our own gloo/NCCL group, only the needed slices) or ``"rpc"`` (packed
    slices pickled through ``run_on_workers``); in-process workers always get references.
    Construction is collective (ranks agree on the topology).
    """

    # The direct path writes through the backend's own writer (``apply_writes``), which re-packs
    # what it writes where the engine repacks its weights after loading (CPU engines). The source
    # half of the capability ``direct_requires_repacking``: backends declaring it take the direct
    # path only from sources declaring this.
    handles_repacked_cpu_weights = True

    def __init__(self, model: MegatronModel, *, engine_ranks: Sequence[int] = (0,), bucket_bytes: int | None = None,
                 direct_transport: str = "auto"):
        self.model = model
        self.dims = model.dims
        self.par = model.par
        self.dtype = model.dtype
        self.engine_ranks = tuple(engine_ranks)
        self.bucket_bytes = bucket_bytes
        self.direct_transport = direct_transport
        self.topo = Topology.gather()
        self.layout = megatron_layout(self.dims, self.par, self.dtype)
        self.hf_plan = make_plan(self.layout, hf_layout(self.dims, self.dtype))
        self.units = _units(self.hf_plan)
        self._local_layout = model.local_layout()
        self.peak_extra_bytes = 0
        self._gathered = 0
        self.last_phases: dict[str, float] = {}
        self._direct_cache: dict[Any, Any] = {}

    # ---- WeightSource -------------------------------------------------------------------
    def manifest(self) -> dict[str, TensorSpec]:
        """Every HF tensor this source produces (metadata only, identical on every rank)."""
        return {n: TensorSpec(tuple(s), self.dtype) for n, s in hf_shapes(self.dims).items()}

    def check_local(self) -> str | None:
        """This rank's shards against the layout: unknown names, missing parameters (layers),
        wrong shapes or dtypes. Returns the problem (one line) or None."""
        self.__dict__.pop("_checked_shards", None)
        try:
            shards = self.model.named_shards()
        except WeightSyncError as e:
            return str(e)
        want = self._local_layout
        missing = [f"{_loc(k)} {k[1]}" for k in want if k not in shards]
        extra = [f"{_loc(k)} {k[1]}" for k in shards if k not in want]
        wrong = [f"{_loc(k)} {k[1]}: shape {tuple(t.shape)}, expected {want[k].shape}"
                 for k, t in shards.items() if k in want and tuple(t.shape) != want[k].shape]
        wrong += [f"{_loc(k)} {k[1]}: dtype {t.dtype}, expected {want[k].dtype}"
                  for k, t in shards.items() if k in want and t.dtype != want[k].dtype]
        probs = []
        if not (missing or extra or wrong):
            self._checked_shards = shards  # the next write_direct of this sync reuses them
        if missing:
            probs.append(f"missing Megatron parameter(s) {', '.join(missing[:4])}")
        if extra:
            probs.append(f"unexpected Megatron parameter(s) {', '.join(extra[:4])}")
        if wrong:
            probs.append(f"wrong shard(s) {', '.join(wrong[:4])}")
        return ("weight sync rejected, nothing written: " + "; ".join(probs)) if probs else None

    def iter_buckets(self, bucket_bytes: int | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Collective: every trainer rank must iterate (engine ranks get the tensors)."""
        agree(self.check_local())
        caps = [c for c in (bucket_bytes, self.bucket_bytes) if c]
        cap = min(caps) if caps else None  # the tighter of the backend's and the source's cap
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        self.peak_extra_bytes = 0
        extra = 0  # bytes of the current bucket that are copies (views of shards cost nothing)
        for name, t, copied in self._stream():
            n = t.numel() * t.element_size()
            if bucket and cap and size + n > cap:
                yield bucket
                bucket, size, extra = [], 0, 0
            bucket.append((name, t))
            size += n
            extra += n if copied else 0
            # Alive together: this bucket's copies and the gathered shards being cut.
            self.peak_extra_bytes = max(self.peak_extra_bytes, extra + self._gathered)
        if bucket:
            yield bucket

    def _stream(self) -> Iterator[tuple[str, torch.Tensor, bool]]:
        from megatron.core import parallel_state as ps

        me = self.topo.rank
        my_pp, my_tp, my_dp = self.topo.coords[me]
        shards = self.model.named_shards()
        dev = next(iter(shards.values())).device
        tp_group = ps.get_tensor_model_parallel_group() if self.par.tp > 1 else None
        man = self.manifest()
        for u in self.units:
            self._gathered = 0
            leader = self.topo.leader(u.pp)
            in_stage = my_pp == u.pp and my_dp == 0
            local: dict = {}
            if in_stage and len(u.src_tps) > 1:
                # Gather the stage's shards of this parameter to the stage leader.
                mine = shards[((u.pp, u.v, my_tp), u.name)].detach().contiguous()
                bufs = [torch.empty_like(mine) for _ in range(self.par.tp)] if me == leader else None
                dist.gather(mine, bufs, dst=leader, group=tp_group)
                if me == leader:
                    local = {((u.pp, u.v, t), u.name): b for t, b in enumerate(bufs)}
                    self._gathered = sum(b.numel() * b.element_size() for b in bufs)
            elif in_stage and me == leader:
                local = {((u.pp, u.v, t), u.name): shards[((u.pp, u.v, t), u.name)].detach() for t in u.src_tps}
            if me == leader:
                out = _assemble(u, local, self.hf_plan, man, dev)
                for e in self.engine_ranks:
                    if e != me:
                        for n, t, _ in out:
                            dist.send(t.contiguous(), dst=e)
                if me in self.engine_ranks:
                    yield from out
            elif me in self.engine_ranks:
                for n in u.hf:
                    buf = torch.empty(man[n].shape, dtype=self.dtype, device=dev)
                    dist.recv(buf, src=leader)
                    yield n, buf, True

    # ---- collective driver ----------------------------------------------------------------
    def sync(self, backend: Any | None, *, path: str = "universal", probes: Sequence[Sequence[int]] | None = None,
             check_finite: bool = True) -> SyncReport | None:
        """Collective sync: call on every trainer rank, with the backend on engine ranks (None
        elsewhere). ``path`` is ``"universal"`` (HF-named tensors through ``sync_weights``) or
        ``"direct"`` (plan writes into engine parameters). On the direct path every rank checks its
        own shards for NaN/Inf before the agreement (``check_finite``; engine ranks follow their
        backend's ``check_finite`` option). With ``probes`` (token-id lists),
        compares the engine's prompt logprobs with this model's forward afterwards
        (``report.parity``). Returns the report on engine ranks, None elsewhere."""
        me = self.topo.rank
        has_engine = backend is not None and me in self.engine_ranks
        report = None
        self.peak_extra_bytes = 0
        t0 = time.perf_counter()
        if path == "direct":
            # Every sync enters through the backend (its collective form): it validates, guards,
            # resets its caches, fires the hooks and reports; this rank's checks and the backend's
            # refusal are agreed by all trainer ranks inside write_direct(collective=True).
            if has_engine:
                report = backend.sync_weights(self, path="direct", collective=True)
            else:
                self.write_direct(None, collective=True, check_finite=check_finite)
        else:
            err = self.check_local()
            if has_engine and err is None:
                try:  # the contract's expected_weights() is None where a backend publishes no names
                    expected = backend.expected_weights()
                    if expected is not None:
                        validate_manifest(self.manifest(), expected)
                except WeightSyncError as e:
                    err = str(e)
            agree(err)
            if has_engine:
                report = backend.sync_weights(_HFNamed(self))
            else:
                for _ in self.iter_buckets():
                    pass
        if report is not None:
            report.peak_extra_bytes = max(report.peak_extra_bytes or 0, self.peak_extra_bytes)
            report.details.setdefault("trainer_seconds", time.perf_counter() - t0)
        if probes:
            from genbackends_megatron.verify import parity

            par = parity(self.model, backend if has_engine else None, probes)
            if report is not None:
                report.parity = par
        return report

    # ---- DirectWeightSource -------------------------------------------------------------
    def validate_direct(self, target: Any) -> None:
        """Plan against the engine's layout and validate it (single trainer process)."""
        from genbackends_megatron.direct import validate_direct

        validate_direct(self, target)

    def nonfinite_problem(self) -> str | None:
        """The first NaN/Inf among this rank's shards, named (one line), or None. Read where the
        shards are: one fused max-abs reduction per tensor, one host sync."""
        from genbackends_megatron.direct import nonfinite_problem

        return nonfinite_problem(self, lambda k: f"{_loc(k)} {k[1]}")

    def shard_owner(self, key: tuple) -> int:
        """The global trainer rank that sends Megatron shard ``key`` (data-parallel rank 0 of its
        (pp, tp))."""
        (pp, _v, t), _name = key
        return self.topo.where[(pp, t)]

    def write_direct(self, target: Any, *, collective: bool = False, refusal: BaseException | None = None,
                     check_finite: bool = False) -> dict[str, Any] | None:
        """Write the shards straight into the engine parameters (called by the backend's
        ``sync_weights``). One trainer process: plan and write. ``collective=True`` (every
        trainer rank; ``target`` None on ranks without an engine): first all ranks agree on this
        rank's shard check and the backend's ``refusal`` (a rank refused by its backend raises
        that error, the others a :class:`WeightSyncError` naming it), then the collective write.
        Returns the write details on engine ranks, None elsewhere."""
        from genbackends_megatron.direct import agree_then_write, write_direct_local

        if not collective:
            return write_direct_local(self, target)
        return agree_then_write(self, target, refusal, check_finite)


class _HFNamed:
    """Only the HF-named half of a source, so a backend able to take direct writes still runs the
    universal path when that is what the caller asked for."""

    def __init__(self, src: MegatronWeightSource):
        self._src = src

    def manifest(self) -> dict[str, TensorSpec]:
        return self._src.manifest()

    def iter_buckets(self, bucket_bytes: int | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
        return self._src.iter_buckets(bucket_bytes)


class _Unit:
    """One Megatron parameter (all its TP shards of one stage) and the HF tensors it yields."""

    def __init__(self, pp: int, v: int, name: str):
        self.pp, self.v, self.name = pp, v, name
        self.hf: list[str] = []
        self.src_tps: set[int] = set()
        self.pieces: dict[str, list[Piece]] = defaultdict(list)


def _units(plan: Plan) -> list[_Unit]:
    units: dict[tuple, _Unit] = {}
    for p in plan.pieces:
        (pp, v, t), name = p.src
        u = units.get((pp, v, name))
        if u is None:
            u = units[(pp, v, name)] = _Unit(pp, v, name)
        hf = p.dst[1]
        if hf not in u.pieces:
            u.hf.append(hf)
        u.pieces[hf].append(p)
        u.src_tps.add(t)
    out = list(units.values())
    owners: dict[str, int] = {}
    for i, u in enumerate(out):
        for h in u.hf:
            if h in owners:
                raise WeightSyncError(f"HF tensor {h!r} would come from two Megatron parameters")
            owners[h] = i
    return out


def _assemble(u: _Unit, shards: dict, plan: Plan, man: dict, dev: torch.device) -> list[tuple[str, torch.Tensor, bool]]:
    """HF tensors of one unit: ``(name, tensor, copied)``; a tensor that is one contiguous slice
    of one shard (norms, fc1's gate/up at TP 1, row-parallel at TP 1) is a view, not a copy."""
    out = []
    for hf in u.hf:
        pieces = u.pieces[hf]
        spec = man[hf]
        if len(pieces) == 1:
            p = pieces[0]
            view = shards[p.src].narrow(p.axis, p.src_lo, p.length)
            if tuple(view.shape) == tuple(spec.shape) and view.is_contiguous():
                out.append((hf, view, False))
                continue
        t = torch.empty(spec.shape, dtype=spec.dtype, device=dev)
        for dst_view, src_view in _merged_runs(t, pieces, shards):
            dst_view.copy_(src_view)
        out.append((hf, t, True))
    return out


def _merged_runs(t: torch.Tensor, pieces: list, shards: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(destination view, source view) pairs for ``pieces`` of one HF tensor ``t``: runs of equal
    length from one shard at constant spacing on both sides (the Q, K or V rows of every query
    group in Megatron's interleaved ``linear_qkv``) become one strided copy instead of one copy
    per group (8 per tensor at 8B: the kernel launches, not the bytes, were the cost)."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    ordered = sorted(pieces, key=lambda p: p.dst_lo)
    i = 0
    while i < len(ordered):
        p = ordered[i]
        j = i + 1
        if j < len(ordered):
            q = ordered[j]
            dd, ds = q.dst_lo - p.dst_lo, q.src_lo - p.src_lo
            while (j < len(ordered) and ordered[j].src == p.src and ordered[j].axis == p.axis
                   and ordered[j].length == p.length and ordered[j].dst_lo - ordered[j - 1].dst_lo == dd
                   and ordered[j].src_lo - ordered[j - 1].src_lo == ds and dd > 0 and ds > 0):
                j += 1
        count = j - i
        src = shards[p.src]
        if count > 1:
            out.append((runs_view(t, p.axis, p.dst_lo, p.length, count, dd),
                        runs_view(src, p.axis, p.src_lo, p.length, count, ds)))
        else:
            j = i + 1
            out.append((t.narrow(p.axis, p.dst_lo, p.length), src.narrow(p.axis, p.src_lo, p.length)))
        i = j
    return out




def _loc(k) -> str:
    pp, v, t = k[0]
    return f"pp{pp}/vp{v}/tp{t}"
