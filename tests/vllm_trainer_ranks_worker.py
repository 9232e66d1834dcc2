"""One rank of tests/test_vllm_trainer_ranks.py: a trainer that already runs torch.distributed
(gloo, WORLD_SIZE ranks, env:// like torchrun) and builds the vLLM backend with default options
on rank 0 only. argv: model out_dir. Rank 0 writes rank0.json (tokens, chosen engine placement,
the trainer's world after setup, the refusal of an explicit in_process=True); every rank then meets the others in a barrier."""
from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    model, out_dir = sys.argv[1], sys.argv[2]
    sys.path.insert(0, os.path.dirname(__file__))
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 0:
        from genbackends.errors import ConfigError
        from genbackends.registry import get_registry
        from vllm_helpers import PROMPTS, vllm_config

        res: dict = {}
        t0 = time.perf_counter()
        b = get_registry().create_backend(vllm_config(model, sampling={"ignore_eos": True, "max_new_tokens": 8}))
        try:
            b.setup()
        except ConfigError as e:  # the other allowed outcome: refused at once, naming the option
            res["refused"] = str(e)
        else:
            res["in_process"] = b.replicas[0].in_process
            res["tokens"] = [r.token_ids for r in b.generate(PROMPTS)]
            res["ids"] = [d["input_ids"] for d in b.build_dataset(PROMPTS)]
            res["trainer_world_after_setup"] = dist.get_world_size()
            b.shutdown()
        res["seconds"] = time.perf_counter() - t0
        # An explicit in_process=True cannot work here: refused at once, naming the option (timed
        # after vLLM was imported above, so the figure is the check itself, not an import).
        t0 = time.perf_counter()
        try:
            get_registry().create_backend(vllm_config(model, vllm={"in_process": True})).setup()
        except ConfigError as e:
            res["explicit_in_process"] = {"error": str(e), "seconds": time.perf_counter() - t0}
        with open(os.path.join(out_dir, "rank0.json"), "w") as f:
            json.dump(res, f)
    dist.barrier()  # the trainer's own world still works after the engine came and went
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
