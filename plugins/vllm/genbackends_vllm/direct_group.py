"""Direct-path transport to vLLM workers in other processes: our own process group.

The engine host (rank 0 of the group) and each vLLM worker (rank 1 + tp_rank) join a group built
from a ``TCPStore`` (gloo for CPU tensors, NCCL for CUDA tensors), so neither the trainer's nor
vLLM's global ``torch.distributed`` state is touched. Per sync, each worker receives exactly the
slices its parameters need as one packed buffer and copies them into place; only the small copy
list travels through ``run_on_workers``.
"""
from __future__ import annotations

import datetime
import socket
from typing import Any

import torch

from genbackends.background import start_in_background

_GROUP_ATTR = "_genbackends_direct_group"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _make_group(host: str, port: int, rank: int, world: int, nccl: bool, timeout_s: float = 300.0) -> Any:
    from torch.distributed import PrefixStore, TCPStore

    timeout = datetime.timedelta(seconds=timeout_s)
    store = TCPStore(host, port, world, is_master=(rank == 0), timeout=timeout, wait_for_workers=False)
    prefix = PrefixStore("genbackends_direct", store)
    if nccl:
        pg = torch.distributed.ProcessGroupNCCL(prefix, rank, world)
    else:
        pg = torch.distributed.ProcessGroupGloo(prefix, rank, world, timeout)
    return (store, pg)


def join_group(model: Any, tp_rank: int, host: str, port: int, world: int, nccl: bool) -> int:
    """Worker side: join as rank ``1 + tp_rank`` and keep the group on the model."""
    setattr(model, _GROUP_ATTR, _make_group(host, port, 1 + tp_rank, world, nccl))
    return 1 + tp_rank


def receive_and_apply(model: Any, tp_rank: int, payload: dict) -> dict[str, int]:
    """Worker side: receive this rank's packed slices from rank 0, then copy them into place."""
    from genbackends_vllm.direct_writer import apply_ops

    mine = payload["ranks"][tp_rank]  # a list by rank: vLLM's RPC serializer may rewrite dict keys
    dtype = getattr(torch, payload["dtype"])
    dev = next(model.parameters()).device
    _, pg = getattr(model, _GROUP_ATTR)
    total = sum(_prod(s) for s in mine["shapes"])
    buf = torch.empty(total, dtype=dtype, device=dev)
    if total:
        pg.recv([buf], 0, 0).wait()
    srcs, off = {}, 0
    for i, shape in enumerate(mine["shapes"]):
        n = _prod(shape)
        srcs[f"slice/{i}"] = buf[off:off + n].view(tuple(shape))
        off += n
    return apply_ops(model, tp_rank, mine["ops"], srcs, payload["plan_id"])


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class DirectGroup:
    """Host side of the group with one engine's workers (created once per engine)."""

    def __init__(self, target: Any, tp: int, nccl: bool):
        self.tp, self.nccl = tp, nccl
        port = _free_port()
        joined = start_in_background(lambda: target.run_on_workers(join_group, "127.0.0.1", port, 1 + tp, nccl))
        self.store, self.pg = _make_group("127.0.0.1", port, 0, 1 + tp, nccl)
        joined()

    def send_and_apply(self, target: Any, ops: dict, srcs: dict, plan_id: int, dtype: torch.dtype) -> list[dict]:
        """Pack each rank's slices into one buffer, send it, and let the workers apply it."""
        ranks: list = [None] * self.tp
        parts: dict[int, list[torch.Tensor]] = {}
        for r, o in ops.items():
            shapes, new_ops, views = [], [], []
            for i, (src, dst, axis, s_lo, d_lo, n) in enumerate(o["copy"]):
                sl = srcs[src].narrow(axis, s_lo, n)
                shapes.append(list(sl.shape))
                views.append(sl)
                new_ops.append((f"slice/{i}", dst, axis, 0, d_lo, n))
            ranks[r] = {"ops": {"copy": new_ops, "fill": o["fill"]}, "shapes": shapes}
            parts[r] = views
        payload = {"ranks": ranks, "dtype": str(dtype).replace("torch.", ""), "plan_id": plan_id}
        done = start_in_background(lambda: target.run_on_workers(receive_and_apply, payload))
        # One rank's packed buffer at a time: the extra memory is the largest rank's slices.
        self.last_sent_bytes = self.peak_buffer_bytes = 0
        for r in sorted(parts):
            if parts[r]:
                buf = torch.cat([v.reshape(-1) for v in parts[r]])
                buf = buf if self.nccl else buf.cpu()
                self.pg.send([buf], 1 + r, 0).wait()
                nbytes = buf.numel() * buf.element_size()
                self.last_sent_bytes += nbytes
                self.peak_buffer_bytes = max(self.peak_buffer_bytes, nbytes)
                del buf
        res = done()
        return res
