"""vLLM's own weight-transfer engine as the transport to engine workers in other processes.

vLLM (0.24 on the GPU image, 0.32 here) has a weight-update API the RL ecosystem is converging on:
``LLM.init_weight_transfer_engine`` / ``start_weight_update`` / ``update_weights`` /
``finish_weight_update``, with pluggable engines (``vllm/distributed/weight_transfer/``: ``nccl``
and ``ipc`` in 0.24; 0.32 adds ``nccl_m2n``, ``sparse_nccl``, ``sharded_rdt``). Each engine owns
the wire; vLLM owns the load (its layerwise reload: restore kernel layouts, ``load_weights``,
re-process).

On GPUs :class:`NcclTransferSender` drives vLLM's ``nccl`` engine (trainer and engine on different
GPUs) and :class:`IpcTransferSender` its ``ipc`` engine (one GPU shared by both processes). vLLM's engines all need CUDA,
so on the CPU this module registers one more engine in vLLM's own factory,
:class:`GlooWeightTransferEngine` (``backend: genbackends_gloo``): the same lifecycle as vLLM's
NCCL engine (layerwise reload around the updates, ``load_weights`` per tensor) with a gloo
broadcast as the wire. The engine must be registered in every worker process before the model
loads: the worker extension imports this module (:func:`register`).

Our own group (:mod:`genbackends_vllm.transport`) stays where the installed vLLM lacks the API;
``benchmarks/gpu/transfer_engines.py`` measures both side by side.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

GLOO_BACKEND = "genbackends_gloo"
EXTENSION = "genbackends_vllm.weight_transfer.TransferWorkerExtension"


def has_transfer_api() -> bool:
    """Whether the installed vLLM has the weight-transfer engine API (``WeightTransferConfig``)."""
    try:
        from vllm.config import WeightTransferConfig  # noqa: F401
        from vllm.distributed.weight_transfer import WeightTransferEngineFactory  # noqa: F401
    except Exception:
        return False
    return True


def register() -> bool:
    """Register :class:`GlooWeightTransferEngine` in vLLM's factory (idempotent); False where the
    installed vLLM has no weight-transfer API."""
    if not has_transfer_api():
        return False
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory

    try:
        if GLOO_BACKEND not in getattr(WeightTransferEngineFactory, "_registry", {}):
            WeightTransferEngineFactory.register_engine(GLOO_BACKEND, _engine_class())
    except ValueError:  # registered meanwhile
        pass
    except Exception:  # noqa: BLE001 - another vLLM release's factory: the CPU engine is just absent
        return False
    return True


def backend_for(device: str, same_gpu: bool = False) -> str:
    """The transfer engine to use: on CUDA vLLM's ``ipc`` when the trainer's tensors and the
    engine's worker share the GPU (NCCL refuses two ranks on one device), else its ``nccl``;
    ours (gloo) on the CPU."""
    if device != "cuda":
        return GLOO_BACKEND
    return "ipc" if same_gpu else "nccl"


@dataclass
class GlooInitInfo:
    """Rendezvous of the gloo group: the sender is rank 0, worker ``r`` is ``rank_offset + r``."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int


@dataclass
class GlooUpdateInfo:
    """One chunk: the tensors broadcast next, in order (vLLM's NCCL engine sends the same)."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]


def _engine_class() -> type:
    from vllm.distributed.weight_transfer.base import WeightTransferEngine

    class GlooWeightTransferEngine(WeightTransferEngine):
        """vLLM's NCCL engine's lifecycle over a gloo broadcast (CPU workers)."""

        init_info_cls = GlooInitInfo
        update_info_cls = GlooUpdateInfo
        supports_draft_weight_update = False

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.group: Any = None

        def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
            from genbackends_vllm.transport import SyncGroup
            from vllm.distributed import parallel_state as ps

            rank = init_info.rank_offset + int(ps.get_world_group().rank_in_group)
            self.group = SyncGroup(init_info.master_address, int(init_info.master_port), rank, int(init_info.world_size))

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model)

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            from genbackends_vllm import compat

            finalize_layerwise_reload(self.model, self.model_config)
            compat.repack_vocab_gemms(self.model)  # a tied LM head on the CPU keeps a stale packed copy

        def receive_weights(self, update_info: GlooUpdateInfo) -> None:
            from genbackends_vllm.transport import from_wire

            if self.group is None:
                raise RuntimeError("gloo weight transfer not initialized: call init_weight_transfer_engine first")
            for name, dtype_name, shape in zip(update_info.names, update_info.dtype_names, update_info.shapes):
                wire, weight = from_wire(tuple(shape), getattr(torch, dtype_name))
                self.group.broadcast(wire)
                self.model.load_weights([(name, weight)])

        def update_weights(self, update_info: dict[str, Any]) -> None:
            # the base class ends with torch.accelerator.synchronize(), absent on CPU-only torch
            self.receive_weights(self.parse_update_info(update_info))

        def shutdown(self) -> None:
            if self.group is not None:
                self.group.close()
                self.group = None

    GlooWeightTransferEngine.__qualname__ = GlooWeightTransferEngine.__name__ = "GlooWeightTransferEngine"
    return GlooWeightTransferEngine


def bucket_update_info(bucket: Sequence[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """What a broadcasting engine (vLLM's ``nccl``, our gloo one) is told before one bucket: the
    tensors that follow, in order."""
    return {"names": [n for n, _ in bucket], "dtype_names": [str(t.dtype).replace("torch.", "") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket]}


class WeightUpdateSender:
    """The host side of one of vLLM's weight-transfer engines: per sync :meth:`start` (vLLM's
    ``start_weight_update``: its layerwise reload begins), :meth:`update` once per bucket
    (``update_weights``), :meth:`finish` (``finish_weight_update``: the layers are processed). One
    update per sync, not per bucket: each start/finish walks the whole model (at 8B on an H200,
    2.47 s per-bucket vs 0.41 s per-sync, ``benchmarks/results/h200-async/ipc-2026-12-02c/``)."""

    def start(self) -> None:
        raise NotImplementedError

    def update(self, bucket: Sequence[tuple[str, torch.Tensor]], check: Any = None) -> int:
        """Send one bucket of HF-named tensors; returns bytes sent. ``check`` (raises if the
        engine died) is polled by every wait, so a dead worker fails the sync instead of hanging it."""
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError

    def send(self, buckets: Iterable[Sequence[tuple[str, torch.Tensor]]], check: Any = None) -> int:
        """One whole weight update: start, every bucket, finish; returns bytes sent."""
        self.start()
        sent = sum(self.update(bucket, check) for bucket in buckets)
        self.finish()
        return sent

    def close(self) -> None:
        """Release what the rendezvous opened."""


class TransferEngineSender(WeightUpdateSender):
    """Host side for one ``vllm.LLM`` whose workers live in other processes: the rendezvous
    (``init_weight_transfer_engine``) once, then per sync ``start_weight_update`` ->
    ``update_weights`` per bucket (workers receive while this side broadcasts) ->
    ``finish_weight_update``. CPU tensors travel over gloo (:class:`GlooWeightTransferEngine`)."""

    def __init__(self, llm: Any, num_workers: int, host: str = "127.0.0.1", port: int | None = None):
        from genbackends.background import start_in_background
        from genbackends_vllm.transport import SyncGroup, free_port

        self.llm = llm
        port = port or free_port()
        world = 1 + num_workers
        info = {"master_address": host, "master_port": port, "rank_offset": 1, "world_size": world}
        joined = start_in_background(lambda: llm.init_weight_transfer_engine({"init_info": info}))
        self.group = SyncGroup(host, port, 0, world)
        joined()

    def start(self) -> None:
        self.llm.start_weight_update()

    def finish(self) -> None:
        self.llm.finish_weight_update()

    def update(self, bucket: Sequence[tuple[str, torch.Tensor]], check: Any = None) -> int:
        from genbackends.background import start_in_background
        from genbackends_vllm.transport import to_wire

        sent = 0
        info = bucket_update_info(bucket)
        done = start_in_background(lambda: self.llm.update_weights({"update_info": info}))
        for _, t in bucket:
            w = to_wire(t)
            self.group.broadcast(w, check=check)
            sent += w.numel() * w.element_size()
        done(check=check)
        return sent

    def close(self) -> None:
        shutdown_engine(self.llm)
        self.group.close()


class NcclTransferSender(TransferEngineSender):
    """GPU host side for vLLM's own ``nccl`` engine: the trainer end of its group is vLLM's
    ``StatelessProcessGroup`` + ``PyNcclCommunicator`` (the pattern of vLLM's RLHF examples);
    tensors are sent unpacked, one broadcast each. Not run on the CPU machine."""

    def __init__(self, llm: Any, num_workers: int, host: str = "127.0.0.1", port: int | None = None):
        from genbackends.background import start_in_background
        from genbackends_vllm.transport import free_port
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        self.llm = llm
        port = port or free_port()
        world = 1 + num_workers
        info = {"master_address": host, "master_port": port, "rank_offset": 1, "world_size": world}
        joined = start_in_background(lambda: llm.init_weight_transfer_engine({"init_info": info}))
        pg = StatelessProcessGroup.create(host=host, port=port, rank=0, world_size=world)
        self.comm = PyNcclCommunicator(pg, device=torch.device("cuda", torch.cuda.current_device()))
        joined()

    def update(self, bucket: Sequence[tuple[str, torch.Tensor]], check: Any = None) -> int:
        from genbackends.background import start_in_background

        sent = 0
        info = bucket_update_info(bucket)
        done = start_in_background(lambda: self.llm.update_weights({"update_info": info}))
        for _, t in bucket:
            self.comm.broadcast(t.contiguous(), src=0, stream=torch.cuda.current_stream())
            sent += t.numel() * t.element_size()
        torch.cuda.synchronize()
        done(check=check)
        return sent

    def close(self) -> None:
        shutdown_engine(self.llm)


def gpu_uuid(index: int) -> str:
    """The physical UUID of this process's CUDA device ``index`` (what vLLM's ``ipc`` engine keys
    its handles by: device indices differ between processes, UUIDs do not)."""
    return str(torch.cuda.get_device_properties(index).uuid)


def local_index_of(uuid: str | None) -> int | None:
    """This process's index of the GPU with ``uuid``; None if it is not visible here (or this
    process has no CUDA)."""
    if not uuid or not torch.cuda.is_available():
        return None
    return next((i for i in range(torch.cuda.device_count()) if gpu_uuid(i) == uuid), None)


def engine_kwargs_for(backend: str) -> dict[str, Any]:
    """The ``LLM`` keywords that build an engine with the transfer engine ``backend``: vLLM's
    ``weight_transfer_config`` and the worker extension that registers our CPU engine in its
    factory (and keeps the plugin's own worker methods)."""
    return {"weight_transfer_config": {"backend": backend}, "worker_extension_cls": EXTENSION}


def ipc_device_of(engine_kwargs: dict[str, Any], rpc: Callable[[str, dict[str, Any]], Any]) -> int | None:
    """This process's index of the GPU of an engine's one worker, if the engine was built with
    vLLM's ``ipc`` engine (``engine_kwargs``) and that GPU is visible here; else None. ``rpc``
    reaches the workers (the worker reports its GPU's UUID)."""
    if (engine_kwargs.get("weight_transfer_config") or {}).get("backend") != "ipc":
        return None
    uuids = rpc("genbackends_gpu_uuid", {})
    return local_index_of(uuids[0]) if len(uuids) == 1 else None


def llm_rpc(llm: Any) -> Callable[[str, dict[str, Any]], Any]:
    """``rpc(method, kwargs)`` on every worker of a ``vllm.LLM`` (what its
    ``start_weight_update`` / ``update_weights`` / ... do)."""
    return lambda method, kwargs: llm.collective_rpc(method, kwargs=kwargs)


class IpcTransferSender(WeightUpdateSender):
    """GPU host side for vLLM's own ``ipc`` engine (trainer and engine worker on one GPU, in
    different processes): per bucket, each tensor is exported as a CUDA IPC handle keyed by the
    GPU's UUID and the handles go to the workers' ``update_weights``; the worker opens the
    trainer's memory in place and runs its layerwise load. Only handles cross the process
    boundary.

    The handles are built here rather than by vLLM's ``trainer_send_weights``: that one
    all-gathers them over the default ``torch.distributed`` group, which would hang a trainer of
    several ranks whose one rank hosts the engine. ``rpc(method, kwargs)`` reaches every worker
    (:func:`llm_rpc` for ``vllm.LLM``; the asynchronous engine passes its own), ``device`` is this
    process's index of the engine's GPU: tensors elsewhere (host memory, another GPU) are copied
    there one bucket at a time."""

    def __init__(self, rpc: Callable[[str, dict[str, Any]], Any], device: int):
        self.rpc = rpc
        self.device = torch.device("cuda", device)
        self.uuid = gpu_uuid(device)
        rpc("init_weight_transfer_engine", {"init_info": {}})  # no rendezvous for IPC

    def start(self) -> None:
        self.rpc("start_weight_update", {})  # checkpoint format (layerwise processing): the default

    def update(self, bucket: Sequence[tuple[str, torch.Tensor]], check: Any = None) -> int:
        from torch.multiprocessing.reductions import reduce_tensor

        # strong references until the worker has loaded them: a handle does not keep its
        # storage alive
        held = [t.detach().to(self.device).contiguous() for _, t in bucket]
        torch.cuda.current_stream(self.device).synchronize()  # the copies land before the worker reads
        info = {"names": [n for n, _ in bucket], "dtype_names": [str(t.dtype).replace("torch.", "") for t in held],
                "shapes": [list(t.shape) for t in held], "packed": False,
                "ipc_handles": [{self.uuid: reduce_tensor(t)[1]} for t in held]}
        if check is not None:
            check()
        self.rpc("update_weights", {"update_info": info})
        return sum(t.numel() * t.element_size() for t in held)

    def finish(self) -> None:
        self.rpc("finish_weight_update", {})
        torch.cuda.ipc_collect()

    def close(self) -> None:
        """Nothing to release: IPC holds no group, and the handles of a sync are gone at its end
        (the worker's own shutdown closes its engine)."""


def shutdown_engine(llm: Any) -> None:
    """Shut the engine's weight-transfer engine down (best effort: the engine may be going away)."""
    try:
        llm.shutdown_weight_transfer_engine()
    except Exception:  # noqa: BLE001
        pass


def make_sender(llm: Any, num_workers: int, device: str, same_gpu: bool = False) -> Any:
    """The host side matching :func:`backend_for` ``(device, same_gpu)``."""
    return sender_for(llm, num_workers, backend_for(device, same_gpu))


def sender_for(llm: Any, num_workers: int, backend: str, ipc_device: int | None = None) -> Any:
    """The host side of the transfer engine ``backend`` (``weight_transfer_config.backend``);
    ``ipc_device``: this process's index of the engine's GPU (default: the current device)."""
    if backend == "ipc":
        return IpcTransferSender(llm_rpc(llm), torch.cuda.current_device() if ipc_device is None else ipc_device)
    return NcclTransferSender(llm, num_workers) if backend == "nccl" else TransferEngineSender(llm, num_workers)


def _extension_base() -> type:
    from genbackends_vllm.worker_ext import WeightSyncExtension

    return WeightSyncExtension


class TransferWorkerExtension(_extension_base()):  # type: ignore[misc]
    """The backend's worker extension, plus: importing this module in the worker registers
    :class:`GlooWeightTransferEngine` in vLLM's factory before the model loads. Pass
    ``worker_extension_cls="genbackends_vllm.weight_transfer.TransferWorkerExtension"``."""


register()
