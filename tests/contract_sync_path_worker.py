"""One trainer rank of tests/test_contract_sync_path.py: a real Megatron GPTModel (gloo, TP 2)
whose two ranks each host their own vLLM TP-1 engine (external_launcher), synced by the collective
direct path, which must enter through ``backend.sync_weights`` like every other sync.

argv: SPEC.json (keys: base, alt, out). Writes rank<N>.json.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

PROBES = [[5, 17, 42, 99, 200, 7, 8, 250, 33, 61], [280, 12, 140, 9, 77, 299, 150]]


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    import torch

    torch.set_num_threads(1)
    from genbackends.config import GenConfig
    from genbackends.errors import BackendStateError
    from genbackends.hookspecs import hookimpl
    from genbackends.registry import Registry
    from genbackends_megatron import make_source
    from genbackends_megatron.model_builder import build_model, init_parallel, load_hf_weights
    from genbackends_megatron.verify import backend_prompt_logprobs, parity

    syncs: list[dict] = []

    class Recorder:
        """An ordinary hook implementation, as a third-party plugin would write it."""

        @hookimpl
        def genbackends_on_after_sync(self, backend, report):
            syncs.append({"path": report.path, "transport": report.transport, "bytes": report.bytes_moved})

    init_parallel(2, 1)
    model = build_model(spec["base"])
    load_hf_weights(model, spec["alt"])  # the trainer holds other weights than the engine serves
    source = make_source(model, engine_ranks=tuple(range(world)))
    cfg = GenConfig.model_validate(dict(
        backend="vllm", model=spec["base"], seq_length=128, dtype="float32",
        sampling={"temperature": 0.0, "max_new_tokens": 1}, cache={"kv_cache_memory_bytes": 32 << 20},
        parallel={"tensor_parallel_size": 1, "executor": "external_launcher"},
        options={"vllm": {"enforce_eager": True}}))
    reg = Registry()
    reg.register_object(Recorder(), name="recorder")
    backend = reg.create_backend(cfg)
    backend.setup()
    out: dict = {"rank": rank}
    try:
        out["before"] = parity(model, backend, PROBES)
        rep = source.sync(backend, path="direct", probes=PROBES)
        out["first"] = {"path": rep.path, "transport": rep.transport, "parity": rep.parity}
        out["hooks_after_first"] = list(syncs)
        # A training step changes the weights; the engine is put to sleep and only its KV cache is
        # woken: a sync now would write into asleep weights and must be refused on every rank.
        with torch.no_grad():
            for c in model.chunks:
                for p in c.parameters():
                    p.mul_(1.05)
        ref = backend_prompt_logprobs(backend, PROBES)
        for level, wake in ((1, None), (2, ["kv_cache"])):
            backend.sleep(level)
            if wake:
                backend.wake_up(wake)
            try:
                source.sync(backend, path="direct")
                out[f"asleep{level}_error"] = None
            except BackendStateError as e:
                out[f"asleep{level}_error"] = f"{type(e).__name__}: {e}"
            backend.wake_up()
            out[f"asleep{level}_engine_unchanged"] = backend_prompt_logprobs(backend, PROBES) == ref
        out["hooks_after_refusals"] = list(syncs)
        rep = source.sync(backend, path="direct", probes=PROBES)
        out["awake"] = {"parity": rep.parity}
        out["hooks_at_end"] = list(syncs)
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
