"""benchmarks/gpu/lane_summary.py on a hand-written JUnit XML: counts, failure names, files."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "lane_summary.py"

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" errors="1" failures="1" skipped="1" tests="5" time="12.5">
 <testcase classname="tests.gpu.test_gpu_parity" name="test_bf16_prompt_logprobs" time="3.0"/>
 <testcase classname="tests.gpu.test_gpu_parity" name="test_greedy" time="1.0"/>
 <testcase classname="tests.gpu.test_gpu_sleep" name="test_level1_frees" time="4.0">
  <failure message="AssertionError: freed 0 bytes">traceback</failure></testcase>
 <testcase classname="tests.gpu.test_gpu_tp" name="test_tp2_shapes" time="0.0">
  <skipped type="pytest.skip" message="needs 2 GPUs, 1 here">skip</skipped></testcase>
 <testcase classname="tests.gpu.test_gpu_demo" name="test_demo" time="2.0">
  <error message="failed on setup with RuntimeError: boom">tb</error></testcase>
</testsuite></testsuites>
"""


def _module():
    spec = importlib.util.spec_from_file_location("lane_summary", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_summary_counts_and_names_failures(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(JUNIT)
    env = {"card": "NVIDIA H200", "gpu_count": 1, "torch": "2.11.0", "vllm": "0.24.0", "megatron_core": "0.19.2"}
    s = _module().write_summary(xml, tmp_path / "out", "scripts/test-gpu", exit_code=1, env=env)
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk == s
    assert (s["passed"], s["failed"], s["skipped"], s["errors"], s["total"]) == (2, 1, 1, 1, 5)
    assert s["failures"] == ["tests.gpu.test_gpu_sleep::test_level1_frees", "tests.gpu.test_gpu_demo::test_demo"]
    assert s["skips"] == {"tests.gpu.test_gpu_tp::test_tp2_shapes": "needs 2 GPUs, 1 here"}
    assert s["seconds"] == 12.5 and s["exit_code"] == 1
    assert {k: s[k] for k in env} == env and s["command"] == "scripts/test-gpu"
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "2 passed, 1 failed, 1 errors, 1 skipped" in md and "freed 0 bytes" in md and "NVIDIA H200" in md


def test_single_testsuite_root_and_bad_file(tmp_path):
    mod = _module()
    xml = tmp_path / "one.xml"
    xml.write_text('<testsuite name="pytest" time="1"><testcase classname="a" name="b" time="1"/></testsuite>')
    assert mod.parse_junit(xml)["passed"] == 1
    bad = tmp_path / "bad.xml"
    bad.write_text("<results/>")
    try:
        mod.parse_junit(bad)
    except ValueError as e:
        assert "no <testsuite>" in str(e)
    else:
        raise AssertionError("a file without <testsuite> was accepted")
