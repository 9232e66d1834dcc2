"""The direct path into colocated engines: every Megatron trainer rank hosts one worker of a vLLM
engine (external_launcher), and each rank writes its own worker (genbackends_megatron.direct_colocated).

Two layouts that need slices from the other rank: Megatron TP1 PP2 -> one vLLM TP2 engine (each
engine rank needs half of the other stage's layers) and Megatron TP2 -> two vLLM TP1 replicas
(each replica needs the other rank's shards). After a sync, every rank's engine gives Megatron's
own forward logprobs within 1e-4 (fp32), having differed before; a second sync after an in-place
weight change (cached plan and copy views) delivers the new values; a bad shard on one rank is
refused on every rank, naming the parameter, with no engine written.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import megatron.core  # noqa: E402,F401  (a missing or broken engine must fail, not skip)
import vllm  # noqa: E402,F401  (a missing or broken engine must fail, not skip)

from rank_processes import run_ranks  # noqa: E402

HERE = Path(__file__).resolve().parent
LAYOUTS = {"tp1pp2-to-vllm-tp2": (1, 2, 2, 29810), "tp2-to-2x-vllm-tp1": (2, 1, 1, 29820)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_colocated_direct_sync(name, tiny_llama, tiny_llama_alt, tmp_path):
    tp, pp, engine_tp, port = LAYOUTS[name]
    (tmp_path / "spec.json").write_text(json.dumps(
        {"tp": tp, "pp": pp, "engine_tp": engine_tp, "base": str(tiny_llama), "alt": str(tiny_llama_alt), "out": str(tmp_path)}))
    run_ranks(HERE / "megatron_colocated_worker.py", [str(tmp_path / "spec.json")], [
        dict(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
             VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="0|1", OMP_NUM_THREADS="1")
        for rank in range(2)], timeout=400)
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "error" not in r, r["error"]
        assert r["before"]["max_abs_diff"] > 0.1  # the engine started from other weights
        assert r["bad_error"] and "mlp.linear_fc2.weight" in r["bad_error"] and "(rank 1)" in r["bad_error"]
        assert r["bad_engine_unchanged"] is True
        first = r["first"]
        assert first["transport"] == "p2p+colocated"
        assert first["parity"]["max_abs_diff"] <= 1e-4, first["parity"]
        assert first["details"]["engine_tp"] == engine_tp
        assert first["details"]["engine_rank"] == (rank if engine_tp == 2 else 0)
        assert first["details"]["received_bytes"] > 0  # this layout needs the other rank's slices
        assert r["stale"]["max_abs_diff"] > 1e-3  # the in-place change is visible before the sync
        assert r["second"]["parity"]["max_abs_diff"] <= 1e-4, r["second"]["parity"]
        assert r["second"]["plan_seconds"] == first["details"]["plan_seconds"]  # planned once
