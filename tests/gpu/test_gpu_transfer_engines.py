"""GPU lane for issue 11: the layout the vLLM plugin publishes matches a GPU engine's real
parameters (GPUs keep plain parameter tensors, so the check sees every shape); vLLM's own
``nccl`` weight-transfer engine syncs an engine whose worker lives in another process, timed
against our own group (benchmarks/gpu/transfer_engines.py; it asserts logprob parity with
transformers after every sync; 2 GPUs); ``sync_weights`` through vLLM's ``ipc`` engine on one
GPU (``options.vllm.sync_transport: transfer_engine``), atomic; and what ``auto`` picks for an
engine in another process: vLLM's ``ipc`` engine, also from a trainer world of two ranks."""
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


def test_sync_weights_through_vllm_ipc_engine(tiny_llama, tiny_llama_alt):
    """``options.vllm.sync_transport: transfer_engine`` on one GPU: ``sync_weights`` reaches the
    engine's worker process through vLLM's ``ipc`` engine (CUDA IPC handles of the trainer's
    tensors). A sync failing after several buckets and a NaN sync are rolled back (fingerprint
    bit-identical); a good sync follows transformers on the new weights (bf16)."""
    from test_gpu_sync_atomicity import Source, _fingerprint

    from genbackends.errors import WeightSyncError
    from gpu_helpers import HFGpuReference, assert_bf16_close, engine_prompt_logprobs, weights

    b = start_backend(tiny_llama, vllm={"bucket_bytes": 150_000, "in_process": False, "sync_transport": "transfer_engine"})
    try:
        ids = [d["input_ids"] for d in b.build_dataset(["The capital of France is", "1 2 3 4", "def f(x):"])]
        before = _fingerprint(b, ids)
        alt = sorted(weights(tiny_llama_alt).items(), key=lambda kv: kv[0] in ("lm_head.weight", "model.embed_tokens.weight"))
        with pytest.raises(WeightSyncError, match="restored to its previous weights.*trainer lost tensor 12"):
            b.sync_weights(Source(alt, fail_at=12))
        assert _fingerprint(b, ids) == before
        poisoned = [(n, t.clone()) for n, t in alt]
        poisoned[-1][1].view(-1)[3] = float("nan")
        with pytest.raises(WeightSyncError, match=r"holds NaN at index \(0, 3\)"):
            b.sync_weights(Source(poisoned))
        assert _fingerprint(b, ids) == before
        report = b.sync_weights(Source(alt))
        assert report.transport == "transfer_engine", report.transport
        hf = HFGpuReference(tiny_llama_alt)
        ref = hf.prompt_logprobs(ids)
        hf.free()
        assert_bf16_close(engine_prompt_logprobs(b, ids), ref, "after the good sync through vLLM's ipc engine")
        print(json.dumps({"transport": report.transport, "seconds": report.seconds, "phases": report.phases}))
    finally:
        b.shutdown()


def test_auto_takes_vllm_ipc_engine_from_a_trainer_world(tiny_llama, tiny_llama_alt):
    """Default options (``sync_transport: auto``) on rank 0 of a two-rank gloo world: the engine
    lives in its own process and every sync goes through vLLM's ``ipc`` engine (host tensors and
    CUDA tensors alike), equal to transformers afterwards, without rank 1 taking part (vLLM's
    ``trainer_send_weights`` would have waited for it in an all-gather)."""
    from genbackends_vllm.transport import free_port
    from rank_processes import run_ranks

    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    logs = run_ranks(Path(__file__).with_name("ipc_world_rank.py"), [str(tiny_llama), str(tiny_llama_alt)],
                     [{**env, "RANK": str(r)} for r in range(2)], timeout=600)
    result = [ln for ln in logs[0].splitlines() if ln.startswith("RESULT ")]
    assert result, logs[0][-3000:]
    print(result[-1])
