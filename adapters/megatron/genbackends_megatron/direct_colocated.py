"""The direct path into colocated engines: several trainer ranks each host one engine worker.

With vLLM's ``external_launcher`` executor every trainer rank runs one worker of the engine (or
of one of several data-parallel replicas), and ``run_on_workers`` reaches only that rank's own
worker. A single engine host (:func:`~genbackends_megatron.direct.write_direct_collective`) can
therefore not write every engine rank; here every engine rank writes its own worker:

1. Each engine rank reads the layout its backend publishes (``weight_layout()``: checked by the
   engine against its worker's real parameters) and reports the TP rank of its worker and the
   engine's TP size (all ranks agree on them; a trainer rank that hosts no engine only sends, and
   plans from the first engine rank's layout).
2. Per engine rank, a pure plan Megatron layout -> that worker's parameters, preferring source
   shards the rank itself holds (replicated norms, equal TP). All ranks agree on the outcome
   before a byte moves.
3. Slices held by another rank travel once per sync, one packed buffer per (owner, destination)
   pair, in one ``batch_isend_irecv`` over the trainer's default group (NCCL on GPUs: the
   fast link between the ranks). Receive buffers persist between syncs, so the worker's compiled
   copy views stay cached.
4. Each engine rank hands its copies (local and received slices) to its backend's writer
   (``apply_writes``), which copies them straight into the worker's parameters. The backend's
   ``sync_weights`` (collective form) around it drops the prefix cache, fires the hooks and reports.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

from genbackends.errors import WeightSyncError
from genbackends_megatron.direct import pack_pieces, piece_numel, piece_views, rank_ops, reroute
from genbackends_megatron.topology import agree, all_gather_objects

_CACHE_KEY = "colocated"


class ColocatedDirectWriter:
    """Plans once per (source, engine) pair; :meth:`sync` moves the bytes. Both are collective
    over all trainer ranks (``backend`` on engine ranks, None elsewhere)."""

    def __init__(self, source: Any, backend: Any | None):
        from genbackends_megatron.layout import target_layout
        from genbackends_megatron.plan import make_plan

        t0 = time.perf_counter()
        self.source, self.backend = source, backend
        topo = source.topo
        self.me = topo.rank
        hosts = tuple(source.engine_ranks)
        # 1. The published layout, which engine TP rank lives on which trainer rank, the TP size.
        mine: tuple[int, int, Any] | None = None
        err = None
        if backend is not None:
            try:
                published = backend.weight_layout()
                if len(published.local_ranks) != 1:
                    raise WeightSyncError(f"expected one engine worker in this process, found {len(published.local_ranks)} "
                                          "(colocated engines use the external_launcher executor)")
                # Only the first engine rank ships its layout (the others plan from it too).
                mine = (int(published.local_ranks[0]), int(published.tensor_parallel_size),
                        published if self.me == hosts[0] else None)
            except Exception as ex:  # noqa: BLE001 - every rank must learn of it (agree) before raising
                err = str(ex) if isinstance(ex, WeightSyncError) else f"{type(ex).__name__}: {ex}"
        elif self.me in hosts:
            err = "this rank is listed in engine_ranks but was given no backend"
        agree(err)
        everyone = all_gather_objects(mine)
        self.engine_rank_of = {g: everyone[g][0] for g in hosts}
        sizes = {everyone[g][1] for g in hosts}
        if len(sizes) != 1:
            raise WeightSyncError(f"engine ranks disagree on the engine's TP size: {sorted(sizes)}")
        self.engine_tp = sizes.pop()
        bad = {g: e for g, e in self.engine_rank_of.items() if not 0 <= e < self.engine_tp}
        if bad:
            raise WeightSyncError(f"engine TP rank out of range on trainer rank(s) {bad} (TP {self.engine_tp})")
        # 2. One plan per engine rank, preferring shards the destination holds itself.
        dst_all = target_layout(everyone[hosts[0]][2])

        def owner(loc: tuple[int, int, int]) -> int:
            pp, _v, t = loc
            return topo.where[(pp, t)]

        self.plans: dict[int, Any] = {}
        err = None
        try:
            for g in hosts:
                e = self.engine_rank_of[g]
                dst = {k: v for k, v in dst_all.items() if k[0] == (e,)}
                self.plans[g] = make_plan(source.layout, dst, prefer=lambda s, d, g=g: 0 if owner(s.loc) == g else 1 + owner(s.loc))
        except WeightSyncError as ex:
            err = str(ex)
        agree(err)
        # 3. Who sends which slices to whom.
        shards = source.model.named_shards()
        self.device = next(iter(shards.values())).device
        self.sends: dict[int, list[Any]] = defaultdict(list)  # destination -> my pieces it needs
        self.recvs: dict[int, list[Any]] = defaultdict(list)  # owner -> pieces I need from it
        for g, plan in self.plans.items():
            for p in plan.pieces:
                o = owner(p.src[0])
                if o == g:
                    continue
                if o == self.me:
                    self.sends[g].append(p)
                if g == self.me:
                    self.recvs[o].append(p)
        self.recv_bufs = {o: torch.empty(sum(piece_numel(self.plans[self.me], p) for p in lst), dtype=source.dtype, device=self.device)
                          for o, lst in self.recvs.items()}
        self.remote_bytes = sum(b.numel() * b.element_size() for b in self.recv_bufs.values())
        self.ops, self.remote_views = self._worker_ops() if backend is not None else ({}, {})
        self.plan_id = id(self.plans.get(self.me))
        self.plan_seconds = time.perf_counter() - t0

    def _worker_ops(self) -> tuple[dict[int, dict[str, list]], dict[Any, torch.Tensor]]:
        """This rank's copy/fill list; pieces from other ranks read from views of the receive buffers."""
        plan = self.plans[self.me]
        received = {}
        for o, lst in self.recvs.items():
            for i, (p, view) in enumerate(zip(lst, piece_views(self.recv_bufs[o], plan, lst))):
                received[p] = (f"remote/{o}/{i}", view)
        ops_plan, views = reroute(plan, received)
        e = self.engine_rank_of[self.me]
        return {e: rank_ops(ops_plan, self.engine_tp)[e]}, views

    def sync(self) -> dict[str, Any] | None:
        """Exchange remote slices, then write this rank's engine worker. Returns the write details
        for the backend's report on engine ranks, None elsewhere."""
        from genbackends.weights import PhaseTimer

        timer = PhaseTimer()
        shards = {k: v.detach() for k, v in self.source.model.named_shards().items()}
        sent = 0
        with timer.phase("exchange"):
            ops = []
            for g, lst in sorted(self.sends.items()):
                flat = pack_pieces(shards, lst)
                sent += flat.numel() * flat.element_size()
                ops.append(dist.P2POp(dist.isend, flat, g))
            for o, buf in sorted(self.recv_bufs.items()):
                ops.append(dist.P2POp(dist.irecv, buf, o))
            if ops:
                for req in dist.batch_isend_irecv(ops):
                    req.wait()
        self.source.peak_extra_bytes = self.remote_bytes + sent  # receive buffers + this sync's send buffers
        if self.backend is None:
            return None
        with timer.phase("write"):
            res = self.backend.apply_writes(self.ops, {**shards, **self.remote_views}, plan_id=self.plan_id,
                                            dtype=self.source.dtype)
        return {"transport": "p2p+colocated", "num_tensors": int(res["num_tensors"]), "bytes_moved": int(res["bytes_moved"]),
                "phases": dict(timer.phases),
                "details": {"received_bytes": self.remote_bytes, "sent_bytes": sent, "engine_tp": self.engine_tp,
                            "engine_rank": self.engine_rank_of[self.me], "plan_seconds": self.plan_seconds,
                            "plan_pieces": len(self.plans[self.me].pieces), "writer_transport": res["transport"]}}


def write_direct_colocated(source: Any, backend: Any | None) -> dict[str, Any] | None:
    """Collective direct sync when several trainer ranks host engine workers (``engine_ranks``).
    The plan is built and validated on the first sync into an engine and reused afterwards."""
    writer = source._direct_cache.get(_CACHE_KEY)
    # Rebuild when any rank sees a new engine (a collective decision: all rebuild or none).
    stale = writer is None or writer.backend is not backend
    device = next(iter(source.model.named_shards().values())).device
    if _any_rank(stale, device):
        source._direct_cache[_CACHE_KEY] = writer = ColocatedDirectWriter(source, backend)
    return writer.sync()


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether any trainer rank says ``flag`` (one small all-reduce on the trainer's own device:
    it runs on every sync, where an object all-gather would cost milliseconds on NCCL)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())
    return flag

