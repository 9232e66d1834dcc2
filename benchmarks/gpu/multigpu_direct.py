"""Direct (plan-driven) sync into colocated engines: every trainer rank hosts one engine rank.

The adapter's ``write_direct_collective`` supports one engine host (all slices travel to it);
with ``external_launcher`` each trainer rank holds its own vLLM worker and ``run_on_workers``
reaches only that one. This module is the glue for that case (gap reported to the adapter
owner):

1. each global rank ``g`` hosts engine TP rank ``g % engine_tp`` of its replica;
2. per destination rank, a pure plan Megatron layout -> that engine rank's vLLM parameters,
   preferring source shards the destination itself holds (replicated norms, equal TP);
3. slices held elsewhere travel once, one packed buffer per (owner, destination) pair, in one
   ``batch_isend_irecv``; the receive buffers persist, so the worker's compiled copy views stay
   cached between syncs;
4. each rank runs the adapter's ``apply_on_worker`` on its own worker: local slices are copied
   straight from the Megatron shards into the engine parameters.

The engine's own parameter layout is checked against the plan before the first sync moves a byte
(all ranks agree on the outcome).
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist


class ColocatedDirectSync:
    """Plans once, then moves bytes on every :meth:`sync` (collective over all trainer ranks)."""

    def __init__(self, source: Any, backend: Any, engine_tp: int):
        from genbackends_megatron.direct import check_engine_layout
        from genbackends_megatron.layout import vllm_layout
        from genbackends_megatron.plan import make_plan
        from genbackends_megatron.topology import agree
        from genbackends_megatron.vllm_glue import logical_params

        t0 = time.perf_counter()
        self.source, self.backend, self.engine_tp = source, backend, engine_tp
        topo = source.topo
        self.me, self.world = topo.rank, topo.world
        dst_all = vllm_layout(source.dims, engine_tp, source.dtype)

        def owner(spec: Any) -> int:
            pp, _v, t = spec.loc
            return topo.where[(pp, t)]

        self.plans: dict[int, Any] = {}
        for g in range(self.world):
            e = g % engine_tp
            dst = {k: v for k, v in dst_all.items() if k[0] == (e,)}
            self.plans[g] = make_plan(source.layout, dst, prefer=lambda s, d, g=g: 0 if owner(s) == g else 1 + owner(s))
        err = None
        try:
            mine = backend.run_on_workers(logical_params)
            if len(mine) != 1:
                err = f"expected one engine worker on rank {self.me}, found {len(mine)}"
            else:
                check_engine_layout(self.plans[self.me].dst, {self.me % engine_tp: mine[0]["params"]})
        except Exception as ex:  # noqa: BLE001 - every rank must learn of it (agree) before raising
            err = f"{type(ex).__name__}: {ex}"
        agree(err)
        shards = source.model.named_shards()
        self.device = next(iter(shards.values())).device
        # Who sends what to whom: pieces grouped per (owner, destination).
        self.sends: dict[int, list[Any]] = defaultdict(list)  # dest -> my pieces it needs
        self.recvs: dict[int, list[Any]] = defaultdict(list)  # owner -> pieces I need from it
        for g, plan in self.plans.items():
            for p in plan.pieces:
                o = owner(plan.src[p.src])
                if o == g:
                    continue
                if o == self.me:
                    self.sends[g].append((plan, p))
                if g == self.me:
                    self.recvs[o].append((plan, p))
        self.recv_bufs = {o: torch.empty(sum(_numel(pl, p) for pl, p in lst), dtype=source.dtype, device=self.device)
                          for o, lst in self.recvs.items()}
        self.ops, self.remote_views = self._ops()
        self.plan_id = id(self.plans[self.me])
        self.plan_seconds = time.perf_counter() - t0
        self.remote_bytes = sum(b.numel() * b.element_size() for b in self.recv_bufs.values())

    def _ops(self) -> tuple[dict[int, dict[str, list]], dict[Any, torch.Tensor]]:
        plan = self.plans[self.me]
        views: dict[Any, torch.Tensor] = {}
        remote_key: dict[Any, Any] = {}
        for o, lst in self.recvs.items():
            off = 0
            for i, (pl, p) in enumerate(lst):
                n = _numel(pl, p)
                shape = list(pl.src[p.src].shape)
                shape[p.axis] = p.length
                key = ("remote", o, i)
                views[key] = self.recv_bufs[o][off:off + n].view(shape)
                remote_key[p] = key
                off += n
        copies, fills = [], []
        for p in plan.pieces:
            if p in remote_key:
                copies.append((remote_key[p], p.dst[1], p.axis, 0, p.dst_lo, p.length))
            else:
                copies.append((p.src, p.dst[1], p.axis, p.src_lo, p.dst_lo, p.length))
        for f in plan.fills:
            fills.append((f.dst[1], f.axis, f.lo, f.length))
        return {self.me % self.engine_tp: {"copy": copies, "fill": fills}}, views

    def sync(self) -> dict[str, Any]:
        """Exchange remote slices, then copy into this rank's engine parameters."""
        from genbackends_megatron.direct import apply_on_worker

        t0 = time.perf_counter()
        shards = {k: v.detach() for k, v in self.source.model.named_shards().items()}
        ops = []
        for g, lst in sorted(self.sends.items()):
            flat = torch.cat([shards[p.src].narrow(p.axis, p.src_lo, p.length).reshape(-1) for _pl, p in lst])
            ops.append(dist.P2POp(dist.isend, flat, g))
        for o, buf in sorted(self.recv_bufs.items()):
            ops.append(dist.P2POp(dist.irecv, buf, o))
        if ops:
            for req in dist.batch_isend_irecv(ops):
                req.wait()
        t1 = time.perf_counter()
        res = self.backend.run_on_workers(apply_on_worker, {"ops": self.ops, "src": {**shards, **self.remote_views},
                                                            "plan_id": self.plan_id})
        for r in self.backend.replicas:
            r.reset_prefix_cache()
        t2 = time.perf_counter()
        return {"exchange_s": t1 - t0, "write_s": t2 - t1, "remote_bytes": self.remote_bytes,
                "written_bytes": int(sum(r["bytes"] for r in res))}


def _numel(plan: Any, p: Any) -> int:
    n = p.length
    for i, d in enumerate(plan.src[p.src].shape):
        if i != p.axis:
            n *= d
    return n
