"""The weight-sync protocol between a trainer-side source and a backend.

A backend's ``sync_weights(source)`` accepts any of:

* a :class:`WeightSource` (what weight adapters such as the Megatron one produce);
* a mapping ``{hf_name: tensor}`` or an iterable of ``(hf_name, tensor)`` pairs;
* a path to a folder (or single file) of ``*.safetensors`` in HF naming.

:func:`as_weight_source` turns each into a :class:`WeightSource`. A source announces its full
:meth:`~WeightSource.manifest` (names, shapes, dtypes) *before* any tensor is produced, so a
backend validates the whole sync (unknown names, wrong shapes, coverage) and rejects it before the
first byte is written; the engine keeps serving the old weights.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Protocol, runtime_checkable

import torch

from genbackends.errors import WeightSyncError


def tensor_nbytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    """Bytes of a dense tensor of this shape and dtype (metadata only, nothing allocated)."""
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one HF-named tensor a source will produce."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


@runtime_checkable
class WeightSource(Protocol):
    """Something that yields HF-named tensors in bounded buckets.

    ``manifest()`` must be complete and cheap (metadata only); ``iter_buckets()`` yields lists of
    ``(hf_name, tensor)`` whose names and shapes match the manifest exactly. ``bucket_bytes`` caps
    the size of one bucket (the extra memory a sync needs is about one bucket).
    """

    def manifest(self) -> dict[str, TensorSpec]:
        """Every tensor this source will produce, by HF name."""
        ...

    def iter_buckets(self, bucket_bytes: int | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Yield the tensors in buckets of at most ``bucket_bytes`` (one tensor may exceed it)."""
        ...


class TensorListSource:
    """A :class:`WeightSource` over tensors that already exist (a dict or list of pairs)."""

    def __init__(self, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]):
        items = list(named_tensors.items()) if isinstance(named_tensors, Mapping) else list(named_tensors)
        seen: set[str] = set()
        for i, pair in enumerate(items):
            if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
                raise WeightSyncError(f"weights item {i} is not a (name, tensor) pair: {type(pair).__name__}")
            name, tensor = pair
            if not isinstance(tensor, torch.Tensor):
                raise WeightSyncError(f"weight {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
            if name in seen:
                raise WeightSyncError(f"weight {name!r} appears twice in one sync")
            seen.add(name)
        self._items = items

    def manifest(self) -> dict[str, TensorSpec]:
        return {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in self._items}

    def iter_buckets(self, bucket_bytes: int | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
        yield from bucketize(iter(self._items), bucket_bytes)


class SafetensorsFolderSource:
    """A :class:`WeightSource` reading ``*.safetensors`` files of an HF-format folder lazily."""

    def __init__(self, path: str | os.PathLike[str]):
        p = Path(path)
        files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
        if not files or not all(f.is_file() for f in files):
            raise WeightSyncError(f"no *.safetensors file found at {str(p)!r}")
        self._where: dict[str, Path] = {}
        self._specs: dict[str, TensorSpec] = {}
        for f in files:
            with _open_safetensors(f) as fh:
                for name in fh.keys():
                    if name in self._where:
                        raise WeightSyncError(f"weight {name!r} is in both {self._where[name].name} and {f.name}")
                    sl = fh.get_slice(name)
                    self._where[name] = f
                    self._specs[name] = TensorSpec(tuple(sl.get_shape()), _dtype_from_safetensors(sl.get_dtype()))

    def manifest(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def iter_buckets(self, bucket_bytes: int | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
        def pairs() -> Iterator[tuple[str, torch.Tensor]]:
            by_file: dict[Path, list[str]] = {}
            for name, f in self._where.items():
                by_file.setdefault(f, []).append(name)
            for f, names in by_file.items():
                with _open_safetensors(f) as fh:
                    for name in names:
                        try:
                            t = fh.get_tensor(name)
                        except Exception as e:  # noqa: BLE001 - the file changed or broke since the manifest
                            raise WeightSyncError(f"cannot read {name!r} from safetensors file {str(f)!r}: {e}") from None
                        yield name, t

        yield from bucketize(pairs(), bucket_bytes)


def _open_safetensors(f: Path) -> Any:
    """``safe_open`` whose failure (a truncated or corrupt file) is a WeightSyncError naming it."""
    from safetensors import safe_open

    try:
        return safe_open(str(f), framework="pt")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError)
        raise WeightSyncError(f"cannot read safetensors file {str(f)!r}: {e}") from None


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _dtype_from_safetensors(code: str) -> torch.dtype:
    try:
        return _SAFETENSORS_DTYPES[code]
    except KeyError:
        raise WeightSyncError(f"unsupported safetensors dtype {code!r}") from None


def bucketize(
    pairs: Iterator[tuple[str, torch.Tensor]], bucket_bytes: int | None
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group ``(name, tensor)`` pairs, in order, into lists of at most ``bucket_bytes`` (a single
    larger tensor gets a bucket of its own; ``None`` or 0: one bucket). Lazy: a pair is pulled
    from ``pairs`` only when the bucket it may join is being filled."""
    if not bucket_bytes:
        yield list(pairs)
        return
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in pairs:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


def as_weight_source(source: Any) -> WeightSource:
    """Normalise what users pass to ``sync_weights`` into a :class:`WeightSource`."""
    if isinstance(source, (str, os.PathLike)):
        return SafetensorsFolderSource(source)
    if isinstance(source, WeightSource) and not isinstance(source, (Mapping, list, tuple)):
        return source
    if isinstance(source, Mapping) or isinstance(source, Iterable):
        return TensorListSource(source)
    raise WeightSyncError(
        f"sync_weights got a {type(source).__name__}; pass a WeightSource, a dict or (name, tensor) "
        "pairs of HF-named tensors, or a safetensors folder path"
    )


def validate_manifest(
    manifest: Mapping[str, TensorSpec],
    expected: Mapping[str, tuple[int, ...]],
    *,
    require_complete: bool = False,
    what: str = "engine",
) -> None:
    """Check a source's manifest against the target's expected HF names and shapes.

    Raises :class:`WeightSyncError` naming every unknown name and every wrong shape (first few of
    each), and when ``require_complete`` every expected name the source lacks. Nothing is written
    before this passes.
    """
    unknown = [n for n in manifest if n not in expected]
    wrong = [
        f"{n}: got {tuple(spec.shape)}, {what} expects {tuple(expected[n])}"
        for n, spec in manifest.items()
        if n in expected and tuple(spec.shape) != tuple(expected[n])
    ]
    missing = [n for n in expected if n not in manifest] if require_complete else []
    problems = []
    if unknown:
        problems.append(f"unknown weight name(s) {_head(unknown)}")
    if wrong:
        problems.append(f"wrong shape(s) {_head(wrong)}")
    if missing:
        problems.append(f"missing weight(s) {_head(missing)}")
    if not manifest:
        problems.append("the source holds no weights")
    if problems:
        raise WeightSyncError("weight sync rejected, nothing written: " + "; ".join(problems))


def _head(items: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(i) for i in items[:n])
    return shown + (f" (+{len(items) - n} more)" if len(items) > n else "")


@dataclass
class SyncReport:
    """What one ``sync_weights`` did.

    ``phases`` maps phase names (``validate``, ``gather``, ``load``, ``reset_cache``, ...) to
    seconds; ``parity`` holds ``max_abs_diff``/``mean_abs_diff`` of prompt logprobs against the
    trainer's own forward when verification ran.
    """

    path: str
    transport: str
    num_tensors: int = 0
    bytes_moved: int = 0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    peak_extra_bytes: int | None = None
    parity: dict[str, float] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PhaseTimer:
    """Accumulates wall time per named phase: ``with timer.phase("load"): ...``."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def phase(self, name: str) -> "_Phase":
        return _Phase(self, name)

    @property
    def total(self) -> float:
        return time.perf_counter() - self._t0


class _Phase:
    def __init__(self, timer: PhaseTimer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timer.phases[self.name] = self.timer.phases.get(self.name, 0.0) + time.perf_counter() - self.t0


@runtime_checkable
class DirectWeightSource(Protocol):
    """A source that can write its shards straight into an engine's own parameter storage.

    The direct path: instead of producing full HF-named tensors, the source computes a plan from
    metadata (which slices of which trainer shards land in which engine parameter) between its own
    layout and the layout the engine publishes (``target.weight_layout()``, a
    :class:`~genbackends.weight_layout.WeightLayout`), and hands the writes to the engine's writer
    (``target.apply_writes``). It is always driven by the backend's ``sync_weights(source,
    path="direct")``, which validates, guards, invalidates caches, fires hooks and reports around
    it: ``validate_direct(target)`` (the whole plan, before any byte moves) then
    ``write_direct(target)``. A source spread over several trainer ranks also offers
    ``write_direct(target, collective=True, refusal=...)``, called on every rank (``target`` None
    where no engine lives) through ``sync_weights(source, path="direct", collective=True)``.
    Backends without direct writes fall back to the HF-named ``iter_buckets``.
    """

    def manifest(self) -> dict[str, TensorSpec]:
        ...

    def iter_buckets(self, bucket_bytes: int | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
        ...

    def validate_direct(self, target: "DirectWriteTarget") -> None:
        """Raise :class:`WeightSyncError` if the plan does not cover the target exactly."""
        ...

    def write_direct(self, target: "DirectWriteTarget") -> dict[str, Any]:
        """Move the bytes; return details (``bytes_moved``, per-phase seconds) for the report."""
        ...


@runtime_checkable
class DirectWriteTarget(Protocol):
    """What a backend offers the direct path: the layout of its engine's parameters, published
    (:meth:`weight_layout`), and a writer applying a planner's writes to them (:meth:`apply_writes`).
    ``run_on_workers`` is the lower-level hook both are built on."""

    def weight_layout(self) -> Any:
        """The engine's :class:`~genbackends.weight_layout.WeightLayout` (per rank and parameter:
        HF sources, shape, dtype, shard axis, runs), checked against its live parameters."""
        ...

    def apply_writes(self, ops: Any, sources: dict, *, plan_id: int, transport: str = "auto", dtype: Any = None) -> dict[str, Any]:
        """Apply :data:`~genbackends.weight_layout.WriteOps` reading slices of ``sources`` on every
        reachable worker; returns ``bytes_moved``, ``num_tensors``, ``transport``, ``phases``."""
        ...

    def run_on_workers(self, fn: Any, *args: Any, **kwargs: Any) -> list[Any]:
        """Call ``fn(model, tp_rank, *args, **kwargs)`` next to every worker's model; results in
        rank order."""
        ...
