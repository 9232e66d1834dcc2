"""The adapter through its entry points: registry lookup and the ``plan`` dry-run command."""
from __future__ import annotations

import subprocess
import sys

from genbackends.registry import Registry


def test_adapter_registered_through_entry_point():
    reg = Registry(allow=["megatron"])
    for arch in ("llama", "qwen2", "qwen3"):
        a = reg.weight_adapter("megatron", arch)
        assert a.source == "megatron" and callable(a.make_source)
    assert not reg.broken_plugins()


def test_plan_cli_prints_validated_plan(tiny_qwen2):
    out = subprocess.run([sys.executable, "-m", "genbackends.cli", "plan", str(tiny_qwen2), "--tp", "2", "--pp", "2",
                          "--vllm-tp", "2"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("plan: ") and "zero fills" in lines[0]
    # tied embeddings: vLLM's embedding rows 0..159 of rank 0 come from the first stage's TP-0 shard
    text = out.stdout
    assert "rank0 model.embed_tokens.weight (160, 256)" in text
    assert "[0:160] <- pp0/vp0/tp0 embedding.word_embeddings.weight [0:160]" in text
    assert "lm_head" not in text


def test_plan_cli_rejects_bad_layout(tiny_llama):
    out = subprocess.run([sys.executable, "-m", "genbackends.cli", "plan", str(tiny_llama), "--vllm-tp", "3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "not divisible by tensor-parallel size 3" in out.stderr.strip().splitlines()[-1]
