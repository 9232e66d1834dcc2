"""Multi-process check runner (tests and manual checks): real GPTModel ranks on gloo, a real vLLM
engine on rank 0, both sync paths, export, and bad-input rejection, for one Megatron layout.

``python -m genbackends_megatron.testing SPEC.json`` spawns ``tp*pp`` ranks; rank 0 writes the
results JSON named in the spec. Spec keys: ``tp``, ``pp``, ``port``, ``out``, ``cases`` (a list of
``{"arch", "base", "alt", "vllm_tp": [..], "export": dir|None, "save": dir|None}``), ``bad_inputs``
(bool), ``direct_transport`` (``auto``/``group``/``rpc``), ``vp`` (virtual pipeline size).
Each case builds the Megatron model with the ``alt`` weights and an engine serving ``base``, so a
sync must really change the engine.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

PROBES = [[5, 17, 42, 99, 200, 7, 8, 250, 33, 61], [1, 2, 3, 4, 5, 6], [280, 12, 140, 9, 77, 299, 150]]


def _engine(model_dir: str, vllm_tp: int, in_process: bool) -> Any:
    from genbackends.config import GenConfig
    from genbackends.registry import get_registry

    cfg = GenConfig.model_validate(dict(
        backend="vllm", model=model_dir, seq_length=128, dtype="float32",
        sampling={"temperature": 0.0, "max_new_tokens": 1}, cache={"kv_cache_memory_bytes": 32 << 20},
        parallel={"tensor_parallel_size": vllm_tp},
        options={"vllm": {"enforce_eager": True, "in_process": in_process}}))
    b = get_registry().create_backend(cfg)
    b.setup()
    return b


def _worker(rank: int, spec: dict) -> None:
    world = spec["tp"] * spec["pp"]
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from genbackends.errors import WeightSyncError
    from genbackends_megatron import make_source
    from genbackends_megatron.export import export_hf
    from genbackends_megatron.model_builder import build_model, forward_logits, init_parallel, load_hf_weights
    from genbackends_megatron.verify import backend_prompt_logprobs, parity

    init_parallel(spec["tp"], spec["pp"], spec.get("vp"))
    results: dict[str, Any] = {"syncs": [], "exports": [], "bad_inputs": [], "errors": []}
    for case in spec["cases"]:
        model = build_model(case["base"])
        load_hf_weights(model, case["alt"])
        src = make_source(model, bucket_bytes=case.get("bucket_bytes", 1 << 20),
                          direct_transport=spec.get("direct_transport", "auto"))
        if case.get("export"):
            out = export_hf(model, case["export"], hf_config=case["base"])
            ids = torch.tensor([PROBES[0]])
            ours = forward_logits(model, ids)
            if rank == 0:
                from transformers import AutoModelForCausalLM

                hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
                with torch.no_grad():
                    ref = hf(ids).logits.float()
                results["exports"].append({"arch": case["arch"], "max_abs_diff": float((ref - ours).abs().max())})
        if case.get("save"):
            from genbackends_megatron.export import save_shards

            save_shards(model, case["save"], hf_config=case["base"])
        for vtp in case["vllm_tp"]:
            backend = _engine(case["base"], vtp, in_process=world == 1) if rank == 0 else None
            try:
                before = parity(model, backend, PROBES)
                for path in ("universal", "direct"):
                    if rank == 0 and path == "direct":
                        backend.sync_weights(case["base"])  # back to the old weights first
                    again = parity(model, backend, PROBES)
                    rep = src.sync(backend, path=path, probes=PROBES)
                    if rank == 0:
                        results["syncs"].append({
                            "arch": case["arch"], "tp": spec["tp"], "pp": spec["pp"], "vllm_tp": vtp, "path": path,
                            "transport": rep.transport, "parity": rep.parity, "before": again or before,
                            "bytes_moved": rep.bytes_moved, "peak_extra_bytes": rep.peak_extra_bytes,
                            "phases": rep.phases})
                if world == 1 and vtp == 1:
                    # The backend's own entry: sync_weights(source) takes the DirectWeightSource
                    # protocol (validate_direct, write_direct) when direct writes are allowed.
                    backend.sync_weights(case["base"])
                    rep = backend.sync_weights(src)
                    results.setdefault("protocol", []).append(
                        {"arch": case["arch"], "path": rep.path, "parity": parity(model, backend, PROBES)})
                if spec.get("bad_inputs") and vtp == case["vllm_tp"][0]:
                    results["bad_inputs"] += _bad_inputs(model, src, backend, rank)
            except Exception:
                results["errors"].append(traceback.format_exc())
                raise
            finally:
                if backend is not None:
                    backend.shutdown()
                if not dist.is_initialized():
                    # An in-process engine (world 1) shares and, on shutdown, destroys the default group.
                    init_parallel(spec["tp"], spec["pp"], spec.get("vp"))
        del model, src
    if rank == 0:
        with open(spec["out"], "w") as f:
            json.dump(results, f, indent=1)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def refused_on_both_paths(src: Any, backend: Any, rank: int, probe: list[int]) -> list[dict]:
    """Collective (every trainer rank): sync ``src`` by the universal, then the direct path, each
    expected to be refused. Rank 0 gets per path ``{"path", "error", "engine_unchanged"}``: the
    refusal's message (None if the sync went through) and whether the engine's prompt logprobs of
    ``probe`` stayed bit-identical; other ranks get []."""
    from genbackends.errors import WeightSyncError
    from genbackends_megatron.verify import backend_prompt_logprobs

    out = []
    for path in ("universal", "direct"):
        ref = backend_prompt_logprobs(backend, [probe]) if backend is not None else None
        err = None
        try:
            src.sync(backend, path=path)
        except WeightSyncError as e:
            err = str(e)
        after = backend_prompt_logprobs(backend, [probe]) if backend is not None else None
        if rank == 0:
            out.append({"path": path, "error": err, "engine_unchanged": ref == after})
    return out


def _bad_inputs(model: Any, src: Any, backend: Any, rank: int) -> list[dict]:
    """Wrong shard shape, missing layer, NaN in a shard, unknown name: rejected on both paths,
    engine unchanged."""
    import torch

    chunk = model.chunks[-1]
    layers = chunk.decoder.layers
    out = []

    def attempt(what: str, expect: str) -> None:
        for r in refused_on_both_paths(src, backend, rank, PROBES[0]):
            out.append({"case": what, **r, "names_it": bool(r["error"] and expect in r["error"])})

    w = layers[-1].mlp.linear_fc2.weight
    layers[-1].mlp.linear_fc2.weight = torch.nn.Parameter(torch.zeros(w.shape[0], w.shape[1] + 3, dtype=w.dtype))
    attempt("wrong_shape", "mlp.linear_fc2.weight")
    layers[-1].mlp.linear_fc2.weight = w

    removed = layers[-1]
    chunk.decoder.layers = torch.nn.ModuleList(list(layers)[:-1])
    attempt("missing_layer", f"decoder.layers.{len(layers) - 1}.")
    chunk.decoder.layers = layers

    w = layers[0].mlp.linear_fc1.weight
    saved = w.detach().flatten()[7].clone()
    with torch.no_grad():
        w.view(-1)[7] = float("nan")  # NaN in a shard: refused by the finite check on both paths
    attempt("nonfinite", "NaN")
    with torch.no_grad():
        w.view(-1)[7] = saved

    layers[0].mlp.register_parameter("mystery_scale", torch.nn.Parameter(torch.ones(3)))
    attempt("unknown_name", "mystery_scale")
    del layers[0].mlp.mystery_scale
    del removed
    return out


def main(argv: list[str] | None = None) -> int:
    import torch.multiprocessing as mp

    spec = json.loads(open((argv or sys.argv[1:])[0]).read())
    t0 = time.time()
    mp.spawn(_worker, args=(spec,), nprocs=spec["tp"] * spec["pp"], join=True)
    print(f"done in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
