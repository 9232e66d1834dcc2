"""The benchmark harness on the tiny model with real engines: our vLLM backend, the HF backend
and raw ``vllm.LLM.generate``, each in its own worker process, plus config validation and the
pure ratio arithmetic."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from genbackends.errors import ConfigError
from genbackends_bench.config import load_bench_config
from genbackends_bench.runner import compute_ratios

NUM_PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 6, 12, 8


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    tmp = tmp_path_factory.mktemp("bench")
    cfg = {
        "name": "test-tiny",
        "model": "tiny:llama",
        "workload": {"num_prompts": NUM_PROMPTS, "prompt_tokens": PROMPT_TOKENS, "max_new_tokens": NEW_TOKENS,
                     "batch_size": 3},
        "runs": 2, "warmup": 1,
        "engine": {"kv_cache_memory_bytes": 32 << 20},
        "backends": ["vllm", "hf", "raw-vllm"],
        "sync": {"paths": ["tensors", "safetensors", "megatron-universal", "megatron-direct"], "repeats": 2},
        "sleep_wake": {"levels": [1]},
    }
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "genbackends_bench", str(path), "--results", str(tmp / "results")],
        capture_output=True, text=True, timeout=900,  # three engines; a shared 2-core CI box is slow
    )
    out = tmp / "results" / "test-tiny"
    # exit 0 means no row failed (the CLI exits 1 when any backend row recorded an error)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (out / "results.json").exists(), proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text()), out, proc.stdout + proc.stderr


@pytest.mark.slow
def test_every_row_ran_the_same_work(bench_result: tuple[dict, Path, str]) -> None:
    res, _, log = bench_result
    rows = {r["backend"]: r for r in res["rows"]}
    assert set(rows) == {"vllm", "hf", "raw-vllm"}
    for name, r in rows.items():
        assert "error" not in r, (name, r.get("error"), r.get("traceback", "")[-1500:], log[-2000:])
        # ignore_eos: every prompt gets exactly NEW_TOKENS per run (counted from the outputs)
        assert r["output_tokens"] == NUM_PROMPTS * NEW_TOKENS, name
        assert r["prompt_tokens"] == NUM_PROMPTS * PROMPT_TOKENS, name
        assert r["num_batches"] == 2 and len(r["runs_s"]) == 2
        # From the raw per-run times and the workload's own token count, not the harness's fields.
        assert r["run_s_median"] == pytest.approx(statistics.median(r["runs_s"]))
        assert r["output_tokens_per_s"] == pytest.approx(NUM_PROMPTS * NEW_TOKENS / statistics.median(r["runs_s"]))
        assert r["total_tokens_per_s"] > r["output_tokens_per_s"] > 0
        assert 0 < r["batch_latency_s_median"] <= r["batch_latency_s_max"]
        assert r["start_s"] > 0
        assert r["memory_peak"]["peak_rss_bytes"] > 100 << 20
        assert r["sleep_wake"][0]["level"] == 1 and "sleep_s" in r["sleep_wake"][0]


@pytest.mark.slow
def test_sync_rows_and_copy_floor(bench_result: tuple[dict, Path, str], tiny_llama: Path) -> None:
    from safetensors import safe_open

    res, _, _ = bench_result
    rows = {r["backend"]: r for r in res["rows"]}
    with safe_open(str(tiny_llama / "model.safetensors"), framework="pt") as fh:  # the same model, built again
        ckpt = sum(_prod(fh.get_slice(k).get_shape()) for k in fh.keys()) * 4  # fp32
    hf_cfg = json.loads((tiny_llama / "config.json").read_text())
    vocab, hidden = hf_cfg["vocab_size"], hf_cfg["hidden_size"]
    megatron_pad = 2 * (-(-vocab // 128) * 128 - vocab) * hidden * 4  # untied: embedding + output layer
    for name in ("vllm", "hf"):
        paths = {s["path"]: s for s in rows[name]["sync"]}
        assert set(paths) == {"tensors", "safetensors", "megatron-universal", "megatron-direct"}, name
        if name == "hf":  # no engine parameters to write into: recorded as an error row
            assert "no direct write target" in paths.pop("megatron-direct")["error"]
        # The copy floors were measured over exactly the bytes each source holds, counted
        # independently: the checkpoint, and for Megatron the same plus the vocab padding of its
        # embedding and output layer (rows padded to a multiple of 128 at TP 1).
        assert rows[name]["copy_floor"]["bytes"] == ckpt
        assert rows[name]["megatron_copy_floor"]["bytes"] == ckpt + megatron_pad
        for p, s in paths.items():
            assert "error" not in s, (name, p, s)
            assert s["bytes_moved"] == ckpt, (name, p)
            assert len(s["seconds_all"]) == 2 and min(s["seconds_all"]) > 0, (name, p, s)
            floor = rows[name]["megatron_copy_floor" if p.startswith("megatron-") else "copy_floor"]["seconds"]
            assert s["copy_floor_s"] == floor > 0, (name, p)
            assert s["ratio_to_copy_floor"] == pytest.approx(statistics.median(s["seconds_all"]) / floor)
    raw = rows["raw-vllm"]["sync"]
    assert raw[0]["path"] == "raw-reload_weights" and raw[0]["bytes_moved"] == ckpt


def _prod(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@pytest.mark.slow
def test_results_files_name_machine_and_versions(bench_result: tuple[dict, Path, str]) -> None:
    res, out, _ = bench_result
    m = res["machine"]
    assert m["hostname"] and m["cpu_model"] and m["cpu_cores"] >= 1 and m["card"] == "cpu"
    for dist in ("torch", "vllm", "transformers", "megatron-core", "genbackends"):
        assert m["versions"][dist], dist
    assert res["config"]["workload"]["num_prompts"] == NUM_PROMPTS
    md = (out / "results.md").read_text()
    for needle in ("| vllm |", "| hf |", "| raw-vllm |", "copy floor", "## Sleep / wake", "vllm / raw-vllm"):
        assert needle in md, needle
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    import matplotlib.image

    assert matplotlib.image.imread(str(out / "results.png")).shape[0] > 200
    r = res["ratios"]
    # Expected ratios from the raw per-run times (same token count in every row): the ratio of
    # throughputs is the inverse ratio of median run times.
    med = {x["backend"]: statistics.median(x["runs_s"]) for x in res["rows"]}
    assert r["throughput_vs_raw-vllm"]["vllm"] == pytest.approx(med["raw-vllm"] / med["vllm"])
    assert r["throughput_vs_raw-vllm"]["hf"] == pytest.approx(med["raw-vllm"] / med["hf"])
    assert r["throughput_vllm_vs_hf"] == pytest.approx(med["hf"] / med["vllm"])
    assert f"{r['throughput_vs_raw-vllm']['vllm']:.3f}" in md  # the table shows the same figure


def test_config_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nworkload: {num_prompts: 0}\n")
    with pytest.raises(ConfigError, match=r"workload\.num_prompts.*got 0"):
        load_bench_config(bad)
    bad.write_text("name: x\nmodel: 'synthetic:llama-1b'\n")
    with pytest.raises(ConfigError, match="load_format: dummy"):
        load_bench_config(bad)
    bad.write_text("name: x\nseq_length: 10\n")
    with pytest.raises(ConfigError, match="seq_length 10"):
        load_bench_config(bad)
    bad.write_text("name: x\nworkload: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_bench_config(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text("name: x\n")
    cfg = load_bench_config(ok, {"workload.max_new_tokens": 5, "backends": ["hf"]})
    assert cfg.workload.max_new_tokens == 5 and cfg.backends == ["hf"] and cfg.seq_length == 32 + 5


def test_ratio_arithmetic() -> None:
    rows = [
        {"backend": "vllm", "output_tokens_per_s": 90.0, "start_s": 4.0,
         "sync": [{"path": "tensors", "ratio_to_copy_floor": 2.5}, {"path": "x", "error": "e"}]},
        {"backend": "raw-vllm", "output_tokens_per_s": 100.0, "start_s": 2.0, "sync": []},
        {"backend": "hf", "output_tokens_per_s": 10.0, "start_s": 1.0},
        {"backend": "broken", "error": "boom"},
    ]
    r = compute_ratios(rows, "raw-vllm")
    assert r["throughput_vs_raw-vllm"] == {"vllm": 0.9, "raw-vllm": 1.0, "hf": 0.1}
    assert r["start_vs_raw-vllm"]["vllm"] == 2.0
    assert r["throughput_vllm_vs_hf"] == 9.0 and r["throughput_raw_vllm_vs_hf"] == 10.0
    assert r["sync_vs_copy_floor"] == {"vllm:tensors": 2.5}


def test_bench_cli_registered_through_entry_point() -> None:
    proc = subprocess.run([sys.executable, "-c", "from genbackends.cli import main; main(['bench', '--help'])"],
                          capture_output=True, text=True, timeout=60)
    assert "--backends" in proc.stdout, proc.stderr[-1000:]
    proc = subprocess.run([sys.executable, "-c", "from genbackends.cli import main; main(['demo', '--help'])"],
                          capture_output=True, text=True, timeout=60)
    assert "--backend" in proc.stdout, proc.stderr[-1000:]


# ---- the async row (benchmarks/genbackends_bench/async_row.py), on the HF backend ------------------
A_PROMPTS, A_MEDIAN, A_MULT, A_TAIL = 6, 4, 10, 2


@pytest.fixture(scope="module")
def async_result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("bench_async")
    cfg = {
        "name": "test-async", "model": "tiny:llama",
        "workload": {"num_prompts": A_PROMPTS, "prompt_tokens": 8, "max_new_tokens": A_MEDIAN},
        "runs": 2, "warmup": 1, "backends": ["hf"], "baseline": "hf",
        "sync": {"enabled": False}, "sleep_wake": {"enabled": False},
        "async_rollouts": {"enabled": True, "tail_frac": A_TAIL / A_PROMPTS, "tail_mult": A_MULT},
    }
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "genbackends_bench", str(path), "--results", str(tmp / "results")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = tmp / "results" / "test-async"
    res = json.loads((out / "results.json").read_text())
    res["markdown"] = (out / "results.md").read_text()
    return res


@pytest.mark.slow
def test_async_row_long_tail_and_time_to_n(async_result: dict) -> None:
    [r] = async_result["async_rows"]
    assert "error" not in r, r
    lens = r["lengths"]
    assert sorted(lens) == [A_MEDIAN] * (A_PROMPTS - A_TAIL) + [A_MEDIAN * A_MULT] * A_TAIL
    n = A_PROMPTS - A_TAIL
    assert r["consume"] == n  # default N: the short responses
    assert len(r["sync_runs"]) == len(r["async_runs"]) == 2
    for run in r["sync_runs"] + r["async_runs"]:
        assert run["output_tokens"] == sum(lens)  # every response, exactly its length (ignore_eos)
    for run in r["async_runs"]:
        st = run["stamps"]
        assert len(st) == A_PROMPTS and st == sorted(st)
        assert run["time_to_n_s"] == st[n - 1] < st[-1]  # the N-th record is in before the batch ends
    # medians and the ratio re-derived from the raw per-run numbers
    sync_s = statistics.median(x["batch_end_s"] for x in r["sync_runs"])
    async_s = statistics.median(x["stamps"][n - 1] for x in r["async_runs"])
    assert r["sync_time_to_n_s"] == pytest.approx(sync_s) and r["async_time_to_n_s"] == pytest.approx(async_s)
    assert async_result["ratios"]["async"]["hf"]["time_to_n_sync_vs_async"] == pytest.approx(sync_s / async_s)
    assert "## Asynchronous rollouts" in async_result["markdown"]


@pytest.mark.slow
def test_async_row_pause_sync_resume_phases_add_up(async_result: dict) -> None:
    [r] = async_result["async_rows"]
    p = r["pause_sync_resume"]
    t0, t1, t2, t3 = p["timestamps"]
    assert t0 <= t1 <= t2 <= t3
    assert (p["pause_s"], p["sync_s"], p["resume_s"]) == pytest.approx((t1 - t0, t2 - t1, t3 - t2))
    assert p["total_s"] == pytest.approx(p["pause_s"] + p["sync_s"] + p["resume_s"]) == pytest.approx(t3 - t0)
    assert p["records"] == A_PROMPTS  # all accounted for across the pause
    assert p["in_flight_at_pause"] <= A_TAIL and p["spanning_records"] <= p["in_flight_at_pause"]
    assert p["sync_bytes"] > 0
    assert async_result["ratios"]["async"]["hf"]["pause_sync_resume_s"] == pytest.approx(t3 - t0)


def test_async_config_checks_lengths(tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "seq_length": 60, "workload": {"prompt_tokens": 8, "max_new_tokens": 8},
                                    "async_rollouts": {"enabled": True, "tail_mult": 10}}))
    with pytest.raises(ConfigError) as e:
        load_bench_config(path)
    assert "seq_length 60" in str(e.value) and "88" in str(e.value) and "\n" not in str(e.value)
