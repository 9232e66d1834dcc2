"""Methods mixed into every vLLM worker (``worker_extension_cls``) for weight sync: our own
process group, raw-byte RPC, and the in-place reload every transport ends in. Called by name
through ``collective_rpc`` so no callable has to be pickled.

Every reload goes through :meth:`WeightSyncExtension.genbackends_reload`, which follows vLLM's
``reload_weights`` with the platform fix-ups it misses (:func:`compat.repack_vocab_gemms`: a tied
LM head on the CPU; :func:`compat.repack_cpu_moe_experts`: fused experts on the CPU), so the
engine is correct after any transport."""
from __future__ import annotations

from typing import Any

from genbackends_vllm import compat
from genbackends_vllm.snapshot import ModuleSnapshot, abort_layerwise_reload, scrub_kv_cache, touched_modules
from genbackends_vllm.transport import SyncGroup, receive_bucket, unpack_bytes


class WeightSyncExtension:
    """Worker-side half of :mod:`genbackends_vllm.transport` (``self`` is the vLLM worker)."""

    def genbackends_reload(self, weights_iterator: Any = None, weights_path: str | None = None) -> int:
        """vLLM's in-place ``reload_weights`` (HF-named tensors, or a folder the worker reads),
        then re-pack what it leaves stale; returns how many layers were re-packed. A reload that
        raises half way is undone first (its layers put back from the meta device), so a
        snapshot restore finds a consistent model."""
        names = None
        if weights_iterator is not None and compat.is_cpu_platform():
            weights_iterator = list(weights_iterator)  # the names tell which experts to re-pack
            names = [n for n, _ in weights_iterator]
        try:
            self.reload_weights(weights_iterator=weights_iterator, weights_path=weights_path)  # type: ignore[attr-defined]
        except BaseException:
            abort_layerwise_reload(compat.worker_model(self))
            raise
        model = compat.worker_model(self)
        return compat.repack_vocab_gemms(model) + compat.repack_cpu_moe_experts(model, names)

    # ---- atomic syncs (see genbackends_vllm.snapshot) -------------------------------------
    def genbackends_snapshot(self, hf_names: list[str] | None) -> dict[str, float]:
        """Save the modules the HF-named tensors ``hf_names`` land in (None: all); returns the
        cost (``bytes_device``, ``bytes_host``, ``bytes_retained``, ``seconds``). Replaces an older
        snapshot of this worker."""
        model = compat.worker_model(self)
        self._genbackends_snapshot = None
        snap = ModuleSnapshot(touched_modules(model, hf_names))
        self._genbackends_snapshot = snap
        return dict(snap.stats)

    def genbackends_restore(self) -> dict[str, float]:
        """Put the snapshotted modules back (after undoing a half-done reload) and drop the
        snapshot; ``{}`` if this worker holds none."""
        snap = getattr(self, "_genbackends_snapshot", None)
        self.genbackends_abort_update()  # a half-done reload, and a transfer-engine update left open
        if snap is None:
            return {}
        out = snap.restore()
        self._genbackends_snapshot = None
        return out

    def genbackends_abort_update(self) -> bool:
        """End a transfer-engine weight update that a failed sync left open: the layers its
        layerwise reload took apart are put back, the session closed. Whether one was open."""
        abort_layerwise_reload(compat.worker_model(self))
        return compat.end_weight_update_session(self)

    def genbackends_drop_snapshot(self) -> None:
        """Free the snapshot after a sync succeeded."""
        self._genbackends_snapshot = None

    def genbackends_scrub_kv(self) -> int:
        """Zero this worker's KV-cache memory (see :func:`snapshot.scrub_kv_cache`)."""
        return scrub_kv_cache(self)

    def genbackends_sync_open(self, host: str, port: int, world_size: int) -> int:
        """Join the sync group as rank ``1 + worker rank``; returns that rank."""
        rank = 1 + int(self.rank)  # type: ignore[attr-defined]
        self._genbackends_group = SyncGroup(host, port, rank, world_size)
        return rank

    def genbackends_sync_bucket(self, meta: list[tuple[str, tuple[int, ...], str]]) -> int:
        """Receive one bucket from rank 0 and load it in place; returns tensors loaded."""
        pairs = receive_bucket(self._genbackends_group, meta)
        self.genbackends_reload(weights_iterator=pairs)
        return len(pairs)

    def genbackends_reload_packed(self, packed: list[Any]) -> int:
        """Load tensors sent as raw bytes through ``collective_rpc`` (the ``rpc`` transport)."""
        pairs = unpack_bytes(packed)
        self.genbackends_reload(weights_iterator=pairs)
        return len(pairs)

    def genbackends_sync_close(self) -> None:
        group = getattr(self, "_genbackends_group", None)
        if group is not None:
            group.close()
        self._genbackends_group = None

    def genbackends_gpu_uuid(self) -> str | None:
        """The physical UUID of this worker's GPU (None on the CPU): the host side of vLLM's
        ``ipc`` engine is used only where it sees the same GPU."""
        import torch

        from genbackends_vllm.weight_transfer import gpu_uuid

        if compat.is_cpu_platform() or not torch.cuda.is_available():
            return None
        return gpu_uuid(torch.cuda.current_device())

    def genbackends_param_layout(self) -> dict[str, Any]:
        """Engine parameter names -> (shape, dtype string) of this worker."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        return {n: (tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()}
