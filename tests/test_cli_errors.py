"""Bad input through the real ``genbackends`` console script: non-zero exit, one line on stderr
naming the problem, no traceback (unless --debug). Each case fails before any model is loaded."""
from __future__ import annotations

import textwrap

import pytest

GOOD = """
backend: hf
model: /nonexistent/model  # never loaded: every case below fails before the engine starts
seq_length: 64
sampling: {max_new_tokens: 16, temperature: 0}
"""


def _error_line(proc) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("genbackends: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


CASES = {
    "unknown backend": (["--set", "backend=nosuch"], None,
                        r"unknown backend 'nosuch'; available backends: echo, hf, vllm"),
    "max_prompt_length <= 0": (["--set", "seq_length=16"], None,
                               r"invalid config .*a\.yaml: max_prompt_length = seq_length - sampling\.max_new_tokens = 16 - 16 = 0; it must be > 0"),
    "top_p 1.5": (["--set", "sampling.top_p=1.5"], None,
                  r"invalid config .*a\.yaml: sampling\.top_p: Input should be less than or equal to 1 \(got 1\.5\)"),
    "gpu_memory_utilization 0": (["--set", "cache.gpu_memory_utilization=0"], None,
                                 r"cache\.gpu_memory_utilization: Input should be greater than 0 \(got 0\)"),
    "empty prompt": ([], "one\n\nthree\n", r"error: prompt 1 is empty$"),
    "bad override": (["--set", "sampling.temperature"], None, r"--set expects KEY=VALUE"),
    "unknown option": (["--set", "options.hf.bogus=1"], None, r"options\.hf\.bogus: Extra inputs are not permitted \(got 1\)"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line(case, run_cli, plugin_sites, tmp_path):
    import re

    args, prompts, pattern = CASES[case]
    cfg = _write(tmp_path / "a.yaml", GOOD)
    prompt_file = _write(tmp_path / "p.txt", prompts or "hello\n")
    proc = run_cli("generate", cfg, "--prompts", prompt_file, *args, sites=[plugin_sites["echo"]])
    line = _error_line(proc)
    assert re.search(pattern, line), line


def test_include_cycle(run_cli, tmp_path):
    _write(tmp_path / "a.yaml", "includes: b.yaml\n" + GOOD)
    _write(tmp_path / "b.yaml", "includes: [a.yaml]\n")
    line = _error_line(run_cli("config", tmp_path / "a.yaml"))
    assert f"include cycle: {tmp_path / 'a.yaml'} -> {tmp_path / 'b.yaml'} -> {tmp_path / 'a.yaml'}" in line


def test_malformed_yaml(run_cli, tmp_path):
    _write(tmp_path / "bad.yaml", "backend: hf\nsampling: {top_p: 0.5\nseq_length: 3\n")
    line = _error_line(run_cli("generate", tmp_path / "bad.yaml", "--prompt", "x"))
    assert f"malformed YAML in {tmp_path / 'bad.yaml'} line 3 column" in line


def test_plugin_whose_import_raises(run_cli, plugin_sites, tmp_path):
    cfg = _write(tmp_path / "a.yaml", GOOD.replace("backend: hf", "backend: broken"))
    proc = run_cli("generate", cfg, "--prompt", "x", sites=[plugin_sites["broken"]])
    line = _error_line(proc)
    assert ("unknown backend 'broken'; available backends: hf, vllm; plugin 'broken' failed to load: "
            "RuntimeError: genbackends_broken cannot start: its engine library is missing") in line


def test_missing_config_and_debug_traceback(run_cli, tmp_path):
    line = _error_line(run_cli("config", tmp_path / "nope.yaml"))
    assert "config file not found" in line and "nope.yaml" in line
    proc = run_cli("--debug", "config", tmp_path / "nope.yaml")
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
