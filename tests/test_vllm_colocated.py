"""Colocated mode: two gloo trainer ranks hold one TP=2 vLLM engine (external_launcher); its
greedy tokens equal transformers' (= TP=1), and a sync updates it in place on both ranks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from rank_processes import run_ranks  # noqa: E402
from vllm_helpers import HFReference  # noqa: E402

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_colocated_tp2_in_trainer_ranks(tiny_llama, tiny_llama_alt, tmp_path):
    run_ranks(HERE / "vllm_colocated_worker.py", [str(tiny_llama), str(tiny_llama_alt), str(tmp_path), "2"], [
        dict(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT="29621",
             VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="0|1")
        for rank in range(2)], timeout=300)
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    base, alt = HFReference(tiny_llama), HFReference(tiny_llama_alt)
    for r in res:
        assert r["executor"] == "external_launcher" and r["world"] == 2 and r["transport"] == "inprocess"
        assert r["before"] == [base.greedy(i, 10) for i in r["ids"]]
        assert r["after"] == [alt.greedy(i, 10) for i in r["ids"]]
        assert r["layout_ranks"] == [0]  # each rank reaches its own shard's worker only
    assert res[0]["before"] == res[1]["before"]
