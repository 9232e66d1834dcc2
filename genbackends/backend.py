"""The contract every generation backend implements.

The four jobs of the seed's ``VLLMModule`` (``build_dataset``, ``forward_step``,
``decode_internal``, plus ``setup``) and the RL loop's weight sync and memory phases. A backend is
a subclass registered by a plugin through ``genbackends_register_backends``; users select it with
``backend: <name>`` in a config file.

Lifecycle::

    b = registry.create_backend(config)   # __init__ validates options, does no heavy work
    b.setup()                              # load the engine and weights
    records = b.generate(prompts, sampling={"temperature": 0})   # per-call sampling, validated
    b.sleep(); ...train...; b.wake_up(); b.sync_weights(source)
    b.shutdown()

What the base class does around every public operation, for every subclass (a third-party
backend gets it without writing a line; see ``docs/contract.md``):

* **state guards**: ``generate``/``forward_step``/``sync_weights``/``sleep``/``wake_up`` before
  ``setup`` or after ``shutdown``, and ``setup`` after ``shutdown``, raise
  :class:`~genbackends.errors.BackendStateError`; a ``setup`` that returns marks the backend
  ready, a ``shutdown`` marks it shut down;
* **event hooks**: ``genbackends_on_backend_ready`` after ``setup``,
  ``genbackends_on_after_generate`` after ``generate``, ``genbackends_on_after_sync`` after
  ``sync_weights``, ``genbackends_on_memory_phase`` after ``sleep`` and ``wake_up``;
* **per-call sampling**: ``generate(..., sampling=...)`` and ``forward_step(..., sampling=...)``
  are validated like the config and seen by the subclass as ``self.config.sampling`` for that
  call.

This works by wrapping the subclass's own ``setup``, ``generate``, ``forward_step``,
``sync_weights``, ``sleep``, ``wake_up`` and ``shutdown`` when the class is created
(``__init_subclass__``); subclasses keep their method names and signatures (without
``sampling``) and must not fire the event hooks themselves.
"""
from __future__ import annotations

import contextlib
import functools
import time
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Iterator, Sequence

from pydantic import BaseModel, ConfigDict

from genbackends.capabilities import BackendCapabilities
from genbackends.config import GenConfig
from genbackends.errors import BackendStateError
from genbackends.records import GenerationRecord
from genbackends.sampling_rules import with_sampling
from genbackends.weights import SyncReport


class BackendOptions(BaseModel):
    """Base of backend option models (``options: {<backend>: {...}}``): unknown keys are errors.

    An ``options_model`` that does not derive from it and sets no ``extra`` policy of its own is
    made to forbid unknown keys as well (see :meth:`GenerationBackend.__init_subclass__`); set
    ``model_config = ConfigDict(extra="allow")`` explicitly to accept free-form keys.
    """

    model_config = ConfigDict(extra="forbid")


class NoOptions(BackendOptions):
    """Option model of a backend that takes no backend-specific options."""


# The public operations the base class wraps (guards, hooks, per-call sampling).
WRAPPED_OPERATIONS: tuple[str, ...] = (
    "setup", "generate", "forward_step", "sync_weights", "sleep", "wake_up", "shutdown",
)
# Operations that need a ready backend.
_NEEDS_READY = frozenset({"generate", "forward_step", "sync_weights", "sleep", "wake_up"})
# Operations that take ``sampling=``.
_TAKES_SAMPLING = frozenset({"generate", "forward_step"})


def _wrap(op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def operation(self: "GenerationBackend", *args: Any, **kwargs: Any) -> Any:
        return self._run_operation(op, fn, args, kwargs)

    operation.__genbackends_wrapped__ = True  # type: ignore[attr-defined]
    return operation


def _forbid_extra(model: type[BaseModel]) -> type[BaseModel]:
    """``model`` itself if it states an ``extra`` policy, else a subclass forbidding extras (same
    name, so error messages and docs read the same)."""
    if "extra" in model.model_config:
        return model
    return type(model.__name__, (model,), {
        "model_config": ConfigDict(**{**model.model_config, "extra": "forbid"}),
        "__module__": model.__module__,
        "__qualname__": model.__qualname__,
        "__doc__": model.__doc__,
    })


class GenerationBackend(ABC):
    """Base class of generation backends.

    Subclasses set ``name`` (the config name) and, if they take backend-specific options,
    ``options_model`` (a pydantic model validating ``config.options[name]``; unknown keys are
    errors, see :class:`BackendOptions`). They implement the abstract methods and may override
    ``sleep``, ``wake_up`` and :meth:`capabilities`. ``hooks`` is the registry's pluggy hook
    relay (or ``None``); the base class fires the event hooks (module docstring).
    """

    name: ClassVar[str] = ""
    options_model: ClassVar[type[BaseModel]] = NoOptions

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for op in WRAPPED_OPERATIONS:
            fn = cls.__dict__.get(op)
            if (
                callable(fn)
                and not getattr(fn, "__genbackends_wrapped__", False)
                and not getattr(fn, "__isabstractmethod__", False)
            ):
                setattr(cls, op, _wrap(op, fn))
        if "options_model" in cls.__dict__:
            cls.options_model = _forbid_extra(cls.options_model)

    def __init__(self, config: GenConfig, hooks: Any = None):
        self.config = config
        self.options = config.backend_options(self.options_model)
        self.hooks = hooks
        self._state = "created"
        self._active: list[str] = []  # operations running now (outermost first)
        self._event_stats: dict[str, dict[str, float]] = {}

    # ---- what this backend offers ---------------------------------------------------------
    def capabilities(self) -> BackendCapabilities:
        """What this backend offers (sync paths, sleep levels, direct writes, ...), declared so
        callers never probe with ``hasattr``. Cheap, and valid before ``setup()``. Base: the
        minimum every backend has (the ``"hf"`` sync path; sleep is a tracked no-op)."""
        return BackendCapabilities()

    # ---- lifecycle -------------------------------------------------------------------------
    @abstractmethod
    def setup(self) -> None:
        """Start the engine and load the model named by ``config.model``. When it returns the
        backend is ready (the base class fires ``genbackends_on_backend_ready``)."""

    def sleep(self, level: int = 1) -> None:
        """Release accelerator memory between generation phases (level 1: keep weights on the
        host; level 2: discard weights, a ``sync_weights`` must follow). Default: no-op
        (``capabilities().sleep_levels`` says which levels free anything)."""

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Re-acquire what ``sleep`` released; ``tags`` (e.g. ``["weights"]`` then
        ``["kv_cache"]``) wakes parts separately. Default: no-op."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the engine and free its resources; later calls other than ``shutdown`` raise
        :class:`~genbackends.errors.BackendStateError`."""

    # ---- the four jobs ---------------------------------------------------------------------
    @abstractmethod
    def build_dataset(self, prompts: Any, is_eval: bool = False) -> list[dict[str, Any]]:
        """Turn prompts (a list of strings, a text file, a JSONL file) into a dataset: one
        ``{"prompt": str, "input_ids": list[int]}`` per prompt, truncated to
        ``config.max_prompt_length`` tokens. Raises :class:`~genbackends.errors.PromptError`."""

    @abstractmethod
    def forward_step(self, data: Any, iteration: int = 0, eval_mode: bool = False) -> Any:
        """Generate for one batch (items of the dataset, or lists of token ids) and return the
        engine's raw outputs, one per prompt, in order.

        Callers may pass ``sampling=`` (a dict of sampling fields or a ``SamplingConfig``); the
        base class validates it and the implementation sees it as ``self.config.sampling``
        (resolve eval overrides with ``self.config.sampling.resolved(eval_mode)``)."""

    @abstractmethod
    def decode_internal(self, batched_outputs: Any) -> list[GenerationRecord]:
        """Turn raw engine outputs into :class:`~genbackends.records.GenerationRecord` s, one per
        (prompt, completion), in prompt order then completion index."""

    @abstractmethod
    def sync_weights(self, source: Any) -> SyncReport:
        """Load new weights into the running engine.

        ``source`` is anything :func:`genbackends.weights.as_weight_source` accepts. The whole
        sync is validated before the first byte is written; a rejected sync raises
        :class:`~genbackends.errors.WeightSyncError` and the engine keeps its previous weights.
        The returned report reaches ``genbackends_on_after_sync`` (fired by the base class).
        """

    def expected_weights(self) -> dict[str, tuple[int, ...]] | None:
        """HF names and shapes a sync may contain (tied weights under both names), or ``None``
        when the backend does not publish them. Weight adapters call it to refuse a bad sync on
        every trainer rank before any byte moves; override it (the base says ``None``)."""
        return None

    # ---- convenience -----------------------------------------------------------------------
    def generate(
        self,
        prompts: Any,
        *,
        sampling: Any = None,
        eval_mode: bool = False,
        progress: Callable[[int, int], None] | None = None,
        on_batch: Callable[[list[GenerationRecord]], None] | None = None,
    ) -> list[GenerationRecord]:
        """``build_dataset`` -> ``forward_step`` per batch -> ``decode_internal``.

        ``sampling`` (a dict of sampling fields applied over the config's, or a whole
        ``SamplingConfig``) holds for this call only; it is validated like the config (a bad value
        is one :class:`~genbackends.errors.ConfigError` line naming ``sampling.<field>``).
        ``eval_mode`` applies the ``eval_*`` sampling. ``progress(done, total)`` is called with
        prompt counts after each batch (the CLI's progress bar); ``on_batch(records)`` with each
        batch's records as soon as the batch is done (the CLI streams them to its file). The base class fires
        ``genbackends_on_after_generate`` with throughput stats.
        """
        dataset = self.build_dataset(prompts, is_eval=eval_mode)
        size = self.config.prompts.batch_size or max(1, len(dataset))
        records: list[GenerationRecord] = []
        for it, start in enumerate(range(0, len(dataset), size)):
            batch = dataset[start : start + size]
            batch_records = self.decode_internal(self.forward_step(batch, iteration=it, eval_mode=eval_mode))
            for r in batch_records:
                r.prompt_index += start
            records.extend(batch_records)
            if on_batch is not None:
                on_batch(batch_records)
            if progress is not None:
                progress(min(start + size, len(dataset)), len(dataset))
        self._add_event_stats(
            num_prompts=float(len(dataset)),
            prompt_tokens=float(sum(len(d["input_ids"]) for d in dataset)),
        )
        return records

    @contextlib.contextmanager
    def sampling_overrides(self, **updates: Any) -> Iterator[None]:
        """Change sampling knobs for the calls inside the ``with`` block, then restore them.

        Validated like the config (``top_p=7`` raises a one-line ConfigError). Sampling is applied
        per request, so one engine serves every variant without a restart; for one call prefer
        ``generate(..., sampling={...})``.
        """
        with self._sampling_scope(updates):
            yield

    # ---- helpers for subclasses ------------------------------------------------------------
    def _add_event_stats(self, **stats: float) -> None:
        """Add figures (e.g. ``freed_bytes``) to the stats of the event hook that the operation
        running now will fire (``genbackends_on_memory_phase`` for ``sleep``/``wake_up``,
        ``genbackends_on_after_generate`` for ``generate``)."""
        if self._active:
            self._event_stats.setdefault(self._active[-1], {}).update(stats)

    def _emit(self, hook_name: str, **kwargs: Any) -> None:
        """Call a hook on every registered plugin (no-op without a registry).

        The base class already fires the four event hooks around the public operations; a
        backend calling ``_emit`` for one of them *during* that operation is ignored, so older
        plugins do not fire twice."""
        if self.hooks is None:
            return
        if any(hook_name == _EVENT_OF.get(op) for op in self._active):
            return
        getattr(self.hooks, hook_name)(**kwargs)

    def _mark_ready(self) -> None:
        self._state = "ready"

    def _mark_shutdown(self) -> None:
        self._state = "shutdown"

    def _require_ready(self) -> None:
        if self._state == "shutdown":
            raise BackendStateError(f"backend {self.name!r} was shut down; create a new one to generate again")
        if self._state != "ready":
            raise BackendStateError(f"backend {self.name!r} is not set up; call setup() first")

    # ---- what the base class does around every operation ------------------------------------
    @contextlib.contextmanager
    def _sampling_scope(self, sampling: Any) -> Iterator[None]:
        # The backend sees its own validated copy of the config for the call; the caller's
        # config object (maybe shared with other backends) is never changed.
        old = self.config
        self.config = with_sampling(old, sampling)
        try:
            yield
        finally:
            self.config = old

    def _run_operation(self, op: str, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        sampling = kwargs.pop("sampling", None) if op in _TAKES_SAMPLING else None
        if op in self._active:
            # a subclass calling super().<op>(): the outer call guards and fires the hook
            with self._sampling_scope(sampling) if sampling is not None else contextlib.nullcontext():
                return fn(self, *args, **kwargs)
        self._check_state(op, kwargs)
        self._active.append(op)
        self._event_stats.pop(op, None)
        t0 = time.perf_counter()
        try:
            with self._sampling_scope(sampling) if sampling is not None else contextlib.nullcontext():
                result = fn(self, *args, **kwargs)
        finally:
            self._active.remove(op)
            if op == "shutdown":
                self._state = "shutdown"
        seconds = time.perf_counter() - t0
        self._after(op, args, kwargs, result, seconds, self._event_stats.pop(op, {}))
        return result

    def _check_state(self, op: str, kwargs: dict) -> None:
        if op == "setup" and self._state == "shutdown":
            raise BackendStateError(f"backend {self.name!r} was shut down; create a new one instead of calling setup() again")
        if op == "sync_weights" and kwargs.get("collective"):
            # A collective sync must hand a refusal to every trainer rank instead of raising
            # here alone (the others would wait in a collective): the backend checks itself.
            return
        if op in _NEEDS_READY:
            self._require_ready()

    def _after(self, op: str, args: tuple, kwargs: dict, result: Any, seconds: float, extra: dict) -> None:
        if op == "setup":
            if self._state == "created":  # a setup that returned is a ready backend
                self._state = "ready"
            self._fire("genbackends_on_backend_ready", backend=self, startup_seconds=seconds)
        elif op == "generate":
            records = list(result or [])
            out_tokens = sum(len(r.token_ids) for r in records)
            stats = {
                "seconds": seconds,
                # an overriding generate() may not report these: count what the records show
                "num_prompts": float(len({r.prompt_index for r in records})),
                "num_records": float(len(records)),
                "prompt_tokens": float(sum(len(r.prompt_token_ids) for r in records if r.index == 0)),
                "output_tokens": float(out_tokens),
                "output_tokens_per_s": out_tokens / seconds if seconds > 0 else 0.0,
            }
            stats.update(extra)
            self._fire("genbackends_on_after_generate", backend=self, records=result, stats=stats)
        elif op == "sync_weights":
            self._fire("genbackends_on_after_sync", backend=self, report=result)
        elif op in ("sleep", "wake_up"):
            stats = {"seconds": seconds}
            if op == "sleep":
                level = args[0] if args else kwargs.get("level", 1)
                stats["level"] = float(level)
            stats.update(extra)
            self._fire("genbackends_on_memory_phase", backend=self, phase=op, stats=stats)

    def _fire(self, hook_name: str, **kwargs: Any) -> None:
        if self.hooks is not None:
            getattr(self.hooks, hook_name)(**kwargs)

    def __enter__(self) -> "GenerationBackend":
        if self._state == "created":
            self.setup()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._state != "shutdown":
            self.shutdown()


# Which event hook each operation fires (``_emit`` of the same hook inside it is ignored).
_EVENT_OF = {
    "setup": "genbackends_on_backend_ready",
    "generate": "genbackends_on_after_generate",
    "sync_weights": "genbackends_on_after_sync",
    "sleep": "genbackends_on_memory_phase",
    "wake_up": "genbackends_on_memory_phase",
}

# The base class's own concrete operations get the same treatment as a subclass's.
for _op in ("generate", "sleep", "wake_up"):
    setattr(GenerationBackend, _op, _wrap(_op, GenerationBackend.__dict__[_op]))
del _op
