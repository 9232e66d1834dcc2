"""Every sync enters through the backend, also the collective direct path of a multi-rank source.

Two gloo trainer ranks (Megatron TP 2) each host a vLLM TP-1 engine (external_launcher); the
Megatron adapter's ``source.sync(backend, path="direct")`` is collective over them. Proven here:
the ``genbackends_on_after_sync`` hook of an ordinary hookimpl fires on both ranks for each accepted
sync, and a sync into asleep weights (``sleep(1)``, or ``sleep(2)`` then ``wake_up(["kv_cache"])``
only) raises :class:`BackendStateError` on every rank, fires no hook and leaves the engine's
prompt logprobs bit-identical; after ``wake_up()`` the same sync matches Megatron's own forward.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rank_processes import run_ranks

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_collective_direct_sync_fires_hooks_and_refuses_asleep_weights(tiny_llama, tiny_llama_alt, tmp_path):
    (tmp_path / "spec.json").write_text(json.dumps({"base": str(tiny_llama), "alt": str(tiny_llama_alt), "out": str(tmp_path)}))
    run_ranks(HERE / "contract_sync_path_worker.py", [str(tmp_path / "spec.json")], [
        dict(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT="29840",
             VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="0|1", OMP_NUM_THREADS="1")
        for rank in range(2)], timeout=400)
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "error" not in r, r["error"]
        assert r["before"]["max_abs_diff"] > 0.1  # the engine started from other weights
        assert r["first"]["path"] == "direct" and r["first"]["transport"] == "p2p+colocated"
        assert r["first"]["parity"]["max_abs_diff"] <= 1e-4, r["first"]["parity"]
        # the hook fired once, with the backend's report of the collective direct write
        assert [(h["path"], h["transport"]) for h in r["hooks_after_first"]] == [("direct", "p2p+colocated")]
        for level in (1, 2):
            err = r[f"asleep{level}_error"]
            assert err and err.startswith("BackendStateError") and "wake_up(['weights'])" in err, (level, err)
            assert r[f"asleep{level}_engine_unchanged"] is True, level
        assert r["hooks_after_refusals"] == r["hooks_after_first"]  # refused syncs fire nothing
        assert r["awake"]["parity"]["max_abs_diff"] <= 1e-4, r["awake"]["parity"]
        assert len(r["hooks_at_end"]) == 2
