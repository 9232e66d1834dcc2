"""Process of tests/gpu/test_gpu_megatron.py: a real megatron-core GPTModel (bf16, TP1, NCCL world
of one) with the ``alt`` weights, an in-process CUDA vLLM engine serving ``base``, both sync paths
and the backend's own ``sync_weights(source)``; writes prompt-logprob parity figures to OUT.

    python megatron_gpu_worker.py BASE_DIR ALT_DIR OUT_JSON
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(base: str, alt: str, out: str) -> None:
    os.environ.setdefault("MASTER_PORT", "29791")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch
    import torch.distributed as dist

    from genbackends_megatron import make_source
    from genbackends_megatron.model_builder import build_model, init_parallel, load_hf_weights
    from genbackends_megatron.testing import PROBES
    from genbackends_megatron.verify import parity

    from gpu_helpers import start_backend

    init_parallel(1, 1)  # nccl: CUDA is there
    res: dict = {"dist_backend": dist.get_backend(), "megatron_device": None, "paths": {}}
    model = build_model(base, dtype=torch.bfloat16)
    load_hf_weights(model, alt)
    res["megatron_device"] = str(next(model.chunks[0].parameters()).device)
    backend = start_backend(base, vllm={"in_process": True})
    try:
        src = make_source(model)
        res["before"] = parity(model, backend, PROBES)
        for path in ("universal", "direct"):
            backend.sync_weights(base)  # back to the old weights: each path must do the whole job
            res["paths"][path] = {"reset": parity(model, backend, PROBES)}
            rep = src.sync(backend, path=path)
            res["paths"][path].update(transport=rep.transport, parity=parity(model, backend, PROBES))
        backend.sync_weights(base)
        rep = backend.sync_weights(src)  # the backend's own entry (DirectWeightSource protocol)
        res["paths"]["backend_entry"] = {"path": rep.path, "transport": rep.transport, "parity": parity(model, backend, PROBES)}
    finally:
        backend.shutdown()
        Path(out).write_text(json.dumps(res, indent=1))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
