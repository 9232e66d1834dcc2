"""What makes a weight sync safe, whatever the backend: every tensor a source produces is checked
against the manifest it announced (name, shape, dtype) and for finite values *before* it is
written, and a failure names the tensor and says what became of the engine.

Backends combine these checks with a snapshot of the parameters a sync touches (restored when
anything fails mid-stream); see ``docs/reliability.md`` for the design and its measured cost.

* :func:`refuse_non_float` - int/bool weights are refused on every backend (a silent cast turned
  ``(t * 1000).long()`` into logprobs off by 8.9e6 in the campaign of issue 14);
* :class:`StreamChecker` - one per sync: each bucket against the manifest (unknown or repeated
  names, shape, dtype), then finite values; :meth:`StreamChecker.finish` reports tensors the
  manifest announced but the source never produced;
* :func:`nonfinite_problem` - the finite check where the bytes are (CPU or GPU): one fused
  norm per bucket (``torch._foreach_norm``; NaN and Inf propagate), one host synchronisation per
  bucket, each byte read once. Only a flagged bucket is scanned again, exactly, to name the
  offending tensor and element.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch

from genbackends.errors import WeightSyncError

UNCHANGED = "nothing was written, the engine is unchanged"
RESTORED = "the engine was restored to its previous weights"


class SyncRefused(WeightSyncError):
    """A sync refused by a safety check. ``problem`` says what was wrong (tensor name, shape,
    index); the backend adds what became of the engine (``UNCHANGED`` or ``RESTORED``)."""

    def __init__(self, problem: str, outcome: str = UNCHANGED):
        self.problem = problem
        self.outcome = outcome
        super().__init__(f"weight sync refused ({outcome}): {problem}")

    def with_outcome(self, outcome: str) -> "SyncRefused":
        return SyncRefused(self.problem, outcome)


def one_line(text: str, limit: int = 400) -> str:
    """``text`` on one line, at most ``limit`` characters (error messages)."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def refuse_non_float(specs: Mapping[str, Any]) -> None:
    """Raise :class:`SyncRefused` if any announced tensor is not floating point. ``specs``: name ->
    anything with a ``dtype`` (a manifest ``TensorSpec`` or a tensor)."""
    bad = [f"{n!r} is {str(s.dtype).replace('torch.', '')}" for n, s in specs.items() if not s.dtype.is_floating_point]
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise SyncRefused(f"non-float weight(s): {', '.join(bad[:3])}{more}; weights must be float tensors")


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in t.shape)


def _index_of(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    idx = []
    for d in reversed(shape):
        idx.append(flat % d if d else 0)
        flat //= d if d else 1
    return tuple(reversed(idx))


def describe_nonfinite(name: str, t: torch.Tensor) -> str:
    """``'w' (shape (3, 4)) holds NaN at index (0, 2) (5 non-finite values)``."""
    bad = ~torch.isfinite(t.detach())
    count = int(bad.sum())
    flat = int(bad.reshape(-1).to(torch.uint8).argmax())
    value = float(t.detach().reshape(-1)[flat])
    kind = "NaN" if value != value else ("+Inf" if value > 0 else "-Inf")
    return f"{name!r} (shape {_shape(t)}) holds {kind} at index {_index_of(flat, _shape(t))} ({count} non-finite value{'s' if count != 1 else ''})"


def nonfinite_problem(pairs: Sequence[tuple[str, torch.Tensor]]) -> str | None:
    """None if every float tensor in ``pairs`` is finite, else a description of the first bad one.

    One ``torch._foreach_norm`` per (device, dtype) group (the fused multi-tensor kernel gradient
    clipping uses; NaN and Inf propagate into a tensor's norm), the per-tensor norms stacked, and
    one ``isfinite().all()`` read back: each byte read once, one host sync per device for the
    whole bucket. The 2-norm, not max-abs: on the CPU the inf-norm kernel ran 20x slower (236 vs
    10 ms for the 5 MB tiny model here). A 2-norm can overflow for huge finite values (fp16), so a
    flagged tensor is re-scanned exactly (``isfinite``) before it is refused."""
    groups: dict[tuple[Any, Any], list[tuple[str, torch.Tensor]]] = {}
    for name, t in pairs:
        if t.numel() and t.dtype.is_floating_point:
            groups.setdefault((t.device, t.dtype), []).append((name, t.detach()))
    for members in groups.values():
        norms = torch._foreach_norm([t for _, t in members], 2)
        if bool(torch.stack(norms).isfinite().all()):
            continue
        for (name, t), n in zip(members, norms):  # only a flagged bucket pays for this
            if not bool(n.isfinite()) and not bool(torch.isfinite(t).all()):
                return describe_nonfinite(name, t)
    return None


class StreamChecker:
    """Checks one sync's stream of buckets against the manifest announced before it.

    ``check_bucket`` raises :class:`SyncRefused` (outcome ``UNCHANGED``; the caller turns it into
    ``RESTORED`` after rolling back) *before* the bucket is written when a tensor is not in the
    manifest, comes twice, or differs from its announced shape or dtype, or (``check_finite``)
    holds NaN/Inf. ``seconds_finite`` and ``checked_bytes`` say what the finite check cost."""

    def __init__(self, manifest: Mapping[str, Any], *, check_finite: bool = True):
        self.manifest = manifest
        self.check_finite = check_finite
        self.seen: set[str] = set()
        self.seconds_finite = 0.0
        self.checked_bytes = 0

    def check_bucket(self, bucket: Sequence[tuple[str, Any]], index: int | None = None) -> None:
        where = f" (bucket {index})" if index is not None else ""
        for name, t in bucket:
            spec = self.manifest.get(name)
            if spec is None:
                raise SyncRefused(f"the source produced {name!r}{where}, which its manifest did not announce")
            if name in self.seen:
                raise SyncRefused(f"the source produced {name!r} twice{where}")
            if not isinstance(t, torch.Tensor):
                raise SyncRefused(f"the source produced {name!r}{where} as a {type(t).__name__}, not a torch.Tensor")
            if _shape(t) != tuple(spec.shape):
                raise SyncRefused(
                    f"the source produced {name!r}{where} with shape {_shape(t)}, which its manifest did not announce "
                    f"(it announced {tuple(spec.shape)})"
                )
            if t.dtype != spec.dtype:
                raise SyncRefused(
                    f"the source produced {name!r}{where} as {str(t.dtype).replace('torch.', '')}, but its manifest "
                    f"announced {str(spec.dtype).replace('torch.', '')}"
                )
            if not t.dtype.is_floating_point:
                raise SyncRefused(f"{name!r}{where} is {str(t.dtype).replace('torch.', '')}; weights must be float tensors")
        if self.check_finite:
            import time

            t0 = time.perf_counter()
            problem = nonfinite_problem(bucket)
            self.seconds_finite += time.perf_counter() - t0
            self.checked_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
            if problem:
                raise SyncRefused(f"{problem}{where}; non-finite weights are refused (option check_finite)")
        self.seen.update(n for n, _ in bucket)

    def finish(self) -> None:
        """Raise :class:`SyncRefused` if the source stopped before producing all it announced."""
        missing = [n for n in self.manifest if n not in self.seen]
        if missing:
            more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
            raise SyncRefused(
                f"the source ended after {len(self.seen)} of {len(self.manifest)} announced tensors; missing "
                f"{', '.join(repr(m) for m in missing[:3])}{more}"
            )


def failure_message(err: BaseException, outcome: str) -> str:
    """The one-line message of a sync that failed mid-stream (the source raised, a transport or
    load error) after the engine was rolled back (``outcome``)."""
    if isinstance(err, SyncRefused):
        return str(err.with_outcome(outcome))
    return one_line(f"weight sync failed ({outcome}): {type(err).__name__}: {err}")


def tensors_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
