"""GPU lane (issue 14): atomic syncs on CUDA vLLM, in process, tiny model in bf16.

A sync of CUDA tensors that fails after several buckets were written (the source raises; a NaN
in the last bucket) is rolled back from the on-device snapshot: prompt logprobs and greedy tokens
are bit-identical to before; a good sync afterwards follows the new weights (transformers, bf16).
"""
from __future__ import annotations

from typing import Any, Iterator

import pytest
import torch

from genbackends.errors import WeightSyncError
from genbackends.weights import TensorSpec, bucketize

from gpu_helpers import PROMPTS, HFGpuReference, assert_bf16_close, engine_prompt_logprobs, start_backend, weights

pytestmark = pytest.mark.gpu


class Source:
    """HF-named CUDA tensors, honest manifest; raises before tensor ``fail_at``."""

    def __init__(self, pairs: list[tuple[str, torch.Tensor]], fail_at: int | None = None):
        self.pairs, self.fail_at = pairs, fail_at

    def manifest(self) -> dict[str, TensorSpec]:
        return {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in self.pairs}

    def iter_buckets(self, bucket_bytes: int | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
        def gen() -> Iterator[tuple[str, torch.Tensor]]:
            for i, p in enumerate(self.pairs):
                if i == self.fail_at:
                    raise RuntimeError(f"trainer lost tensor {i}")
                yield p

        yield from bucketize(gen(), bucket_bytes)


@pytest.fixture(scope="module")
def backend(tiny_llama):
    b = start_backend(tiny_llama, vllm={"bucket_bytes": 150_000})  # bf16: several buckets
    yield b
    b.shutdown()


def _fingerprint(backend: Any, ids: list[list[int]]) -> tuple:
    lp = engine_prompt_logprobs(backend, ids)
    with backend.sampling_overrides(temperature=0.0, max_new_tokens=8):
        toks = [r.token_ids for r in backend.decode_internal(backend.forward_step(ids))]
    return lp, toks


def test_failed_cuda_sync_rolls_back(backend, tiny_llama, tiny_llama_alt):
    assert torch.cuda.is_available() and backend.replicas[0].transport_kind() == "direct_load"
    ids = [d["input_ids"] for d in backend.build_dataset(PROMPTS)]
    before = _fingerprint(backend, ids)
    alt = sorted(weights(tiny_llama_alt).items(), key=lambda kv: kv[0] in ("lm_head.weight", "model.embed_tokens.weight"))
    with pytest.raises(WeightSyncError, match="restored to its previous weights.*trainer lost tensor 12"):
        backend.sync_weights(Source(alt, fail_at=12))
    assert _fingerprint(backend, ids) == before
    poisoned = [(n, t.clone()) for n, t in alt]
    poisoned[-1][1].view(-1)[3] = float("nan")
    with pytest.raises(WeightSyncError, match=r"restored.*holds NaN at index \(0, 3\)"):
        backend.sync_weights(Source(poisoned))
    assert _fingerprint(backend, ids) == before
    report = backend.sync_weights(Source(alt))
    assert report.details["snapshot_bytes_device"] > 0 and report.phases["check_finite"] > 0
    hf = HFGpuReference(tiny_llama_alt)
    ref = hf.prompt_logprobs(ids)
    hf.free()
    assert_bf16_close(engine_prompt_logprobs(backend, ids), ref, "after the good sync")
    backend.sync_weights(weights(tiny_llama))
    assert _fingerprint(backend, ids) == before
