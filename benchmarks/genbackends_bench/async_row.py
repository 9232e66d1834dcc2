"""The async row: asynchronous rollouts (``backend.submit`` / ``stream``) on a long-tailed workload,
run in its own worker process (``python -m genbackends_bench.worker SPEC OUT`` with
``spec["mode"] == "async"``), so the asynchronous engine is the process's only engine.

Measured on one engine, in one process, alternating so load drifts hit both alike:

* **synchronous**: the whole batch is handed over when its last response ends (a batch barrier,
  what ``generate()`` gives a trainer); time until N records are consumed = time until all end;
* **asynchronous**: records are consumed as each finishes; time until the N-th is consumed;
* **pause + sync + resume**: with the workload in flight (after the first N were consumed),
  ``pause("keep")``, ``sync_weights`` (HF-named tensors), ``resume()``; four timestamps, so the
  phases add up to the total by construction; requests still in flight and spanning records kept.

Every raw per-run number is kept (``sync_runs``, ``async_runs`` with each record's timestamp), so
the medians and the ratio can be re-derived from them.
"""
from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any

from genbackends_bench.measure import median


def long_tail_lengths(n: int, median_tokens: int, tail_frac: float, mult: int, seed: int = 0) -> list[int]:
    """``n`` response lengths: ``median_tokens`` each, except ``max(1, round(n * tail_frac))`` of
    them ``mult`` x longer, at positions drawn from ``seed`` (exact lengths: ``ignore_eos``)."""
    n_tail = max(1, round(n * tail_frac))
    lens = [median_tokens] * n
    for i in random.Random(seed).sample(range(n), n_tail):
        lens[i] = median_tokens * mult
    return lens


def _requests(spec: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    a = spec["async"]
    return [{"prompt_token_ids": list(p["input_ids"]), "request_id": f"{tag}-{i}",
             "sampling": {"max_new_tokens": n, "ignore_eos": True}}
            for i, (p, n) in enumerate(zip(spec["prompts"], a["lengths"]))]


async def _one_run(backend: Any, reqs: list[dict[str, Any]], timeout: float) -> tuple[list[float], int]:
    """Submit everything; the time (s since submit) at which each record was consumed, and tokens."""
    t0 = time.perf_counter()
    backend.submit(reqs)
    stamps, toks = [], 0
    async for r in backend.stream(timeout=timeout):
        stamps.append(time.perf_counter() - t0)
        toks += len(r.token_ids)
    return stamps, toks


async def _pause_sync_resume(backend: Any, reqs: list[dict[str, Any]], consume: int, weights: dict[str, Any],
                             timeout: float) -> dict[str, Any]:
    backend.submit(reqs)
    got, spanning = 0, 0
    stream = backend.stream(timeout=timeout)
    async for r in stream:
        got += 1
        if got == consume:
            break
    in_flight = backend.start_async().pending
    t0 = time.perf_counter()
    await backend.pause("keep")
    t1 = time.perf_counter()
    rep = backend.sync_weights(weights)
    t2 = time.perf_counter()
    await backend.resume()
    t3 = time.perf_counter()
    async for r in backend.stream(timeout=timeout):
        got += 1
        spanning += bool(r.weight_versions and len(r.weight_versions) > 1)
    return {"timestamps": [t0, t1, t2, t3], "pause_s": t1 - t0, "sync_s": t2 - t1, "resume_s": t3 - t2,
            "total_s": t3 - t0, "in_flight_at_pause": in_flight, "spanning_records": spanning,
            "records": got, "sync_transport": rep.transport, "sync_bytes": rep.bytes_moved}


def run_async_row(spec: dict[str, Any]) -> dict[str, Any]:
    """The whole async row (see the module docstring); errors are recorded, not raised."""
    from genbackends.config import GenConfig
    from genbackends.registry import get_registry

    from genbackends_bench import sync_sources as ss

    a = spec["async"]
    res: dict[str, Any] = {"backend": spec["backend"], "kind": "async", "loadavg_at_start": os.getloadavg(),
                           "lengths": a["lengths"], "consume": a["consume"]}
    backend = get_registry().create_backend(GenConfig.model_validate(spec["gen_config"]))
    if not backend.capabilities().async_generation:
        res["error"] = f"backend {spec['backend']!r} does not offer asynchronous generation"
        return res
    try:
        t0 = time.perf_counter()
        if spec["backend"] != "vllm":
            backend.setup()
        backend.start_async()  # vllm: before setup(), AsyncLLM is the backend's only engine
        res["start_s"] = time.perf_counter() - t0
        n, timeout = a["consume"], spec.get("timeout_s", 600.0)
        for w in range(max(1, spec["warmup"])):  # a fresh engine's first steps are slow
            asyncio.run(_one_run(backend, _requests(spec, f"warm{w}"), timeout))
        sync_runs, async_runs = [], []
        for k in range(spec["runs"]):
            stamps, toks = asyncio.run(_one_run(backend, _requests(spec, f"sync{k}"), timeout))
            # synchronous: nothing reaches the trainer before the batch ends (its last record)
            sync_runs.append({"batch_end_s": stamps[-1], "time_to_n_s": stamps[-1], "output_tokens": toks})
            stamps, toks = asyncio.run(_one_run(backend, _requests(spec, f"async{k}"), timeout))
            async_runs.append({"stamps": stamps, "time_to_n_s": stamps[n - 1], "output_tokens": toks})
        res["sync_runs"], res["async_runs"] = sync_runs, async_runs
        res["sync_time_to_n_s"] = median([r["time_to_n_s"] for r in sync_runs])
        res["async_time_to_n_s"] = median([r["time_to_n_s"] for r in async_runs])
        res["speedup_time_to_n"] = res["sync_time_to_n_s"] / res["async_time_to_n_s"]
        weights = ss.hf_tensors(Path(spec["model_dir"]), "cpu", _dtype(spec["dtype"]), seed=spec["seed"] + 1)
        res["pause_sync_resume"] = asyncio.run(
            _pause_sync_resume(backend, _requests(spec, "psr"), n, weights, timeout))
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        res["loadavg_at_end"] = os.getloadavg()
        try:
            backend.shutdown()
        except Exception as e:
            res["shutdown_error"] = f"{type(e).__name__}: {e}"
    return res


def _dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
