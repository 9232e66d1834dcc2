"""Which global rank holds which (pipeline stage, tensor rank) shard, agreed by all trainer ranks.

Data-parallel replicas hold identical weights; only data-parallel rank 0 sends.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from genbackends.errors import WeightSyncError


@dataclass
class Topology:
    """Global ranks of the model's (pp, tp) coordinates (data-parallel rank 0)."""

    rank: int
    world: int
    coords: dict[int, tuple[int, int, int]]  # global rank -> (pp, tp, dp)
    where: dict[tuple[int, int], int]  # (pp, tp) -> global rank (dp 0)

    @classmethod
    def gather(cls) -> "Topology":
        """Collective over the default group: every rank contributes its coordinates."""
        from megatron.core import parallel_state as ps

        mine = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank())
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return cls(0, 1, {0: mine}, {(mine[0], mine[1]): 0})
        allc: list = [None] * dist.get_world_size()
        dist.all_gather_object(allc, mine)
        coords = {r: tuple(c) for r, c in enumerate(allc)}
        where = {(c[0], c[1]): r for r, c in coords.items() if c[2] == 0}
        return cls(dist.get_rank(), dist.get_world_size(), coords, where)

    def leader(self, pp: int) -> int:
        """The rank that assembles stage ``pp``'s tensors (its TP rank 0)."""
        return self.where[(pp, 0)]


def all_gather_objects(obj: object) -> list:
    """Every trainer rank's ``obj`` in rank order (``[obj]`` in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def agree(error: str | None) -> None:
    """All trainer ranks learn whether any rank found a problem; everyone raises the same error.

    A sync is collective: one rank rejecting it alone would leave the others waiting in a
    collective. Called before any byte moves.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        errs = all_gather_objects(error)
        msgs: dict[str, list[int]] = {}
        for r, e in enumerate(errs):
            if e:
                msgs.setdefault(e, []).append(r)
        if msgs:
            raise WeightSyncError("; ".join(f"{m} (rank {','.join(map(str, rs))})" for m, rs in msgs.items()))
    elif error:
        raise WeightSyncError(error)
