"""A trainer that already runs torch.distributed with several ranks (issue 10, finding 2): two
gloo ranks, rank 0 builds the vLLM backend with *default* options and generates. An engine in the
trainer's process would join the trainer's world (vLLM's init_world_group makes a new_group the
other rank never enters: a hang), so the default must start the engine in its own process, and an
explicit ``in_process: true`` must be refused at once with an error naming the option. The
ranks run under a timeout: a hang fails the test instead of stalling CI."""
from __future__ import annotations

import json
from pathlib import Path

import vllm  # noqa: F401  (a missing engine fails the module)

from rank_processes import run_ranks
from vllm_helpers import PROMPTS, HFReference

HERE = Path(__file__).resolve().parent


def test_rank0_backend_with_defaults_in_a_two_rank_trainer(tiny_llama, tmp_path):
    run_ranks(HERE / "vllm_trainer_ranks_worker.py", [str(tiny_llama), str(tmp_path)], [
        dict(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT="29631")
        for rank in range(2)], timeout=420)  # generous: CI machines are often loaded
    res = json.loads((tmp_path / "rank0.json").read_text())
    assert "refused" not in res, res
    refusal = res["explicit_in_process"]  # in_process=True asked explicitly: refused before any work
    assert "options.vllm.in_process" in refusal["error"] and "2 ranks" in refusal["error"], refusal
    assert refusal["seconds"] < 5.0, refusal
    assert res["in_process"] is False  # the engine got its own process (and its own world)
    assert res["trainer_world_after_setup"] == 2
    ref = HFReference(tiny_llama)
    assert res["tokens"] == [ref.greedy(i, 8) for i in res["ids"]]
    assert len(res["tokens"]) == len(PROMPTS)
