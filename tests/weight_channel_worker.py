"""One process of tests/test_weight_channel.py. Ranks 0-1: a Megatron TP2 trainer (gloo, its own
default group). Rank 2: a vLLM TP1 engine in its own process and default group. Weights travel
over a genbackends.channel.WeightChannel (trainer rank 0 -> engine).

argv: SPEC.json (keys: base, alt, out, port). Writes rank<N>.json.
"""
from __future__ import annotations

import json
import os
import pickle
import sys
import traceback

PROBES = [[5, 17, 42, 99, 200, 7, 8, 250, 33, 61], [1, 2, 3, 4, 5, 6], [280, 12, 140, 9, 77, 299, 150]]


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    rank = int(os.environ["RANK"])
    trainer = rank < 2
    os.environ.update(RANK=str(rank if trainer else 0), WORLD_SIZE="2" if trainer else "1", LOCAL_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"] + (0 if trainer else 3)))
    import torch

    torch.set_num_threads(1)
    from genbackends.channel import WeightChannel
    from genbackends.errors import WeightSyncError
    from genbackends.weights import TensorListSource

    out: dict = {"rank": rank}
    channel = None
    try:
        if trainer:
            from genbackends_megatron import make_source
            from genbackends_megatron.model_builder import build_model, forward_logprobs, init_parallel, load_hf_weights

            init_parallel(2, 1)
            model = build_model(spec["base"])
            load_hf_weights(model, spec["alt"])
            source = make_source(model)
            if rank == 0:
                channel = WeightChannel("127.0.0.1", spec["port"] + 1, 0, 2)
        else:
            from genbackends.config import GenConfig
            from genbackends.registry import get_registry
            from genbackends_megatron.verify import backend_prompt_logprobs

            cfg = GenConfig.model_validate(dict(
                backend="vllm", model=spec["base"], seq_length=128, dtype="float32",
                sampling={"temperature": 0.0, "max_new_tokens": 1}, cache={"kv_cache_memory_bytes": 32 << 20},
                options={"vllm": {"enforce_eager": True, "in_process": True}}))
            backend = get_registry().create_backend(cfg)
            backend.setup()
            channel = WeightChannel("127.0.0.1", spec["port"] + 1, 1, 2)

        # 1. A sync the engine must refuse (wrong shape): nobody writes, both ends raise.
        if rank == 0:
            bad = TensorListSource({"model.layers.0.mlp.down_proj.weight": torch.zeros(7, 3)})
            try:
                channel.send(bad)
                out["bad_error"] = None
            except WeightSyncError as e:
                out["bad_error"] = str(e)
        elif not trainer:
            ref = backend_prompt_logprobs(backend, PROBES)
            try:
                channel.receive(backend)
                out["bad_error"] = None
            except WeightSyncError as e:
                out["bad_error"] = str(e)
            out["bad_engine_unchanged"] = backend_prompt_logprobs(backend, PROBES) == ref
            out["before"] = ref

        # 2. Two real syncs from the Megatron model (the second after an in-place change).
        for round_ in ("first", "second"):
            if trainer:
                if round_ == "second":
                    with torch.no_grad():
                        for c in model.chunks:
                            for p in c.parameters():
                                p.mul_(1.05)
                if rank == 0:
                    out[round_] = channel.send(source, 1 << 20)
                else:
                    for _ in source.iter_buckets(1 << 20):  # the TP peer takes part in the assembly
                        pass
                ours = [forward_logprobs(model, torch.tensor([p]))[0].double().tolist() for p in PROBES]
                if rank == 0:
                    out[round_ + "_ours"] = ours
                    out[round_ + "_engine"] = pickle.loads(channel.store.get(f"test/engine/{round_}"))
                    channel.barrier()
            else:
                rep = channel.receive(backend)
                out[round_] = {"transport": rep.transport, "num_tensors": rep.num_tensors, "bytes": rep.bytes_moved}
                channel.store.set(f"test/engine/{round_}", pickle.dumps(backend_prompt_logprobs(backend, PROBES)))
                channel.barrier()
    except Exception:
        out["error"] = traceback.format_exc()
    with open(os.path.join(spec["out"], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    if not trainer:
        backend.shutdown()


if __name__ == "__main__":
    main()
