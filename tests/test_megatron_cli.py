"""The adapter through its entry points: registry lookup and the ``plan`` dry-run command."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from genbackends.registry import Registry


# Run in a child process: it initialises torch.distributed and megatron's parallel state.
_ROUND_TRIP = r"""
import json, os, sys
os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29771")
import torch
from safetensors.torch import load_file
from genbackends.registry import Registry
from genbackends_megatron.model_builder import build_model, init_parallel, load_hf_weights

folder = sys.argv[1]
reg = Registry(allow=["megatron"])
assert not reg.broken_plugins(), reg.broken_plugins()
init_parallel(1, 1)
model = build_model(folder)
load_hf_weights(model, folder)
src = reg.weight_adapter("megatron", json.load(open(folder + "/config.json"))["model_type"]).make_source(model)
want = load_file(folder + "/model.safetensors")
got = {n: t.detach().cpu() for bucket in src.iter_buckets() for n, t in bucket}
man = src.manifest()
print(json.dumps({
    "names_equal": sorted(got) == sorted(want) == sorted(man),
    "shapes_equal": all(tuple(got[n].shape) == tuple(want[n].shape) == tuple(man[n].shape) for n in want),
    "max_abs_diff": max(float((got[n].float() - want[n].float()).abs().max()) for n in want),
}))
"""


def test_adapter_from_the_registry_round_trips_a_real_model(tiny_qwen2):
    """The adapter found through the entry point turns a real Megatron GPTModel (loaded from an HF
    checkpoint) back into exactly that checkpoint's HF tensors: names, shapes, values."""
    reg = Registry(allow=["megatron"])
    assert {a for a in ("llama", "qwen2", "qwen3") if reg.weight_adapter("megatron", a)} == {"llama", "qwen2", "qwen3"}
    out = subprocess.run([sys.executable, "-c", _ROUND_TRIP, str(tiny_qwen2)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["names_equal"] and res["shapes_equal"], res
    assert res["max_abs_diff"] == 0.0, res  # pure re-layout: bit-exact


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
