"""One trainer rank of tests/test_megatron_colocated.py: a real Megatron GPTModel (gloo) whose
ranks each host one worker of a vLLM engine (external_launcher), synced by the direct path.

argv: SPEC.json (keys: tp, pp, engine_tp, base, alt, out). Writes rank<N>.json.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

PROBES = [[5, 17, 42, 99, 200, 7, 8, 250, 33, 61], [1, 2, 3, 4, 5, 6], [280, 12, 140, 9, 77, 299, 150]]


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    import torch

    torch.set_num_threads(1)
    from genbackends.config import GenConfig
    from genbackends.errors import WeightSyncError
    from genbackends.registry import get_registry
    from genbackends_megatron import make_source
    from genbackends_megatron.model_builder import build_model, init_parallel, load_hf_weights
    from genbackends_megatron.verify import backend_prompt_logprobs, parity

    init_parallel(spec["tp"], spec["pp"])
    model = build_model(spec["base"])
    load_hf_weights(model, spec["alt"])  # the trainer holds other weights than the engine serves
    source = make_source(model, engine_ranks=tuple(range(world)))
    cfg = GenConfig.model_validate(dict(
        backend="vllm", model=spec["base"], seq_length=128, dtype="float32",
        sampling={"temperature": 0.0, "max_new_tokens": 1}, cache={"kv_cache_memory_bytes": 32 << 20},
        parallel={"tensor_parallel_size": spec["engine_tp"], "executor": "external_launcher"},
        options={"vllm": {"enforce_eager": True}}))
    backend = get_registry().create_backend(cfg)
    backend.setup()
    out: dict = {"rank": rank}
    try:
        out["before"] = parity(model, backend, PROBES)
        # A bad shard on ONE rank only: every rank must refuse before any engine is written.
        ref = backend_prompt_logprobs(backend, PROBES[:1])
        layers = model.chunks[-1].decoder.layers
        w = layers[-1].mlp.linear_fc2.weight
        if rank == world - 1:
            layers[-1].mlp.linear_fc2.weight = torch.nn.Parameter(torch.zeros(w.shape[0], w.shape[1] + 3))
        try:
            source.sync(backend, path="direct")
            out["bad_error"] = None
        except WeightSyncError as e:
            out["bad_error"] = str(e)
        layers[-1].mlp.linear_fc2.weight = w
        out["bad_engine_unchanged"] = backend_prompt_logprobs(backend, PROBES[:1]) == ref
        rep = source.sync(backend, path="direct", probes=PROBES)
        out["first"] = {"parity": rep.parity, "transport": rep.transport, "details": rep.details,
                        "bytes_moved": rep.bytes_moved, "peak_extra_bytes": rep.peak_extra_bytes}
        # A training step changes the weights in place: the second sync reuses the plan and the
        # compiled copy views, and must still deliver the new values.
        with torch.no_grad():
            for c in model.chunks:
                for p in c.parameters():
                    p.mul_(1.05)
        out["stale"] = parity(model, backend, PROBES)
        rep = source.sync(backend, path="direct", probes=PROBES)
        out["second"] = {"parity": rep.parity, "plan_seconds": rep.details["plan_seconds"]}
    except Exception:
        out["error"] = traceback.format_exc()
    with open(os.path.join(spec["out"], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    backend.shutdown()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
