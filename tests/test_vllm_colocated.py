"""Colocated mode: two gloo trainer ranks hold one TP=2 vLLM engine (external_launcher); its
greedy tokens equal transformers' (= TP=1), bad syncs (raise at tensor k of n over several
buckets, a tensor contradicting its manifest, NaN, Inf, an int tensor) are refused or rolled back on both ranks with
the fingerprint bit-identical (issue 14), and a good sync then updates it in place on both ranks."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import vllm  # noqa: E402,F401  (a missing or broken engine must fail, not skip)

from rank_processes import run_ranks  # noqa: E402
from test_sync_atomicity import CASES, MESSAGES  # noqa: E402
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
    for rank, r in enumerate(res):
        assert r["executor"] == "external_launcher" and r["world"] == 2 and r["transport"] == "inprocess"
        assert r["before"] == [base.greedy(i, 10) for i in r["ids"]]
        assert r["after"] == [alt.greedy(i, 10) for i in r["ids"]]
        bad = r["bad_syncs"]
        for case in CASES:
            assert bad[case]["error"] and re.search(MESSAGES[case], bad[case]["error"]), (rank, case, bad[case]["error"])
            assert bad[case]["fingerprint"] == bad["before"], (rank, case)  # bit-identical, engine still usable
        # Each trainer rank reaches exactly one worker: the one holding TP shard `rank` of the engine.
        assert r["layout_entries"] == 1 and len(r["worker_shards"]) == 1
        shard = r["worker_shards"][0]
        assert (*shard["tp"], shard["reported_rank"]) == (rank, 2, rank), shard
    vocab = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    v0, v1 = res[0]["worker_shards"][0]["vocab"], res[1]["worker_shards"][0]["vocab"]
    assert v0[0] == 0 and v0[1] == v1[0] and v1[1] == vocab, (v0, v1)  # the two shards tile the vocab
    assert res[0]["before"] == res[1]["before"]
