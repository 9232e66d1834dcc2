"""GPU lane: CUDA vLLM through the backend against transformers on the same bf16 weights, every
in-process sync path, and a rejected sync that must leave the engine's outputs unchanged."""
from __future__ import annotations

import pytest
import torch

from genbackends.errors import WeightSyncError

from gpu_helpers import (
    PROMPTS, HFGpuReference, assert_bf16_close, diffs, engine_prompt_logprobs, start_backend, weights,
)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def backend(tiny_llama):
    b = start_backend(tiny_llama)
    yield b
    b.shutdown()


@pytest.fixture(scope="module")
def ids(backend):
    return [d["input_ids"] for d in backend.build_dataset(PROMPTS)]


@pytest.fixture(scope="module")
def refs(tiny_llama, tiny_llama_alt, ids):
    out = {}
    for key, folder in (("base", tiny_llama), ("alt", tiny_llama_alt)):
        hf = HFGpuReference(folder)
        out[key] = hf.prompt_logprobs(ids)
        hf.free()
    return out


def test_bf16_prompt_logprobs_match_transformers(backend, ids, refs):
    assert torch.cuda.is_available() and backend.replicas[0].in_process
    got = engine_prompt_logprobs(backend, ids)
    assert_bf16_close(got, refs["base"], "engine vs transformers (bf16)")
    # The check can fail: other weights are far outside the tolerance.
    assert diffs(got, refs["alt"])[1] > 0.5


@pytest.mark.parametrize("how", ["hf_tensors", "folder"])
def test_sync_paths_follow_new_weights(backend, ids, refs, tiny_llama, tiny_llama_alt, how):
    src = weights(tiny_llama_alt) if how == "hf_tensors" else str(tiny_llama_alt)
    report = backend.sync_weights(src)
    assert report.path == ("hf" if how == "hf_tensors" else "folder")
    if how == "hf_tensors":
        # in-process GPU engine: the published layout's writer, not vLLM's load_weights
        assert report.transport == "layout_writer"
    assert_bf16_close(engine_prompt_logprobs(backend, ids), refs["alt"], f"after {how} sync")
    backend.sync_weights(weights(tiny_llama))
    assert_bf16_close(engine_prompt_logprobs(backend, ids), refs["base"], "after sync back")


def test_rejected_sync_leaves_outputs_unchanged(backend, ids, tiny_llama_alt):
    before = engine_prompt_logprobs(backend, ids)
    bad = weights(tiny_llama_alt)
    name = "model.layers.1.mlp.down_proj.weight"
    bad[name] = torch.zeros(bad[name].shape[0], bad[name].shape[1] + 3, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(WeightSyncError, match="down_proj"):
        backend.sync_weights(bad)
    # nothing was written (layer 0 included): a partial write of the alt weights moves these by nats
    assert diffs(engine_prompt_logprobs(backend, ids), before)[0] < 1e-4


def _engine_params(model, tp_rank):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _load_weights(model, tp_rank, pairs):
    model.load_weights(iter(pairs))
    return len(pairs)


def test_layout_writer_equals_load_weights_bitwise(backend, tiny_llama, tiny_llama_alt):
    """The HF-tensor sync writes the same bytes to the same places as vLLM's own loader."""
    alt = weights(tiny_llama_alt)
    backend.sync_weights(weights(tiny_llama))
    report = backend.sync_weights(alt)
    assert report.transport == "layout_writer"
    ours = backend.run_on_workers(_engine_params)[0]
    backend.sync_weights(weights(tiny_llama))  # other values in between: the check can fail
    backend.run_on_workers(_load_weights, list(alt.items()))
    theirs = backend.run_on_workers(_engine_params)[0]
    assert set(ours) == set(theirs)
    vocab = alt["model.embed_tokens.weight"].shape[0]
    for name in ours:
        a, b = ours[name], theirs[name]
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            a, b = a[:vocab], b[:vocab]  # padding rows: we zero them, vLLM's loader leaves them
        assert torch.equal(a, b), name
    backend.sync_weights(weights(tiny_llama))
