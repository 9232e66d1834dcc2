"""GPU lane for issue 11: the layout the vLLM plugin publishes matches a GPU engine's real
parameters (GPUs keep plain parameter tensors, so the check sees every shape), and vLLM's own
``nccl`` weight-transfer engine syncs an engine whose worker lives in another process, timed
against our own group (benchmarks/gpu/transfer_engines.py; it asserts logprob parity with
transformers after every sync)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpu_helpers import start_backend

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


def test_published_layout_matches_gpu_engine(tiny_llama):
    b = start_backend(tiny_llama)
    try:
        lay = b.weight_layout()  # raises if any live parameter disagrees with the published one
        assert lay.tensor_parallel_size == 1 and lay.local_ranks == (0,)
        qkv = lay.rank(0)["model.layers.0.self_attn.qkv_proj.weight"]
        assert [h.rsplit(".", 2)[-2] for h in qkv.sources] == ["q_proj", "k_proj", "v_proj"]
    finally:
        b.shutdown()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="NCCL needs the sender and the engine on different GPUs (2 GPUs)")
def test_vllm_nccl_transfer_engine_vs_our_group(tmp_path):
    out = tmp_path / "te"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu/transfer_engines.py"), "--out", str(out),
                           "--device", "cuda", "--hidden", "1024", "--layers", "4", "--reps", "3"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "transfer_engines.json").read_text())
    assert set(res["runs"]) == {"ours/group", "vllm/transfer_engine"}
    print(json.dumps({k: (v["median_s"], max(v["max_abs_diff"])) for k, v in res["runs"].items()}))
