"""GPU lane: megatron-core (0.19.2 in the GPU bundle) -> CUDA vLLM, TP1 -> TP1 over NCCL (world of
one), bf16. The engine starts from other weights (parity fails before the sync), then each path
(universal = HF-named tensors, direct = plan writes into the engine's parameters, and the
backend's own ``sync_weights(source)``) must bring the engine's prompt logprobs to Megatron's own
forward pass within the bf16 tolerance. The CPU equivalent is tests/test_megatron_sync.py (fp32,
1e-4). Runs in a subprocess: Megatron's parallel state and the NCCL world stay out of pytest."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_helpers import BF16_MAX_ABS, BF16_MEAN_ABS

pytestmark = pytest.mark.gpu

WORKER = Path(__file__).resolve().parent / "megatron_gpu_worker.py"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_megatron_to_vllm_tp1_parity(tiny_model_factory, tmp_path, arch):
    base, alt = tiny_model_factory(arch, 0), tiny_model_factory(arch, 1)
    out = tmp_path / "res.json"
    proc = subprocess.run([sys.executable, str(WORKER), str(base), str(alt), str(out)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "MASTER_PORT": "29792"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    res = json.loads(out.read_text())
    assert res["dist_backend"] == "nccl" and res["megatron_device"].startswith("cuda"), res
    assert res["before"]["mean_abs_diff"] > 0.5, res["before"]  # the engine really starts elsewhere
    for path, r in res["paths"].items():
        if "reset" in r:
            assert r["reset"]["mean_abs_diff"] > 0.5, (path, r)
        p = r["parity"]
        assert p["max_abs_diff"] < BF16_MAX_ABS and p["mean_abs_diff"] < BF16_MEAN_ABS, (path, r)
    assert res["paths"]["backend_entry"]["path"] == "direct", res["paths"]["backend_entry"]
