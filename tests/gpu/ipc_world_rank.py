"""One rank of the GPU lane's two-rank trainer world (``test_gpu_transfer_engines``): rank 0
builds a vLLM backend with default options (``sync_transport: auto``; the engine gets its own
process, since this process is in a world of two), syncs host tensors and then CUDA tensors into
it, and checks each against transformers; rank 1 only meets rank 0 at the end. vLLM's own
``trainer_send_weights`` would all-gather the IPC handles over this world and wait for rank 1
forever; the sync must not.

    python ipc_world_rank.py MODEL MODEL_ALT      (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)
"""
from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main(model: str, model_alt: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=900))
    if dist.get_rank() == 0:
        from gpu_helpers import HFGpuReference, assert_bf16_close, engine_prompt_logprobs, start_backend, weights

        b = start_backend(model)  # default options: auto
        try:
            assert not b.replicas[0].in_process
            ids = [d["input_ids"] for d in b.build_dataset(["The capital of France is", "1 2 3 4", "def f(x):"])]
            out = {}
            for what, folder, device in (("host tensors", model_alt, "cpu"), ("CUDA tensors", model, "cuda")):
                report = b.sync_weights(weights(folder, device=device))
                assert report.transport == "transfer_engine", (what, report.transport)
                hf = HFGpuReference(folder)
                ref = hf.prompt_logprobs(ids)
                hf.free()
                assert_bf16_close(engine_prompt_logprobs(b, ids), ref, f"after syncing {what} through vLLM's ipc engine")
                out[what] = {"transport": report.transport, "seconds": report.seconds}
            print("RESULT " + json.dumps(out), flush=True)
        finally:
            b.shutdown()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
