"""Our own weight-sync process group between the backend (rank 0) and vLLM's worker processes.

Built straight from a ``TCPStore`` and ``ProcessGroupGloo`` (NCCL on GPUs would be the same
shape), so it neither needs nor disturbs the global ``torch.distributed`` state of the trainer or
of vLLM's workers. Rank 0 broadcasts each tensor; workers receive into fresh buffers and load
them with ``reload_weights``. Used when the engine's workers live in other processes; the
in-process path hands tensors over directly.
"""
from __future__ import annotations

import datetime
import os
import socket
import time
from typing import Any, Callable

import torch

_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool)}


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dtype_from_str(name: str) -> torch.dtype:
    return _DTYPES[name]


def sync_timeout_s() -> float:
    """Bound of every wait of the sync group (rendezvous and each broadcast), in seconds:
    ``GENBACKENDS_SYNC_TIMEOUT_S`` (read by the backend and by vLLM's workers alike), default 60.
    The backend side also polls the engine's processes while it waits, so a dead worker ends its
    wait in about a second; this bound is what a worker waits for a sender that died."""
    raw = os.environ.get("GENBACKENDS_SYNC_TIMEOUT_S", "60")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"GENBACKENDS_SYNC_TIMEOUT_S must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"GENBACKENDS_SYNC_TIMEOUT_S must be > 0, got {raw!r}")
    return value


class SyncGroup:
    """A gloo group of ``world_size`` ranks; rank 0 is the sender."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float | None = None):
        from torch.distributed import PrefixStore, TCPStore

        timeout_s = sync_timeout_s() if timeout_s is None else timeout_s
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        try:
            self.store = TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout, wait_for_workers=False)
            self.pg = torch.distributed.ProcessGroupGloo(PrefixStore("genbackends_sync", self.store), rank, world_size, timeout)
        except Exception as e:
            raise RuntimeError(
                f"weight-sync group rendezvous at {host}:{port} (rank {rank} of {world_size}) failed within "
                f"{timeout_s:g} s ({_first_line(e)}): a peer died or never joined; the bound is "
                "GENBACKENDS_SYNC_TIMEOUT_S"
            ) from e

    def broadcast(self, tensor: torch.Tensor, check: Callable[[], Any] | None = None) -> torch.Tensor:
        """Broadcast ``tensor`` from rank 0 in place (contiguous CPU tensors). ``check`` (may
        raise) is polled while the broadcast waits for its peers."""
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank = 0
        opts.rootTensor = 0
        work = self.pg.broadcast([tensor], opts)
        if check is not None:
            _poll(work, check)
        try:
            work.wait()
        except Exception as e:
            peer = "a receiving engine worker" if self.rank == 0 else "the sender (rank 0, the backend process)"
            raise RuntimeError(
                f"weight-sync group: broadcast of a {tuple(tensor.shape)} tensor failed ({_first_line(e)}): "
                f"{peer} died or stalled past {self.timeout_s:g} s (GENBACKENDS_SYNC_TIMEOUT_S)"
            ) from e
        return tensor

    def close(self) -> None:
        self.pg = None
        self.store = None


def _first_line(e: BaseException) -> str:
    return (f"{type(e).__name__}: {e}".splitlines() or [""])[0][:300]


def _poll(work: Any, check: Callable[[], Any]) -> None:
    # Spin briefly (most broadcasts finish in microseconds), then back off to 50 ms.
    delay = 0.0
    last_check = time.monotonic()
    while not work.is_completed():
        if time.monotonic() - last_check >= 0.2:
            check()
            last_check = time.monotonic()
        time.sleep(delay)
        delay = min(0.05, delay * 2 or 1e-4)


def to_wire(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor gloo can broadcast. gloo has no bf16 (nor int16: "Invalid scalar
    type", seen on the H200 lane): bf16 travels as the raw bits of an fp16 tensor of the same
    size (a broadcast copies bytes, it never computes on them)."""
    t = t.detach().contiguous().cpu()
    return t.view(torch.float16) if t.dtype == torch.bfloat16 else t


def from_wire(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(receive buffer, tensor view of it in ``dtype``)."""
    if dtype == torch.bfloat16:
        buf = torch.empty(shape, dtype=torch.float16)
        return buf, buf.view(torch.bfloat16)
    buf = torch.empty(shape, dtype=dtype)
    return buf, buf


def meta_of(pairs: list[tuple[str, torch.Tensor]]) -> list[tuple[str, tuple[int, ...], str]]:
    return [(n, tuple(t.shape), str(t.dtype)) for n, t in pairs]


def receive_bucket(group: SyncGroup, meta: list[tuple[str, tuple[int, ...], str]]) -> list[tuple[str, Any]]:
    """Worker side: receive one bucket announced by ``meta``."""
    out = []
    for name, shape, dtype in meta:
        buf, view = from_wire(tuple(shape), dtype_from_str(dtype))
        group.broadcast(buf)
        out.append((name, view))
    return out


def pack_bytes(pairs: list[tuple[str, torch.Tensor]]) -> list[tuple[str, tuple[int, ...], str, bytes]]:
    """(name, shape, dtype, raw bytes) per tensor: survives any RPC encoding."""
    return [(n, tuple(t.shape), str(t.dtype), to_wire(t).numpy().tobytes()) for n, t in pairs]


def unpack_bytes(packed: list[Any]) -> list[tuple[str, torch.Tensor]]:
    """Inverse of :func:`pack_bytes`."""
    out = []
    for name, shape, dtype, raw in packed:
        buf, view = from_wire(tuple(shape), dtype_from_str(dtype))
        if buf.numel():
            buf.view(-1).copy_(torch.frombuffer(bytearray(raw), dtype=buf.dtype))
        out.append((name, view))
    return out
