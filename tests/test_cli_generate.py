"""The ``genbackends`` command end to end: listing, generate from a config (an out-of-tree plugin
and the HF backend), config printing, plugin-added commands."""
from __future__ import annotations

import json
import textwrap
from dataclasses import fields

import yaml

from genbackends.records import GenerationRecord

RECORD_FIELDS = {f.name for f in fields(GenerationRecord)}


def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_backends_listing(run_cli, plugin_sites):
    proc = run_cli("backends", sites=[plugin_sites[k] for k in ("echo", "broken")])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "DISTRIBUTION", "VERSION", "STATUS"]
    rows = {tuple(line.split()[:2]): line.split() for line in lines[1:] if line.strip() and not line.startswith("broken:")}
    assert rows[("backend", "hf")][2:] == ["genbackends", "0.1.0", "ok"]
    assert rows[("backend", "echo")][2:] == ["genbackends-echo", "0.3.1", "ok"]
    assert rows[("plugin", "broken")][2:] == ["genbackends-broken", "0.0.1", "broken"]
    assert ("broken: plugin 'broken' from genbackends-broken 0.0.1: RuntimeError: genbackends_broken cannot start: "
            "its engine library is missing") in proc.stdout
    as_json = json.loads(run_cli("backends", "--json", sites=[plugin_sites["echo"]]).stdout)
    assert {"kind": "backend", "name": "echo", "plugin": "echo", "distribution": "genbackends-echo",
            "version": "0.3.1", "status": "ok", "error": ""} in as_json


def test_duplicate_name_listed_and_refused(run_cli, plugin_sites, tmp_path):
    sites = [plugin_sites["echo"], plugin_sites["dup"]]
    proc = run_cli("backends", sites=sites)
    assert "conflict" in proc.stdout and "genbackends-dup 2.0.0" in proc.stdout
    cfg = _write(tmp_path / "e.yaml", "backend: echo\nmodel: none\nseq_length: 128\n")
    proc = run_cli("generate", cfg, "--prompt", "abc", sites=sites)
    assert proc.returncode == 1
    assert ("backend name 'echo' is claimed by both genbackends-echo 0.3.1 (plugin 'echo') and "
            "genbackends-dup 2.0.0 (plugin 'echo-copy')") in proc.stderr


def test_generate_with_out_of_tree_plugin_from_config(run_cli, plugin_sites, tmp_path):
    cfg = _write(tmp_path / "echo.yaml", """
        backend: echo
        model: none
        seq_length: 64
        sampling: {max_new_tokens: 4, n: 2}
        options:
          echo: {upper: true}
          hf: {attn_implementation: eager}
        """)
    (tmp_path / "p.jsonl").write_text('{"prompt": "hello"}\n{"prompt": "abc"}\n')
    stats = tmp_path / "stats.jsonl"
    out = tmp_path / "out.jsonl"
    proc = run_cli("generate", cfg, "--prompts", tmp_path / "p.jsonl", "--output", out,
                   sites=[plugin_sites["echo"]], env={"GENBACKENDS_ECHO_STATS": str(stats)})
    assert proc.returncode == 0, proc.stderr
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["index"], r["text"]) for r in recs] == [
        ("hello", 0, "OLLE"), ("hello", 1, "OLLE"), ("abc", 0, "CBA"), ("abc", 1, "CBA")]
    assert set(recs[0]) == RECORD_FIELDS
    summary = proc.stderr.strip().splitlines()[-1]
    assert summary.startswith("echo: 2 prompts -> 4 completions, 8 prompt tokens, 14 output tokens in ")
    assert "output tokens/s" in summary
    assert "generate [echo]" in proc.stderr  # the progress bar
    # the plugin's event hook saw the run
    assert json.loads(stats.read_text())["output_tokens"] == 14.0


def test_plugin_adds_cli_command(run_cli, plugin_sites):
    proc = run_cli("echo-version", sites=[plugin_sites["echo"]])
    assert proc.returncode == 0 and proc.stdout.strip() == "genbackends-echo 0.3.1"


def test_config_command_resolves_includes_and_overrides(run_cli, tmp_path):
    _write(tmp_path / "base.yaml", "backend: vllm\nmodel: m\nseq_length: 64\nsampling: {max_new_tokens: 8}\n")
    top = _write(tmp_path / "top.yaml", "includes: base.yaml\nbackend: hf\nsampling: {top_k: 3}\n")
    proc = run_cli("config", top, "--set", "sampling.temperature=0.25")
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(proc.stdout)
    assert data["backend"] == "hf" and data["sampling"]["top_k"] == 3 and data["sampling"]["temperature"] == 0.25
    assert data["sampling"]["max_new_tokens"] == 8 and data["cache"]["gpu_memory_utilization"] == 0.9


def test_generate_hf_from_config(run_cli, tiny_llama, tmp_path):
    """The HF backend through the CLI: greedy output equals transformers' own greedy generate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _write(tmp_path / "hf.yaml", f"""
        backend: hf
        model: {tiny_llama}
        seq_length: 64
        device: cpu
        sampling: {{max_new_tokens: 6, temperature: 0, ignore_eos: true}}
        prompts: {{batch_size: 1}}
        """)
    proc = run_cli("generate", cfg, "--prompt", "the cat sat", "--prompt", "a dog ran", "-o", tmp_path / "o.jsonl")
    assert proc.returncode == 0, proc.stderr
    recs = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    for r, text in zip(recs, ["the cat sat", "a dog ran"]):
        ids = tok(text, return_tensors="pt").input_ids
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=3, min_new_tokens=6)
        assert r["token_ids"] == ref[0, ids.shape[1]:].tolist()
        assert r["prompt_token_ids"] == ids[0].tolist() and r["finish_reason"] == "length"
        assert len(r["logprobs"]) == 6 and abs(sum(r["logprobs"]) - r["cumulative_logprob"]) < 1e-5


def test_config_command_checks_every_installed_backends_options(run_cli, tmp_path):
    cfg = _write(tmp_path / "c.yaml", """
        backend: hf
        model: m
        seq_length: 64
        sampling: {max_new_tokens: 8}
        options:
          hf: {attn_implementation: eager}
          vllm: {enforce_eagr: true}
        """)
    proc = run_cli("config", cfg)
    assert proc.returncode == 1 and "options.vllm.enforce_eagr: Extra inputs are not permitted (got True)" in proc.stderr
    proc = run_cli("config", cfg, "--set", "options.vllm.enforce_eagr=null", "--set", "options.vllm={}")
    assert proc.returncode == 0, proc.stderr


def test_config_command_refuses_misspelled_backend_under_options(run_cli, tmp_path):
    # a misspelled backend name under options: is an error naming it and the known backends
    cfg = _write(tmp_path / "c.yaml", """
        backend: hf
        model: m
        seq_length: 64
        sampling: {max_new_tokens: 8}
        options:
          vlm: {enforce_eager: true}
        """)
    proc = run_cli("config", cfg)
    assert proc.returncode == 1
    assert "options.vlm: no backend 'vlm' is installed (did you mean 'vllm'?); known backends: hf, vllm" in proc.stderr


def test_tiny_model_command(tmp_path, capsys):
    """In-process (the command is a thin wrapper over genbackends.tiny): a loadable folder."""
    from genbackends.cli import main

    assert main(["tiny-model", str(tmp_path / "q3"), "--arch", "qwen3", "--seed", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "q3")
    cfg = json.loads((tmp_path / "q3" / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["head_dim"] == 64
    assert (tmp_path / "q3" / "model.safetensors").exists() and (tmp_path / "q3" / "tokenizer.json").exists()


def test_prompts_file_from_config_any_suffix(run_cli, plugin_sites, tmp_path):
    (tmp_path / "prompts.md").write_text("abc\nxyz\n")
    cfg = _write(tmp_path / "e.yaml", f"backend: echo\nmodel: none\nseq_length: 128\nprompts: {{file: {tmp_path / 'prompts.md'}}}\n")
    proc = run_cli("generate", cfg, "-q", sites=[plugin_sites["echo"]])
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["text"] for line in proc.stdout.splitlines()] == ["cba", "zyx"]
    assert "generate [echo]" not in proc.stderr  # -q: no progress bar
