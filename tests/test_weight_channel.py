"""genbackends.channel.WeightChannel: the separate layout. A Megatron TP2 trainer (two gloo ranks,
its own default group) sends to a vLLM engine in a third process (its own default group) over a
stand-alone channel group.

After each sync the engine's prompt logprobs equal Megatron's own forward (an independent
implementation) within 1e-4 (fp32), having differed before; a second sync after an in-place change
delivers the new values; a sync the engine refuses (wrong shape) raises on both ends, names the
tensor, and leaves the engine's outputs unchanged.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import megatron.core  # noqa: E402,F401  (a missing or broken engine must fail, not skip)
import vllm  # noqa: E402,F401  (a missing or broken engine must fail, not skip)

from rank_processes import run_ranks  # noqa: E402

HERE = Path(__file__).resolve().parent


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


@pytest.mark.slow
def test_megatron_tp2_to_separate_engine(tiny_llama, tiny_llama_alt, tmp_path):
    (tmp_path / "spec.json").write_text(json.dumps(
        {"base": str(tiny_llama), "alt": str(tiny_llama_alt), "out": str(tmp_path), "port": 29840}))
    run_ranks(HERE / "weight_channel_worker.py", [str(tmp_path / "spec.json")], [
        dict(RANK=str(rank), VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND=str(rank % 2))
        for rank in range(3)], timeout=300)
    sender, engine = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 2))
    assert "error" not in sender, sender["error"]
    assert "error" not in engine, engine["error"]
    # The refused sync: named on both ends, nothing written.
    assert "engine rank 1" in sender["bad_error"] and "down_proj" in sender["bad_error"]
    assert "down_proj" in engine["bad_error"]
    assert engine["bad_engine_unchanged"] is True
    # Before any sync the engine serves other weights than the trainer's.
    assert _max_diff(sender["first_ours"], engine["before"]) > 0.1
    for round_ in ("first", "second"):
        assert sender[round_]["tensors"] == engine[round_]["num_tensors"] > 0
        assert sender[round_]["bytes"] == engine[round_]["bytes"]
        assert _max_diff(sender[round_ + "_ours"], sender[round_ + "_engine"]) <= 1e-4
    assert _max_diff(sender["first_ours"], sender["second_ours"]) > 1e-3  # the second sync carried new values
