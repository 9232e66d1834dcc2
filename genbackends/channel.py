"""A weight channel for the separate (disaggregated) layout: the engine runs on other GPUs, in
processes outside the trainer's process groups, and fresh weights travel over a stand-alone group.

Rank 0 of the channel is the sender (the trainer process that assembles full tensors, e.g. the
Megatron stage leader that ``MegatronWeightSource.iter_buckets`` hands them to); ranks 1.. are the
engine's ranks (one per engine process: a TP engine with the ``external_launcher`` executor has
one per TP rank, an engine with its own worker processes has one). Neither side's default
``torch.distributed`` group is touched: the channel builds its own group from a ``TCPStore``
(NCCL for CUDA tensors, gloo otherwise).

One sync, collective over the channel::

    # trainer (channel rank 0)                 # every engine rank
    channel.send(source)                       report = channel.receive(backend)

1. The sender posts the source's manifest in the store.
2. Each receiver's ``backend.sync_weights`` validates it against the engine (names and shapes
   against the engine's expected HF weights, floating-point dtypes: a dtype that differs from
   the engine's is converted on load, not refused) and acknowledges when it first asks for
   tensors; a refusal is posted instead. The sender waits for every answer: if any receiver
   refused, no byte is sent, every receiver raises, and so does the sender, naming the receiver
   and its reason. No engine is written. This handshake covers refusals *before* the first
   tensor only: a receiver that fails after acknowledging (while tensors stream, e.g. a
   non-finite bucket or a load error) is not announced to the others; they learn of it only when
   the group's collectives fail or time out.
3. Per bucket, the sender posts the bucket's names/shapes/dtypes, then broadcasts its tensors;
   receivers hand them to the engine's loader bucket by bucket (the extra memory is one bucket).
"""
from __future__ import annotations

import datetime
import pickle
from typing import Any, Iterator

import torch

from genbackends.errors import WeightSyncError
from genbackends.weights import SyncReport, TensorSpec, WeightSource, bucketize

_PREFIX = "genbackends_channel"


class WeightChannel:
    """One end of a sender -> engine-ranks channel (create it on every member, same host/port).

    ``rank`` 0 sends, ``1..world-1`` receive. ``device``: where tensors travel (a CUDA device
    makes it an NCCL group, the CPU a gloo group). ``host``/``port``: a free TCP port the sender
    listens on (the channel's store)."""

    def __init__(self, host: str, port: int, rank: int, world: int, *, device: torch.device | str = "cpu",
                 timeout_s: float = 300.0):
        from torch.distributed import PrefixStore, TCPStore

        if world < 2:
            raise ValueError(f"a weight channel needs a sender and at least one receiver, got world={world}")
        if not 0 <= rank < world:
            raise ValueError(f"channel rank {rank} outside 0..{world - 1}")
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.device = torch.device(device)
        timeout = datetime.timedelta(seconds=timeout_s)
        self.store = TCPStore(host, port, world, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
        group_store = PrefixStore(f"{_PREFIX}/group", self.store)
        if self.device.type == "cuda":
            self.pg = torch.distributed.ProcessGroupNCCL(group_store, rank, world)
        else:
            self.pg = torch.distributed.ProcessGroupGloo(group_store, rank, world, timeout)
        self._sync = 0
        self._old_keys: list[list[str]] = []

    # ---- both sides ---------------------------------------------------------------------------
    def broadcast(self, t: torch.Tensor) -> None:
        """Broadcast ``t`` from the sender to every receiver (in place on receivers)."""
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        try:
            self.pg.broadcast([t], opts).wait()
        except Exception as e:
            peer = "an engine rank" if self.rank == 0 else "the sender (rank 0)"
            raise WeightSyncError(
                f"weight channel rank {self.rank}: broadcast of a {tuple(t.shape)} tensor failed "
                f"({_first_line(e)}): {peer} died or stalled past timeout_s={self.timeout_s:g} s"
            ) from e

    def _get(self, key: str, what: str) -> bytes:
        """``store.get`` whose timeout says what was awaited, from whom, and which knob bounds it."""
        try:
            return self.store.get(key)
        except Exception as e:  # torch's DistStoreError: "wait timeout after Nms, keys: ..."
            raise WeightSyncError(
                f"weight channel rank {self.rank}: no {what} within timeout_s={self.timeout_s:g} s "
                f"({_first_line(e)}): that process died, or is slower than the channel's timeout_s"
            ) from e

    def barrier(self) -> None:
        """Every member of the channel has reached this point (a 1-element all-reduce)."""
        t = torch.zeros(1, device=self.device)
        self.pg.allreduce([t]).wait()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _key(self, k: int, *parts: Any) -> str:
        return "/".join([_PREFIX, str(k), *map(str, parts)])

    # ---- sender -------------------------------------------------------------------------------
    def send(self, source: WeightSource, bucket_bytes: int | None = None, *, drain_on_abort: bool = True) -> dict[str, Any]:
        """Sender: one sync of ``source`` to every receiver. Returns ``{"bytes", "tensors",
        "buckets"}``. If a receiver refuses, raises :class:`WeightSyncError` before sending; with
        ``drain_on_abort`` it still iterates ``source`` (without sending) first, so trainer ranks
        that iterate with it collectively (a Megatron source) are not left waiting."""
        self._require(0, "send")
        k = self._next_sync()
        keys = [self._key(k, "manifest"), self._key(k, "go")]
        man = {n: (tuple(s.shape), _dtype_name(s.dtype)) for n, s in source.manifest().items()}
        self.store.set(keys[0], pickle.dumps(man))
        refusals = []
        for r in range(1, self.world):
            keys.append(self._key(k, "ack", r))
            answer = self._get(keys[-1], f"answer from engine rank {r}").decode()
            if answer:
                refusals.append(f"engine rank {r}: {answer}")
        if refusals:
            self.store.set(keys[1], b"abort")
            if drain_on_abort:
                for _ in source.iter_buckets(bucket_bytes):
                    pass
            raise WeightSyncError("weight channel: sync refused, nothing sent: " + "; ".join(refusals))
        self.store.set(keys[1], b"go")
        sent = tensors = buckets = 0
        for bucket in source.iter_buckets(bucket_bytes):
            keys.append(self._key(k, "bucket", buckets))
            self.store.set(keys[-1], pickle.dumps([(n, tuple(t.shape), _dtype_name(t.dtype)) for n, t in bucket]))
            for _n, t in bucket:
                t = t.detach()
                t = t if t.device == self.device and t.is_contiguous() else t.to(self.device).contiguous()
                self.broadcast(t)
                sent += t.numel() * t.element_size()
                tensors += 1
            buckets += 1
        keys.append(self._key(k, "bucket", buckets))
        self.store.set(keys[-1], pickle.dumps(None))  # end of this sync
        self._forget(keys)
        return {"bytes": sent, "tensors": tensors, "buckets": buckets}

    def _forget(self, keys: list[str]) -> None:
        # Receivers may still read this sync's keys; those of the sync before are done with.
        self._old_keys.append(keys)
        while len(self._old_keys) > 2:
            for key in self._old_keys.pop(0):
                self.store.delete_key(key)

    # ---- receiver -----------------------------------------------------------------------------
    def receive(self, backend: Any) -> SyncReport:
        """Receiver: one sync into ``backend`` (its ``sync_weights`` validates, then loads the
        tensors as they arrive). Raises :class:`WeightSyncError` if any receiver refused."""
        self._require_receiver()
        k = self._next_sync()
        src = ChannelSource(self, k)
        try:
            return backend.sync_weights(src)
        except Exception as e:
            if not src.answered:  # refused before streaming: tell the sender, who sends nothing
                self.store.set(self._key(k, "ack", self.rank), f"{type(e).__name__}: {e}".encode() or b"refused")
            raise

    def _next_sync(self) -> int:
        self._sync += 1
        return self._sync

    def _require(self, rank: int, what: str) -> None:
        if self.rank != rank:
            raise WeightSyncError(f"weight channel: {what}() is for channel rank {rank}, this is rank {self.rank}")

    def _require_receiver(self) -> None:
        if self.rank == 0:
            raise WeightSyncError("weight channel: receive() is for the engine ranks (1..), this is the sender")


class ChannelSource:
    """The :class:`~genbackends.weights.WeightSource` a receiver hands its backend for one sync:
    the manifest comes from the sender's post, tensors from the channel as they arrive."""

    def __init__(self, channel: WeightChannel, sync: int):
        self.channel, self.sync = channel, sync
        self.answered = False
        self._manifest: dict[str, TensorSpec] | None = None

    def manifest(self) -> dict[str, TensorSpec]:
        if self._manifest is None:
            raw = pickle.loads(self.channel._get(self.channel._key(self.sync, "manifest"), "manifest from the sender (rank 0)"))
            self._manifest = {n: TensorSpec(tuple(s), _dtype(d)) for n, (s, d) in raw.items()}
        return self._manifest

    def iter_buckets(self, bucket_bytes: int | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
        ch = self.channel
        # The backend asks for tensors only after validating the manifest: acknowledge, then wait
        # for every other receiver's answer (the sender's go).
        ch.store.set(ch._key(self.sync, "ack", ch.rank), b"")
        self.answered = True
        if ch._get(ch._key(self.sync, "go"), "go from the sender (rank 0)") != b"go":
            raise WeightSyncError("weight channel: another engine rank refused this sync; nothing was written")

        def received() -> Iterator[tuple[str, torch.Tensor]]:
            i = 0
            while True:
                meta = pickle.loads(ch._get(ch._key(self.sync, "bucket", i), f"bucket {i} from the sender (rank 0)"))
                if meta is None:
                    return
                for name, shape, dtype in meta:
                    t = torch.empty(shape, dtype=_dtype(dtype), device=ch.device)
                    ch.broadcast(t)
                    yield name, t
                i += 1

        yield from bucketize(received(), bucket_bytes or (256 << 20))


def _first_line(e: BaseException) -> str:
    return (f"{type(e).__name__}: {e}".splitlines() or [""])[0][:300]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise WeightSyncError(f"weight channel: unknown dtype {name!r} in the sender's manifest")
    return dt
