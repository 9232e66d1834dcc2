"""One rank of a multi-GPU scenario (started by :mod:`multigpu` with torchrun-style env vars and
the scenario spec in ``GENBACKENDS_MULTIGPU_SPEC``). Rank 0 writes the scenario's result JSON.

Scenarios:

* ``colocated`` (a, b, c): Megatron TPxPP on all ranks; vLLM (``external_launcher``) with
  ``engine_tp`` inside the same ranks (``engine_tp < world``: several replicas). Paths: ``direct``
  (plan copies into each rank's vLLM worker, the adapter's colocated direct writer) and
  ``universal`` (HF-named tensors through the adapter's source and ``backend.sync_weights``).
* ``separate`` (d): Megatron TP1 alone on rank 0, a vLLM TP1 engine alone on rank 1, each with its
  own private default group; weights travel over a stand-alone two-rank group (NCCL/gloo).
* ``generation`` (e): one engine of ``engine_tp`` in this process, throughput on a fixed workload.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from genbackends.weights import bucketize

sys.path.insert(0, str(Path(__file__).resolve().parent))

from multigpu_common import (  # noqa: E402
    allgather_floor, backend_config, copy_floor, load_spec, model_bytes, parity_ok, perturb, pg_barrier, probes,
    setup_process, summarize, timed, torch_dtype, write_json,
)


def _build_trainer(spec: dict[str, Any], tp: int, pp: int) -> Any:
    """Megatron model (random seeded weights, not the engine's) on this rank's device."""
    from genbackends_megatron.model_builder import build_model, init_parallel

    init_parallel(tp=tp, pp=pp)
    model = build_model(spec["model"], dtype=torch_dtype(spec), init_parallel_state=False, seed=1234)
    if not spec["cpu"]:
        for c in model.chunks:
            c.cuda()
    return model


def run_colocated(spec: dict[str, Any], rank: int, world: int) -> dict[str, Any] | None:
    import torch.distributed as dist

    from genbackends.registry import get_registry
    from genbackends_megatron import make_source
    from genbackends_megatron.verify import parity

    res: dict[str, Any] = {"megatron": {"tp": spec["tp"], "pp": spec["pp"]}, "engine_tp": spec["engine_tp"],
                           "replicas": world // spec["engine_tp"], "world": world}
    t0 = time.perf_counter()
    model = _build_trainer(spec, spec["tp"], spec["pp"])
    res["trainer_build_s"] = time.perf_counter() - t0
    source = make_source(model, engine_ranks=tuple(range(world)))
    nbytes = model_bytes(source.manifest())
    res["model_bytes"] = nbytes
    reps = spec["repeats"]
    res["floors"] = {"allgather": allgather_floor(nbytes, spec, reps), "copy": copy_floor(nbytes, spec, reps)}
    t0 = time.perf_counter()
    backend = get_registry().create_backend(backend_config(spec, tp=spec["engine_tp"], executor="external_launcher"))
    backend.setup()
    res["engine_start_s"] = time.perf_counter() - t0
    pr = probes(model.dims.vocab_size, spec["num_probes"], spec["probe_len"])
    res["parity_before_sync"] = parity(model, backend, pr)
    res["paths"] = {}
    for k, path in enumerate(spec["paths"]):
        perturb(model, k)  # each path must deliver weights the engine has not seen yet
        out: dict[str, Any] = {}
        try:
            def once() -> Any:
                rep = source.sync(backend, path=path)
                return rep.to_dict() if rep is not None else None

            warm, last = timed(once, spec, dist.barrier)
            times = []
            for _ in range(reps):
                dt, last = timed(once, spec, dist.barrier)
                times.append(dt)
            out.update({"warmup_s": warm, **summarize(times), "last": _trim(last)})
            out["parity"] = parity(model, backend, pr)
            out["ok"] = parity_ok(out["parity"], spec)
        except Exception as e:  # one path failing must not hide the other's numbers
            out["error"] = f"{type(e).__name__}: {e}"
            out["traceback"] = traceback.format_exc()[-3000:]
            out["ok"] = False
        res["paths"][path] = out
        dist.barrier()
    backend.shutdown()
    return res if rank == 0 else None


def _trim(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _trim(v) for k, v in obj.items() if k not in ("details",) or not isinstance(v, dict) or len(str(v)) < 2000}
    return obj


class _GroupReceiveSource:
    """A WeightSource on the engine rank whose tensors arrive, in the sender's order, over a
    stand-alone process group (rank 0 sends)."""

    def __init__(self, pg: Any, order: list[str], manifest: dict[str, Any], device: Any, bcast: Any):
        self.pg, self.order, self._manifest, self.device, self.bcast = pg, order, manifest, device, bcast

    def manifest(self) -> dict[str, Any]:
        return self._manifest

    def iter_buckets(self, bucket_bytes: int | None = None):
        import torch

        def received():
            for name in self.order:
                spec = self._manifest[name]
                t = torch.empty(spec.shape, dtype=spec.dtype, device=self.device)
                self.bcast(t)
                yield name, t

        yield from bucketize(received(), bucket_bytes or (256 << 20))


def _stateless_pg(spec: dict[str, Any], rank: int) -> tuple[Any, Any]:
    """A two-rank process group (NCCL on GPUs, gloo on the CPU) that leaves each process's own
    default group alone (vLLM's helper builds it), plus a TCPStore for small metadata."""
    import datetime
    import inspect

    from torch.distributed import TCPStore
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group as make_pg

    backend = "gloo" if spec["cpu"] else "nccl"
    store = TCPStore("127.0.0.1", spec["master_port"] + 2, 2, is_master=rank == 0,
                     timeout=datetime.timedelta(seconds=300), wait_for_workers=False)
    if "return_store" in inspect.signature(make_pg).parameters:  # newer releases return a tuple
        pg, _ = make_pg("127.0.0.1", spec["group_port"], rank, 2, backend, return_store=True)
    else:
        pg = make_pg("127.0.0.1", spec["group_port"], rank, 2, backend)
    return pg, store


def _make_bcast(pg: Any) -> Any:
    import torch.distributed as dist

    def bcast(t: Any) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.rootTensor = 0
        pg.broadcast([t], opts).wait()

    return bcast


def run_separate(spec: dict[str, Any], rank: int, world: int) -> dict[str, Any] | None:
    """Rank 0: trainer. Rank 1: engine. Private default groups, one shared stand-alone group."""
    import pickle

    import torch

    # Each side's own default group: a world of one (the trainer's megatron, the engine's vLLM).
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_PORT=str(spec["master_port"]))
    dev = "cpu" if spec["cpu"] else torch.device("cuda", 0)
    res: dict[str, Any] = {"trainer": "megatron tp1 on rank 0", "engine": "vllm tp1 on rank 1"}
    if rank == 0:
        from genbackends_megatron import make_source
        from genbackends_megatron.model_builder import forward_logprobs

        t0 = time.perf_counter()
        model = _build_trainer(spec, 1, 1)
        res["trainer_build_s"] = time.perf_counter() - t0
        source = make_source(model)
        pg, store = _stateless_pg(spec, rank)
        man = source.manifest()
        order = [n for b in source.iter_buckets(1 << 62) for n, _ in b]
        store.set("order", pickle.dumps(order))
    else:
        from genbackends.registry import get_registry

        t0 = time.perf_counter()
        backend = get_registry().create_backend(backend_config(spec, tp=1, executor=None))
        backend.setup()
        res["engine_start_s"] = time.perf_counter() - t0
        pg, store = _stateless_pg(spec, rank)
        order = pickle.loads(store.get("order"))
        from genbackends.weights import TensorSpec, validate_manifest

        exp = backend.expected_weights()
        man = {n: TensorSpec(tuple(exp[n]), torch_dtype(spec)) for n in order}
        validate_manifest(man, exp)
    bcast = _make_bcast(pg)
    nbytes = model_bytes(man)
    reps = spec["repeats"]
    floors = {"allgather": allgather_floor(nbytes, spec, reps, pg=pg), "copy": copy_floor(nbytes, spec, reps)}
    # Broadcast of the same bytes root 0 -> 1 on the same group: the link's floor for this layout.
    buf = torch.ones(max(1, nbytes // torch.empty((), dtype=torch_dtype(spec)).element_size()), dtype=torch_dtype(spec), device=dev)
    bcast(buf)
    floors["broadcast"] = {"bytes": nbytes, **summarize([timed(lambda: bcast(buf), spec, lambda: pg_barrier(pg, spec))[0]
                                                         for _ in range(reps)])}
    del buf
    from multigpu_common import _release

    _release(spec)
    pr = None
    if rank == 0:
        perturb(model, 0)

        def once() -> Any:
            for bucket in source.iter_buckets(spec.get("bucket_bytes")):
                for _n, t in bucket:
                    bcast(t.contiguous())
            return None
    else:
        src = _GroupReceiveSource(pg, order, man, dev, bcast)

        def once() -> Any:
            return backend.sync_weights(src).to_dict()
    warm, last = timed(once, spec, lambda: pg_barrier(pg, spec))
    times = []
    for _ in range(reps):
        dt, last = timed(once, spec, lambda: pg_barrier(pg, spec))
        times.append(dt)
    # Parity: the engine's prompt logprobs (rank 1) against the trainer's forward (rank 0).
    from genbackends_megatron.layout import ModelDims

    vocab = ModelDims.from_hf_config(spec["model"]).vocab_size
    pr = probes(vocab, spec["num_probes"], spec["probe_len"])
    if rank == 0:
        ours = [forward_logprobs(model, torch.tensor([p]))[0].double().cpu().tolist() for p in pr]
        eng = pickle.loads(store.get("engine_lp"))
        d = torch.cat([(torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)).abs()
                       for a, b in zip(ours, eng)])
        par = {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()), "num_tokens": float(d.numel())}
        engine_side = pickle.loads(store.get("engine_res"))
        res.update(engine_side)
        res.update({"model_bytes": nbytes, "floors": floors,
                    "paths": {"universal": {"warmup_s": warm, **summarize(times), "parity": par,
                                            "ok": parity_ok(par, spec), "sender_floor": "broadcast"}}})
        res["paths"]["universal"]["last"] = res.pop("engine_last", None)
        pg_barrier(pg, spec)  # the engine rank waits for this before it lets the store go
        return res
    from genbackends_megatron.verify import backend_prompt_logprobs

    store.set("engine_lp", pickle.dumps(backend_prompt_logprobs(backend, pr)))
    store.set("engine_res", pickle.dumps({"engine_start_s": res["engine_start_s"], "engine_last": last,
                                          "engine_floors": {"copy": floors["copy"]}}))
    pg_barrier(pg, spec)  # keep the store alive until rank 0 has read
    backend.shutdown()
    return None


def run_generation(spec: dict[str, Any], rank: int, world: int) -> dict[str, Any] | None:
    """One engine (TP ``engine_tp``: mp executor when > 1) in this process; fixed workload."""
    from genbackends.registry import get_registry

    tp = spec["engine_tp"]
    cfg = backend_config(spec, tp=tp, executor=None, seq_length=spec["in_len"] + spec["out_len"] + 8,
                         extra_options={"in_process": tp == 1})
    cfg.sampling = cfg.sampling.model_copy(update={"max_new_tokens": spec["out_len"], "ignore_eos": True,
                                                   "temperature": 1.0, "seed": 0})
    cfg.cache = cfg.cache.model_copy(update={"gpu_memory_utilization": float(spec.get("gen_gpu_memory_utilization", 0.85))}) \
        if not spec["cpu"] else cfg.cache
    t0 = time.perf_counter()
    backend = get_registry().create_backend(cfg)
    backend.setup()
    start = time.perf_counter() - t0
    from genbackends_megatron.layout import ModelDims

    vocab = ModelDims.from_hf_config(spec["model"]).vocab_size
    prompts = probes(vocab, spec["num_prompts"], spec["in_len"], seed=11)
    backend.forward_step(prompts[: min(8, len(prompts))])  # warm-up
    t0 = time.perf_counter()
    outs = backend.forward_step(prompts)
    secs = time.perf_counter() - t0
    out_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    backend.shutdown()
    return {"engine_tp": tp, "engine_start_s": start, "prompts": len(prompts), "in_len": spec["in_len"],
            "out_len": spec["out_len"], "output_tokens": out_tokens, "seconds": secs,
            "output_tokens_per_s": out_tokens / secs, "total_tokens_per_s": (out_tokens + len(prompts) * spec["in_len"]) / secs,
            "enforce_eager": spec.get("enforce_eager", True)}


def main() -> int:
    spec = load_spec()
    rank, world = setup_process(spec)
    fn = {"colocated": run_colocated, "separate": run_separate, "generation": run_generation}[spec["kind"]]
    res = fn(spec, rank, world)
    if res is not None:
        res["rank0_wall_s"] = time.time() - float(os.environ.get("GENBACKENDS_MULTIGPU_T0", time.time()))
        write_json(Path(spec["result_file"]), res)
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    except Exception:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
