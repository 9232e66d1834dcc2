"""One vLLM engine (``vllm.LLM``) and the operations the backend needs from it.

A :class:`LocalEngine` lives in this process (its engine core in-process, or in a subprocess with
worker processes for TP/PP). Ray replicas wrap the same class inside an actor
(:mod:`genbackends_vllm.ray_replicas`). Start-up errors are turned into one-line errors naming
the setting to change.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from genbackends.background import start_in_background
from genbackends.errors import BackendStateError, ConfigError

from genbackends_vllm import compat

WORKER_EXTENSION = "genbackends_vllm.worker_ext.WeightSyncExtension"

_MEMORY_HINTS = ("memory", "kv cache", "kv_cache", "out of memory", "cannot allocate", "blocks")


def check_model_path(model: str, what: str = "model") -> None:
    """Fail before any engine work if ``model`` is not an HF-format folder."""
    p = Path(model)
    if not p.exists():
        raise ConfigError(f"{what}: model folder {model!r} does not exist")
    if p.is_file() and p.suffix != ".gguf":  # vLLM reads a single file only as GGUF
        raise ConfigError(f"{what}: {model!r} is a file; expected an HF-format model folder (or a .gguf file)")
    if p.is_dir() and not (p / "config.json").is_file():
        raise ConfigError(f"{what}: {model!r} has no config.json (expected an HF-format model folder)")


def explain_start_failure(err: BaseException, kwargs: dict[str, Any]) -> str:
    """A one-line reason naming the config setting to change."""
    msg = f"{type(err).__name__}: {err}".splitlines()[0][:400]
    low = str(err).lower()
    if any(h in low for h in _MEMORY_HINTS):
        if "kv_cache_memory_bytes" in kwargs:
            knob = f"cache.kv_cache_memory_bytes (now {kwargs['kv_cache_memory_bytes']})"
        else:
            knob = f"cache.gpu_memory_utilization (now {kwargs.get('gpu_memory_utilization')})"
        return (
            f"vLLM engine could not start for lack of memory: raise {knob} or lower seq_length / "
            f"options.vllm.max_model_len (now {kwargs.get('max_model_len')}) -- {msg}"
        )
    return f"vLLM engine could not start (model {kwargs.get('model')!r}): {msg}"


class EngineStartError(ConfigError):
    """The engine refused to start; the message names the setting to change."""


def _call_with_model(worker: Any, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    # Runs inside each worker: hand fn the worker's nn.Module and TP rank.
    return fn(compat.worker_model(worker), compat.worker_tp_rank(worker), *args, **kwargs)


def _load_weights(model: Any, tp_rank: int, pairs: list[tuple[str, Any]]) -> int:
    # Each weight's own weight_loader cuts this rank's TP shard from the full HF tensor.
    model.load_weights(iter(pairs))
    compat.repack_vocab_gemms(model)  # no-op where direct loads are allowed (GPUs); kept for symmetry
    return len(pairs)


def _param_layout(model: Any, tp_rank: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    return {n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters()}


def _worker_pid(model: Any, tp_rank: int) -> int:
    return os.getpid()


def dead_message(reason: str, note: str = "") -> str:
    """The one line every call on a dead engine raises (``note``: what this call did not do)."""
    return f"engine is dead: {reason}; {note + '; ' if note else ''}create a new backend"


class LocalEngine:
    """A ``vllm.LLM`` plus the calls the backend makes on it."""

    def __init__(self, engine_kwargs: dict[str, Any], *, in_process: bool):
        self.kwargs = dict(engine_kwargs)
        self.in_process = in_process
        self.llm: Any = None
        self.start_seconds = 0.0
        self.lock = threading.RLock()
        self._group: Any = None
        self._sender: Any = None  # weight_transfer sender (sync_transport: transfer_engine)
        self.sync_port: int | None = None
        self._watch: Any = None  # liveness.EngineWatch of a multi-process engine
        self.dead_reason: str | None = None  # set once a death is seen; every later call raises

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> "LocalEngine":
        """Build the ``LLM``; errors name the setting to change."""
        check_model_path(self.kwargs["model"])
        compat.prepare_process_env(
            in_process=self.in_process,
            tensor_parallel_size=self.kwargs.get("tensor_parallel_size", 1),
            pipeline_parallel_size=self.kwargs.get("pipeline_parallel_size", 1),
        )
        from vllm import LLM

        kw = dict(self.kwargs)
        kw.setdefault("worker_extension_cls", WORKER_EXTENSION)
        t0 = time.perf_counter()
        try:
            self.llm = LLM(**kw)
        except Exception as e:
            raise EngineStartError(explain_start_failure(e, kw)) from e
        self.start_seconds = time.perf_counter() - t0
        self._start_watch()
        return self

    def _start_watch(self) -> None:
        """Watch the engine core and worker processes (multi-process engines only): a death
        then fails the calls waiting on them within a second instead of never."""
        from genbackends_vllm.liveness import EngineWatch, WatchedProcess

        cores = compat.engine_core_processes(self.llm)
        if not cores:
            return  # engine core in this process: nothing of ours can die apart from us
        procs = [WatchedProcess(f"engine core process {name}", pid, code) for name, pid, code in cores]
        procs += [WatchedProcess(f"engine worker process {rank}", pid) for rank, pid in enumerate(self.run_on_workers(_worker_pid))]
        self._watch = EngineWatch(procs, self._on_death).start()

    def _on_death(self, reason: str) -> None:
        # From the watchdog thread: remember, then wake whoever waits on the engine.
        self.dead_reason = self.dead_reason or reason
        llm = self.llm
        if llm is not None:
            compat.fail_engine_waits(llm, BackendStateError(dead_message(self.dead_reason)))

    def check_alive(self, note: str = "") -> None:
        """Raise :class:`BackendStateError` at once if a process of this engine has died (or
        vLLM says its engine core is dead); ``note`` says what the failed call did not do."""
        if self.dead_reason is None and self._watch is not None:
            self._watch.check()
        if self.dead_reason is None and self.llm is not None and compat.engine_reported_dead(self.llm):
            self.dead_reason = self._name_the_dead("vLLM reports its engine core dead")
        if self.dead_reason is not None:
            raise BackendStateError(dead_message(self.dead_reason, note))

    def _name_the_dead(self, fallback: str, wait_s: float = 3.0) -> str:
        # vLLM learns of a death (EngineDeadError) a moment before the process is gone: give the
        # watch that moment, so the message names the process.
        deadline = time.monotonic() + (wait_s if self._watch is not None else 0.0)
        while True:
            if self._watch is not None and self._watch.check() is not None:
                return self._watch.reason
            if time.monotonic() >= deadline:
                return fallback
            time.sleep(0.1)

    @contextlib.contextmanager
    def _guard(self, what: str, *, clean_up: bool = False) -> Iterator[None]:
        """Around every call that waits on the engine: a death seen during ``what`` becomes
        :class:`BackendStateError` (and the engine stays dead); with ``clean_up``, any other
        failure or interruption (KeyboardInterrupt, an alarm) first aborts the requests it left
        in the engine and drops the prefix cache, so the next call starts from a clean engine."""
        try:
            yield
        except BaseException as e:
            if self.dead_reason is None and self.llm is not None:
                from vllm.v1.engine.exceptions import EngineDeadError

                if isinstance(e, EngineDeadError) or compat.engine_reported_dead(self.llm):
                    self.dead_reason = self._name_the_dead(f"vLLM reports its engine core dead during {what}")
                elif self._watch is not None:
                    self._watch.check()
            if self.dead_reason is not None:
                raise BackendStateError(dead_message(self.dead_reason, f"{what} did not finish")) from e
            if clean_up:
                self._clean_up_after(what, e)
            raise

    def _clean_up_after(self, what: str, err: BaseException) -> None:
        llm = self.llm
        if llm is None:
            return
        try:
            n = compat.abort_all_requests(llm)
            # Blocks allocated for an interrupted step are registered in the prefix cache before
            # their KV is written: drop them, or a later prompt with the same prefix reads garbage.
            compat.reset_prefix_cache(llm)
        except BackendStateError:
            raise
        except Exception as clean_err:
            self.dead_reason = f"cleaning up after an interrupted {what} failed ({type(clean_err).__name__}: {clean_err})"
            raise BackendStateError(dead_message(self.dead_reason)) from err
        compat.logger.warning("%s interrupted (%s): aborted %d unfinished request(s), prefix cache reset", what, type(err).__name__, n)

    def shutdown(self) -> None:
        """Stop the engine core and workers."""
        llm, self.llm = self.llm, None
        if self._watch is not None:
            self._watch.stop()  # the exits that follow are no deaths
        if llm is None:
            return
        if self._group is not None and self.dead_reason is None:
            try:
                llm.collective_rpc("genbackends_sync_close")
            except Exception:
                pass
        self._group = None
        sender, self._sender = self._sender, None
        if sender is not None and self.dead_reason is None:
            try:
                sender.close()
            except Exception:  # noqa: BLE001 - the engine is going away anyway
                pass
        try:
            engine = llm.llm_engine
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                import inspect

                if self.dead_reason is not None and "timeout" in inspect.signature(core.shutdown).parameters:
                    # A dead engine has nothing to finish: SIGKILL what is left after 1 s
                    # instead of vLLM's default grace period.
                    core.shutdown(timeout=1.0)
                else:
                    core.shutdown()
        finally:
            del llm
            import gc

            gc.collect()

    def _need(self, note: str = "") -> Any:
        if self.llm is None:
            raise BackendStateError("vLLM engine is shut down")
        self.check_alive(note)
        return self.llm

    # ---- generation --------------------------------------------------------------------
    def tokenizer(self) -> Any:
        return self._need().get_tokenizer()

    def generate(self, token_ids: Sequence[Sequence[int]], params: Sequence[Any], use_tqdm: bool = False) -> list[Any]:
        """``LLM.generate`` on token-id prompts; outputs in prompt order."""
        prompts = [{"prompt_token_ids": list(t)} for t in token_ids]
        with self.lock:
            llm = self._need("nothing was generated")
            with self._guard("generate", clean_up=True):
                return list(llm.generate(prompts, list(params), use_tqdm=use_tqdm))

    def beam_search(self, token_ids: Sequence[Sequence[int]], params: Any) -> list[Any]:
        """``LLM.beam_search`` (beam width = ``params.beam_width``)."""
        prompts = [{"prompt_token_ids": list(t)} for t in token_ids]
        with self.lock:
            llm = self._need("nothing was generated")
            with self._guard("beam search", clean_up=True):
                return list(llm.beam_search(prompts, params))

    # ---- workers -----------------------------------------------------------------------
    def collective_rpc(self, method: Any, args: tuple = (), kwargs: dict | None = None) -> list[Any]:
        llm = self._need("nothing was sent")
        name = method if isinstance(method, str) else getattr(method, "__name__", "a worker call")
        with self._guard(f"worker call {name}"):
            return llm.collective_rpc(method, args=args, kwargs=kwargs or {})

    def run_on_workers(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """``fn(model, tp_rank, *args, **kwargs)`` next to each worker's model, rank order.
        In-process engines pass objects without copying; worker processes get ``fn`` pickled."""
        return self.collective_rpc(_call_with_model, args=(fn, args, kwargs))

    def param_layout(self) -> list[dict[str, tuple[tuple[int, ...], Any]]]:
        return self.run_on_workers(_param_layout)

    def reload_weights(self, pairs: list[tuple[str, Any]]) -> None:
        """In-place reload on every worker (``reload_weights`` restores the kernel layout, loads
        HF-named tensors and repacks; a plain second ``load_weights`` fails on the CPU), then the
        re-pack vLLM's reload misses (a tied LM head on the CPU; see the worker extension)."""
        self.collective_rpc("genbackends_reload", kwargs={"weights_iterator": pairs})

    def transport_kind(self) -> str:
        """Default weight transport (``sync_transport: auto``): in this process ``load_weights``
        straight into the live model where the platform allows a second load (GPUs: a copy per
        tensor), else the in-place ``reload_weights``; worker processes: vLLM's ``ipc`` transfer
        engine where this engine was built with it (GPU, one worker) and its GPU is visible to this
        process, else our own group."""
        if not self.in_process:
            return "transfer_engine" if self.ipc_device() is not None else "group"
        return "direct_load" if compat.direct_load_supported() else "inprocess"

    def transfer_backend(self) -> str | None:
        """``weight_transfer_config.backend`` this engine was built with (None: without)."""
        cfg = self.kwargs.get("weight_transfer_config")
        return cfg.get("backend") if cfg else None

    def ipc_device(self) -> int | None:
        """This process's index of the engine worker's GPU, if the engine was built with vLLM's
        ``ipc`` engine and that GPU is visible here (asked once: the worker reports its UUID)."""
        if not hasattr(self, "_ipc_device"):
            from genbackends_vllm import weight_transfer

            self._ipc_device = weight_transfer.ipc_device_of(self.kwargs, lambda m, kw: self.collective_rpc(m, kwargs=kw))
        return self._ipc_device

    def load_bucket(self, pairs: list[tuple[str, Any]], transport: str) -> None:
        """Load one bucket of HF-named tensors into every worker by ``transport``."""
        with self.lock:
            if transport == "inprocess":
                self.reload_weights([(n, t.detach()) for n, t in pairs])
            elif transport == "direct_load":
                self.run_on_workers(_load_weights, [(n, t.detach()) for n, t in pairs])
            elif transport == "rpc":
                # Tensors do not survive vLLM's RPC encoding as tensors: send raw bytes.
                from genbackends_vllm.transport import pack_bytes

                self.collective_rpc("genbackends_reload_packed", args=(pack_bytes(pairs),))
            elif transport == "group":
                self._send_over_group(pairs)
            elif transport == "transfer_engine":
                # inside the weight update begin_transfer opened (vLLM's layerwise reload)
                self.check_alive("nothing more was sent")
                self._transfer_sender().update(pairs, check=self.check_alive)
            else:
                raise ValueError(f"unknown weight transport {transport!r}")

    def reload_from_path(self, path: str) -> None:
        """Every worker reads the safetensors folder ``path`` itself and reloads in place."""
        with self.lock:
            self.collective_rpc("genbackends_reload", kwargs={"weights_path": path})

    def _transfer_sender(self) -> Any:
        """The host side of vLLM's weight-transfer engine this engine was built with (opened on
        first use: the rendezvous of its group, none for ``ipc``); raises before anything is sent
        where it cannot reach the workers."""
        if self._sender is None:
            from genbackends.errors import WeightSyncError
            from genbackends_vllm import weight_transfer

            backend = self.transfer_backend()
            if not backend:
                raise WeightSyncError("weight sync rejected, nothing written: this engine was built without "
                                      "weight_transfer_config: set options.vllm.sync_transport: transfer_engine before setup()")
            device = self.ipc_device()
            if backend == "ipc" and device is None:
                raise WeightSyncError("weight sync rejected, nothing written: vLLM's ipc transfer engine needs the "
                                      "engine's GPU visible to this process (it is not); set options.vllm.sync_transport: group")
            workers = self.kwargs.get("tensor_parallel_size", 1) * self.kwargs.get("pipeline_parallel_size", 1)
            self._sender = weight_transfer.sender_for(self._need(), workers, backend, ipc_device=device)
        return self._sender

    def prepare_transport(self, transport: str) -> None:
        """Open what ``transport`` needs before the first byte moves (a sync's validation)."""
        if transport == "transfer_engine":
            with self.lock:
                self._transfer_sender()

    def begin_transfer(self) -> None:
        """Open one weight update of vLLM's transfer engine for a whole sync (``start_weight_update``);
        :meth:`load_bucket` then sends each bucket into it and :meth:`end_transfer` closes it. A sync
        that fails in between is undone by the snapshot restore, which also ends the workers'
        half-done layerwise reload (``snapshot.abort_layerwise_reload``)."""
        with self.lock:
            self.check_alive("nothing was sent")
            self._transfer_sender().start()

    def abort_transfer(self) -> None:
        """End the weight update a failed sync left open (best effort: the engine may be dead),
        so that the next sync can start one; with ``sync_atomic`` the snapshot restore follows."""
        try:
            self.check_alive()
            self.collective_rpc("genbackends_abort_update")
        except Exception:  # noqa: BLE001 - the sync's own error is the one to report
            pass

    def end_transfer(self) -> None:
        """Close the weight update: vLLM processes the loaded layers (``finish_weight_update``)."""
        with self.lock:
            self._transfer_sender().finish()

    def _send_over_group(self, pairs: list[tuple[str, Any]]) -> None:
        from genbackends_vllm.transport import SyncGroup, free_port, meta_of, to_wire

        self.check_alive("nothing was sent")
        alive = self.check_alive  # every wait below also watches the engine's processes
        if self._group is None:
            world = 1 + self.kwargs.get("tensor_parallel_size", 1) * self.kwargs.get("pipeline_parallel_size", 1)
            port = self.sync_port or free_port()
            joined = start_in_background(lambda: self.collective_rpc("genbackends_sync_open", args=("127.0.0.1", port, world)))
            made = start_in_background(lambda: SyncGroup("127.0.0.1", port, 0, world))
            self._group = made(check=alive)
            joined(check=alive)
        meta = meta_of(pairs)
        done = start_in_background(lambda: self.collective_rpc("genbackends_sync_bucket", args=(meta,)))
        for _, t in pairs:
            self._group.broadcast(to_wire(t), check=alive)
        done(check=alive)

    def reset_prefix_cache(self) -> None:
        """Drop cached KV blocks computed with the old weights (see :func:`compat.reset_prefix_cache`)."""
        with self.lock:
            compat.reset_prefix_cache(self._need())

    # ---- atomic syncs (worker side: genbackends_vllm.snapshot) ------------------------------
    def snapshot(self, hf_names: list[str] | None) -> list[dict[str, float]]:
        """Every worker saves the modules ``hf_names`` land in; per-worker costs, rank order."""
        with self.lock:
            return self.collective_rpc("genbackends_snapshot", args=(hf_names,))

    def restore(self) -> list[dict[str, float]]:
        """Every worker puts its snapshot back (and drops it)."""
        with self.lock:
            return self.collective_rpc("genbackends_restore")

    def drop_snapshot(self) -> None:
        with self.lock:
            self.collective_rpc("genbackends_drop_snapshot")

    def scrub_kv_cache(self) -> int:
        """Zero the KV-cache memory of every worker; bytes zeroed."""
        with self.lock:
            return int(sum(self.collective_rpc("genbackends_scrub_kv")))

    # ---- memory ------------------------------------------------------------------------
    def sleep(self, level: int) -> None:
        self._need().sleep(level=level)

    def wake_up(self, tags: list[str] | None) -> None:
        self._need().wake_up(tags=tags)

    def executor_backend(self) -> str:
        return str(self._need().llm_engine.vllm_config.parallel_config.distributed_executor_backend)
