"""One rank of a multi-GPU scenario (started by :mod:`multigpu` with torchrun-style env vars and
the scenario spec in ``GENBACKENDS_MULTIGPU_SPEC``). Rank 0 writes the scenario's result JSON.

Scenarios:

* ``colocated`` (a, b, c): Megatron TPxPP on all ranks; vLLM (``external_launcher``) with
  ``engine_tp`` inside the same ranks (``engine_tp < world``: several replicas). Paths: ``direct``
  (plan copies into each rank's vLLM worker, the adapter's colocated direct writer) and
  ``universal`` (HF-named tensors through the adapter's source and ``backend.sync_weights``).
* ``separate`` (d): Megatron TP=T alone on ranks 0..T-1, a vLLM TP=E engine alone on the next E
  ranks, each side with its own default group and GPUs; weights travel over a
  :class:`~genbackends.channel.WeightChannel` (trainer rank 0 -> every engine rank, NCCL/gloo).
* ``generation`` (e): one engine of ``engine_tp`` in this process, throughput on a fixed workload.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from multigpu_common import (  # noqa: E402
    allgather_floor, backend_config, copy_floor, load_spec, model_bytes, parity_ok, perturb, probes,
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


def run_separate(spec: dict[str, Any], rank: int, world: int) -> dict[str, Any] | None:
    """Ranks ``0..T-1``: Megatron TP=T (own default group, own GPUs). Ranks ``T..T+E-1``: one vLLM
    TP=E engine (``external_launcher`` when E > 1; own default group, own GPUs). Weights travel
    over a :class:`~genbackends.channel.WeightChannel`: trainer rank 0 -> every engine rank."""
    import pickle

    import torch

    from genbackends.channel import WeightChannel

    T, E = int(spec.get("trainer_tp", 1)), int(spec.get("engine_tp", 1))
    trainer = rank < T
    local = rank if trainer else rank - T
    # Each side's own default group (the trainer's megatron, the engine's vLLM); the launcher
    # already gave each side its own GPUs and a side-local LOCAL_RANK.
    os.environ.update(RANK=str(local), WORLD_SIZE=str(T if trainer else E), LOCAL_RANK=str(local),
                      MASTER_PORT=str(spec["master_port"] + (0 if trainer else 3)))
    dev = torch.device("cpu") if spec["cpu"] else torch.device("cuda", torch.cuda.current_device())
    res: dict[str, Any] = {"trainer": f"megatron tp{T} on ranks 0..{T - 1}", "engine": f"vllm tp{E} on ranks {T}..{T + E - 1}"}
    channel = None
    if trainer:
        from genbackends_megatron import make_source
        from genbackends_megatron.model_builder import forward_logprobs

        t0 = time.perf_counter()
        model = _build_trainer(spec, T, 1)
        res["trainer_build_s"] = time.perf_counter() - t0
        source = make_source(model)  # trainer rank 0 assembles the HF tensors
        man = source.manifest()
        if rank == 0:
            channel = WeightChannel("127.0.0.1", spec["group_port"], 0, 1 + E, device=dev)
    else:
        from genbackends.registry import get_registry

        t0 = time.perf_counter()
        backend = get_registry().create_backend(backend_config(spec, tp=E, executor="external_launcher" if E > 1 else None))
        backend.setup()
        res["engine_start_s"] = time.perf_counter() - t0
        channel = WeightChannel("127.0.0.1", spec["group_port"], 1 + local, 1 + E, device=dev)
        exp = backend.expected_weights()
        from genbackends.weights import TensorSpec

        man = {n: TensorSpec(tuple(s), torch_dtype(spec)) for n, s in exp.items()}
    from genbackends_megatron.layout import ModelDims

    vocab = ModelDims.from_hf_config(spec["model"]).vocab_size
    pr = probes(vocab, spec["num_probes"], spec["probe_len"])
    nbytes = model_bytes(man)
    reps = spec["repeats"]
    floors: dict[str, Any] = {}
    if channel is not None:
        floors = {"allgather": allgather_floor(nbytes, spec, reps, channel=channel), "copy": copy_floor(nbytes, spec, reps)}
        # Broadcast of the same bytes from the sender to every engine rank on the same group.
        buf = torch.ones(max(1, nbytes // torch.empty((), dtype=torch_dtype(spec)).element_size()), dtype=torch_dtype(spec), device=dev)
        channel.broadcast(buf)
        floors["broadcast"] = {"bytes": nbytes, **summarize([timed(lambda: channel.broadcast(buf), spec, channel.barrier)[0]
                                                             for _ in range(reps)])}
        del buf
        from multigpu_common import _release

        _release(spec)
    if trainer:
        perturb(model, 0)
        ours = [forward_logprobs(model, torch.tensor([p]))[0].double().cpu() for p in pr]  # collective (TP)
        if channel is not None:
            def once() -> Any:
                return channel.send(source, spec.get("bucket_bytes"))
            barrier = channel.barrier
        else:  # other trainer ranks take part in the (collective) assembly only
            def once() -> Any:
                for _ in source.iter_buckets(spec.get("bucket_bytes")):
                    pass
            barrier = None
    else:
        from genbackends_megatron.verify import backend_prompt_logprobs

        before = backend_prompt_logprobs(backend, pr)
        if local == 0:
            channel.store.set("engine_lp_before", pickle.dumps(before))

        def once() -> Any:
            return channel.receive(backend).to_dict()
        barrier = channel.barrier
    warm, last = timed(once, spec, barrier)
    times = []
    for _ in range(reps):
        dt, last = timed(once, spec, barrier)
        times.append(dt)
    if not trainer:
        lp = backend_prompt_logprobs(backend, pr)  # collective over the engine's ranks
        if local == 0:
            channel.store.set("engine_lp", pickle.dumps(lp))
            channel.store.set("engine_res", pickle.dumps({"engine_start_s": res["engine_start_s"], "engine_last": last}))
        channel.barrier()  # keep the store (served by trainer rank 0) alive until rank 0 has read
        backend.shutdown()
        return None
    if rank != 0:
        return None

    def diff(eng: list[list[float]]) -> dict[str, float]:
        d = torch.cat([(a - torch.tensor(b, dtype=torch.float64)).abs() for a, b in zip(ours, eng)])
        return {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()), "num_tokens": float(d.numel())}

    par = diff(pickle.loads(channel.store.get("engine_lp")))
    res["parity_before_sync"] = diff(pickle.loads(channel.store.get("engine_lp_before")))
    engine_side = pickle.loads(channel.store.get("engine_res"))
    res.update(engine_side)
    res.update({"model_bytes": nbytes, "floors": floors, "trainer_tp": T, "engine_tp": E,
                "paths": {"universal": {"warmup_s": warm, **summarize(times), "parity": par, "sender": last,
                                        "ok": parity_ok(par, spec), "sender_floor": "broadcast"}}})
    res["paths"]["universal"]["last"] = res.pop("engine_last", None)
    channel.barrier()
    return res


def run_generation(spec: dict[str, Any], rank: int, world: int) -> dict[str, Any] | None:
    """One engine (TP ``engine_tp``: mp executor when > 1) in this process; fixed workload."""
    from genbackends.registry import get_registry

    tp = spec["engine_tp"]
    cfg = backend_config(spec, tp=tp, executor=None, seq_length=spec["in_len"] + spec["out_len"] + 8,
                         extra_options={"in_process": tp == 1})
    cfg.sampling = cfg.sampling.model_copy(update={"max_new_tokens": spec["out_len"], "ignore_eos": True,
                                                   "temperature": 1.0, "seed": spec.get("gen_seed")})
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
