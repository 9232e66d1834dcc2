"""Core config -> keyword arguments of ``vllm.LLM`` / ``EngineArgs``.

Pure mapping plus validation; the engine itself is started elsewhere. Legacy ChatLearn knobs the
installed vLLM no longer has are logged once each with what became of them; the pass-through
``options.engine_args`` block is checked against the installed ``EngineArgs`` fields.
"""
from __future__ import annotations

import difflib
from typing import Any

from genbackends.config import GenConfig
from genbackends.errors import ConfigError

from genbackends_vllm import compat
from genbackends_vllm.options import VLLMOptions

_logged: set[str] = set()

_DTYPES = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def check_passthrough(engine_args: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` for any name that is not an ``EngineArgs`` field, listing close
    matches."""
    known = compat.engine_arg_names()
    for name in engine_args:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"options.engine_args.{name}: not an engine argument of the installed vLLM "
                f"{compat.vllm_version()}{hint}"
            )


def legacy_fates(config: GenConfig) -> dict[str, tuple[Any, str]]:
    """Legacy knobs that are set in ``config`` and what becomes of each: ``{name: (value, fate)}``
    (only the ones vLLM no longer takes)."""
    values = {
        "max_paddings": config.scheduler.max_paddings,
        "swap_space": config.cache.swap_space,
        "sliding_window": config.cache.sliding_window,
    }
    out = {}
    for name, value in values.items():
        if value is None:
            continue
        fate = compat.legacy_knob_fate(name)
        if fate is not None:
            out[name] = (value, fate)
    return out


def log_legacy_once(config: GenConfig) -> dict[str, str]:
    """Log (once per process and knob) each legacy knob's fate; return them for reports."""
    fates = legacy_fates(config)
    for name, (value, fate) in fates.items():
        if name not in _logged:
            _logged.add(name)
            compat.logger.warning("config knob %s=%r: %s", name, value, fate)
    return {k: v[1] for k, v in fates.items()}


def build_engine_kwargs(config: GenConfig, options: VLLMOptions, *, executor: str | None = None) -> dict[str, Any]:
    """Every ``LLM(...)`` keyword for this config. ``executor`` overrides the config's (the
    backend picks ``mp`` for replicas, ``external_launcher`` for colocated mode, ...)."""
    check_passthrough(options.engine_args)
    log_legacy_once(config)
    kw: dict[str, Any] = {
        "model": config.model,
        "tokenizer": config.tokenizer_path,
        "dtype": _DTYPES[config.dtype],
        "max_model_len": options.max_model_len or config.seq_length,
        "tensor_parallel_size": config.parallel.tensor_parallel_size,
        "pipeline_parallel_size": config.parallel.pipeline_parallel_size,
        "enforce_eager": options.enforce_eager,
        "trust_remote_code": options.trust_remote_code,
        "skip_tokenizer_init": options.skip_tokenizer_init,
    }
    if config.sampling.seed is not None:
        kw["seed"] = config.sampling.seed
    kw.update(compat.kv_cache_args(config.cache.gpu_memory_utilization, config.cache.kv_cache_memory_bytes))
    if config.cache.block_size is not None:
        kw["block_size"] = config.cache.block_size
    if config.scheduler.max_num_seqs is not None:
        kw["max_num_seqs"] = config.scheduler.max_num_seqs
    if config.scheduler.max_num_batched_tokens is not None:
        kw["max_num_batched_tokens"] = config.scheduler.max_num_batched_tokens
    for legacy, value in (
        ("max_paddings", config.scheduler.max_paddings),
        ("swap_space", config.cache.swap_space),
        ("sliding_window", config.cache.sliding_window),
    ):
        # A release that still has the knob gets it passed through.
        if value is not None and compat.legacy_knob_fate(legacy) is None:
            kw[legacy] = value
    if options.enable_prefix_caching is not None:
        kw["enable_prefix_caching"] = options.enable_prefix_caching
    sleep_mode = options.enable_sleep_mode
    if sleep_mode is None:
        sleep_mode = not compat.is_cpu_platform()
    if sleep_mode:
        kw["enable_sleep_mode"] = True
    if options.load_format:
        kw["load_format"] = options.load_format
    if config.parallel.pipeline_parallel_size > 1:
        reason = compat.pipeline_parallel_unsupported()
        if reason:
            raise ConfigError(f"parallel.pipeline_parallel_size: {config.parallel.pipeline_parallel_size} cannot run here: {reason}")
    chosen = executor or config.parallel.executor
    if chosen != "auto":
        reason = compat.supports_executor(chosen)
        if reason:
            raise ConfigError(f"parallel.executor: {chosen!r} cannot run here: {reason}")
        kw["distributed_executor_backend"] = chosen
    if options.sync_transport == "transfer_engine":
        kw.update(_transfer_engine_args(config))
    kw.update(options.engine_args)
    return kw


def _transfer_engine_args(config: GenConfig) -> dict[str, Any]:
    """``LLM`` keywords for ``options.vllm.sync_transport: transfer_engine``: vLLM's
    ``weight_transfer_config`` and the worker extension that registers our CPU engine in its
    factory. Refused where the installed vLLM lacks the API, or on GPUs beyond one worker (vLLM's
    ``ipc`` engine needs the trainer's tensors on each worker's GPU; its ``nccl`` engine needs the
    trainer on a GPU of its own: neither is wired here)."""
    from genbackends_vllm import weight_transfer

    if not weight_transfer.has_transfer_api():
        raise ConfigError(f"options.vllm.sync_transport: transfer_engine needs vLLM's weight-transfer API, absent "
                          f"from the installed vLLM {compat.vllm_version()}; use group")
    workers = config.parallel.tensor_parallel_size * config.parallel.pipeline_parallel_size
    cpu = compat.is_cpu_platform()
    if not cpu and workers > 1:
        raise ConfigError(f"options.vllm.sync_transport: transfer_engine on GPUs takes one engine worker (vLLM's ipc "
                          f"engine, trainer and engine on one GPU); this engine has {workers}: use group")
    return weight_transfer.engine_kwargs_for(weight_transfer.backend_for("cpu" if cpu else "cuda", same_gpu=True))


def auto_transfer_args(config: GenConfig, options: VLLMOptions) -> dict[str, Any]:
    """Extra ``LLM`` keywords under ``options.vllm.sync_transport: auto`` for an engine whose
    workers live in another process: vLLM's ``ipc`` weight-transfer engine where it can serve (a
    GPU platform, the installed vLLM has the API, one worker). Each sync then uses it when this
    process sees the worker's GPU, else our group (``LocalEngine.transport_kind``). Nothing on
    the CPU (vLLM's engines all need CUDA; ours behind its API measured slower than our group),
    nor where ``options.engine_args`` sets the transfer config or worker extension itself."""
    from genbackends_vllm import weight_transfer

    workers = config.parallel.tensor_parallel_size * config.parallel.pipeline_parallel_size
    if options.sync_transport != "auto" or compat.is_cpu_platform() or workers != 1:
        return {}
    if {"weight_transfer_config", "worker_extension_cls"} & set(options.engine_args) or not weight_transfer.has_transfer_api():
        return {}
    return weight_transfer.engine_kwargs_for("ipc")
