"""The contract every generation backend implements.

The four jobs of the seed's ``VLLMModule`` (``build_dataset``, ``forward_step``,
``decode_internal``, plus ``setup``) and the RL loop's weight sync and memory phases. A backend is
a subclass registered by a plugin through ``genbackends_register_backends``; users select it with
``backend: <name>`` in a config file.

Lifecycle::

    b = registry.create_backend(config)   # __init__ validates options, does no heavy work
    b.setup()                              # load the engine and weights
    records = b.generate(prompts)          # build_dataset -> forward_step -> decode_internal
    b.sleep(); ...train...; b.wake_up(); b.sync_weights(source)
    b.shutdown()
"""
from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Iterator, Sequence

from pydantic import BaseModel, ConfigDict

from genbackends.config import GenConfig
from genbackends.errors import BackendStateError
from genbackends.records import GenerationRecord
from genbackends.weights import SyncReport


class NoOptions(BaseModel):
    """Option model of a backend that takes no backend-specific options."""

    model_config = ConfigDict(extra="forbid")


class GenerationBackend(ABC):
    """Base class of generation backends.

    Subclasses set ``name`` (the config name) and, if they take backend-specific options,
    ``options_model`` (a pydantic model validating ``config.options``). ``hooks`` is the
    registry's pluggy hook relay (or ``None``); event hooks are called through :meth:`_emit`.
    """

    name: ClassVar[str] = ""
    options_model: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, config: GenConfig, hooks: Any = None):
        self.config = config
        self.options = config.backend_options(self.options_model)
        self.hooks = hooks
        self._state = "created"

    # ---- lifecycle -------------------------------------------------------------------------
    @abstractmethod
    def setup(self) -> None:
        """Start the engine and load the model named by ``config.model``."""

    def sleep(self, level: int = 1) -> None:
        """Release accelerator memory between generation phases (level 1: keep weights on the
        host; level 2: discard weights, a ``sync_weights`` must follow). Default: no-op."""

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Re-acquire what ``sleep`` released; ``tags`` (e.g. ``["weights"]`` then
        ``["kv_cache"]``) wakes parts separately. Default: no-op."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the engine and free its resources; later calls other than ``shutdown`` raise."""

    # ---- the four jobs ---------------------------------------------------------------------
    @abstractmethod
    def build_dataset(self, prompts: Any, is_eval: bool = False) -> list[dict[str, Any]]:
        """Turn prompts (a list of strings, a text file, a JSONL file) into a dataset: one
        ``{"prompt": str, "input_ids": list[int]}`` per prompt, truncated to
        ``config.max_prompt_length`` tokens. Raises :class:`~genbackends.errors.PromptError`."""

    @abstractmethod
    def forward_step(self, data: Any, iteration: int = 0, eval_mode: bool = False) -> Any:
        """Generate for one batch (items of the dataset, or lists of token ids) and return the
        engine's raw outputs, one per prompt, in order."""

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
        """

    # ---- convenience -----------------------------------------------------------------------
    def generate(
        self,
        prompts: Any,
        eval_mode: bool = False,
        progress: Callable[[int, int], None] | None = None,
        on_batch: Callable[[list[GenerationRecord]], None] | None = None,
    ) -> list[GenerationRecord]:
        """``build_dataset`` -> ``forward_step`` per batch -> ``decode_internal``; emits the
        ``genbackends_on_after_generate`` hook with throughput stats. ``progress(done, total)``
        is called with prompt counts after each batch (the CLI's progress bar); ``on_batch(records)``
        with each batch's records as soon as the batch is done (the CLI streams them to its file)."""
        self._require_ready()
        t0 = time.perf_counter()
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
        seconds = time.perf_counter() - t0
        out_tokens = sum(len(r.token_ids) for r in records)
        stats = {
            "seconds": seconds,
            "num_prompts": float(len(dataset)),
            "num_records": float(len(records)),
            "prompt_tokens": float(sum(len(d["input_ids"]) for d in dataset)),
            "output_tokens": float(out_tokens),
            "output_tokens_per_s": out_tokens / seconds if seconds > 0 else 0.0,
        }
        self._emit("genbackends_on_after_generate", backend=self, records=records, stats=stats)
        return records

    @contextlib.contextmanager
    def sampling_overrides(self, **updates: Any) -> Iterator[None]:
        """Change sampling knobs for the calls inside the ``with`` block, then restore them.

        Sampling is applied per request, so one engine serves every variant (probe logprobs,
        greedy checks, eval sweeps) without a restart.
        """
        old = self.config.sampling
        self.config.sampling = old.model_copy(update=updates)
        try:
            yield
        finally:
            self.config.sampling = old

    # ---- helpers for subclasses ------------------------------------------------------------
    def _emit(self, hook_name: str, **kwargs: Any) -> None:
        """Call an event hook on every registered plugin (no-op without a registry)."""
        if self.hooks is not None:
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

    def __enter__(self) -> "GenerationBackend":
        if self._state == "created":
            self.setup()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._state != "shutdown":
            self.shutdown()
