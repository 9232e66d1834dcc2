"""GPU lane: asynchronous rollouts on CUDA vLLM (AsyncLLM, engine core in its own process) with the
tiny model in bf16. What the CPU run cannot show: the release on the GPU image (vLLM 0.24) has the
pause/resume, preemption and weight-version calls the engine uses, a sync reaches the CUDA worker
in the engine's process through vLLM's ipc engine (what ``sync_transport: auto`` picks there), and a keep-mode sync mid-flight gives each span the logprobs of its own weights (bf16
tolerance against transformers on the GPU)."""
from __future__ import annotations

import asyncio

import pytest
import torch

from gpu_helpers import HFGpuReference, assert_bf16_close, gpu_config, weights

pytestmark = pytest.mark.gpu


def test_keep_mode_sync_and_abort_on_cuda_asyncllm(tiny_llama, tiny_llama_alt):
    from genbackends.registry import get_registry

    b = get_registry().create_backend(gpu_config(tiny_llama, seq_length=512))
    eng = b.start_async()
    try:
        ids = b.submit([{"prompt": p, "sampling": {"max_new_tokens": n}}
                        for p, n in (("the quick brown fox", 200), ("a b c", 3), ("hello world", 120))])

        async def go() -> list:
            for _ in range(6000):
                if eng.progress(ids[0]) >= 3:
                    break
                await asyncio.sleep(0.01)
            await b.pause("keep")
            report = b.sync_weights(weights(tiny_llama_alt))  # CUDA tensors: auto takes vLLM's ipc engine
            assert report.transport == "transfer_engine", report.transport
            await b.resume()
            recs = [r async for r in b.stream(timeout=600)]
            late = b.submit("one two three", sampling={"max_new_tokens": 300})
            for _ in range(6000):
                if eng.progress(late[0]) >= 2:
                    break
                await asyncio.sleep(0.01)
            await b.pause("abort")
            await b.resume()
            return recs + [r async for r in b.stream(timeout=600)]

        recs = asyncio.run(go())
        assert sorted(r.request_id for r in recs[:3]) == sorted(ids) and len(recs) == 4
        spanning = [r for r in recs[:3] if len(r.weight_versions) == 2]
        assert spanning, [r.weight_versions for r in recs]
        refs = {0: HFGpuReference(tiny_llama), 1: HFGpuReference(tiny_llama_alt)}
        eng_lp, ref_lp = [], []
        for r in recs[:3]:
            bounds = [s for s, _ in r.weight_versions] + [len(r.token_ids)]
            for (start, ver), end in zip(r.weight_versions, bounds[1:]):
                seq = r.prompt_token_ids + r.token_ids[:end]
                full = refs[ver].prompt_logprobs([seq])[0]  # logprob of seq[i] for i >= 1
                p = len(r.prompt_token_ids)
                ref_lp.append(full[p - 1 + start : p - 1 + end])
                eng_lp.append(r.logprobs[start:end])
        assert_bf16_close(eng_lp, ref_lp, "async spans vs transformers (old / new weights)")
        aborted = recs[3]
        assert aborted.finish_reason == "abort" and 0 < len(aborted.token_ids) < 300
        assert len(aborted.logprobs) == len(aborted.token_ids)
        for ref in refs.values():
            ref.free()
    finally:
        b.shutdown()
        torch.cuda.empty_cache()
