"""One config file, two backends: `examples/tiny.yaml` run through the CLI with `backend: hf` and
with `--set backend=vllm` gives records with the same fields and the same greedy tokens."""
from __future__ import annotations

import importlib.util
import json

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


def test_same_config_hf_and_vllm_agree(run_cli, tiny_llama, repo_root, tmp_path):
    example = repo_root / "examples" / "tiny.yaml"
    prompts = repo_root / "examples" / "prompts.txt"
    out = {}
    for backend in ("hf", "vllm"):
        path = tmp_path / f"{backend}.jsonl"
        proc = run_cli("generate", example, "--prompts", prompts, "-o", path, "--set", f"backend={backend}",
                       "--set", f"model={tiny_llama}", "--set", "sampling.prompt_logprobs=0",
                       env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1].startswith(f"{backend}: 4 prompts -> 4 completions")
        out[backend] = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(out["hf"]) == len(out["vllm"]) == 4
    for h, v in zip(out["hf"], out["vllm"]):
        assert set(h) == set(v)
        assert h["prompt"] == v["prompt"] and h["prompt_token_ids"] == v["prompt_token_ids"]
        assert h["token_ids"] == v["token_ids"] and h["text"] == v["text"]
        assert h["finish_reason"] == v["finish_reason"] and h["index"] == v["index"] == 0
        assert max(abs(a - b) for a, b in zip(h["logprobs"], v["logprobs"])) < 1e-4
        assert abs(h["cumulative_logprob"] - v["cumulative_logprob"]) < 1e-3
        assert h["prompt_logprobs"][0] is None and v["prompt_logprobs"][0] is None
        assert max(abs(a - b) for a, b in zip(h["prompt_logprobs"][1:], v["prompt_logprobs"][1:])) < 1e-4
