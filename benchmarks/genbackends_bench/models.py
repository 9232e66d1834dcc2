"""Model folders for benchmarks, built locally without network.

* ``tiny:<arch>``: :func:`genbackends.tiny.build_tiny_model` (real random weights in safetensors);
* ``synthetic:<preset>``: a Llama-shaped ``config.json`` (1B- or 8B-class, or tiny for debugging)
  plus a synthetic word-level tokenizer covering the whole vocabulary, and no weights: engines load
  it with ``load_format: dummy`` (random weights), so an 8B shape costs no disk or download;
* anything else: an existing HF model folder, used as is.
"""
from __future__ import annotations

import json
from pathlib import Path

# Llama-shaped presets. The 1B/8B shapes match the probes in shared/ENVIRONMENT.md (TinyLlama-1.1B
# and Llama-3-8B geometry) so our numbers can be read against those.
PRESETS: dict[str, dict[str, int]] = {
    "llama-tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=300, max_position_embeddings=512),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
}


def prepare_model(spec: str, work_dir: Path, seed: int = 0, dtype: str = "float32") -> Path:
    """Return an HF model folder for ``spec`` (building it under ``work_dir`` if needed)."""
    if spec.startswith("tiny:"):
        from genbackends.tiny import build_tiny_model

        arch = spec.split(":", 1)[1]
        out = work_dir / f"tiny-{arch}-s{seed}"
        if not (out / "model.safetensors").exists():
            build_tiny_model(out, arch=arch, seed=seed)  # type: ignore[arg-type]
        return out
    if spec.startswith("synthetic:"):
        preset = spec.split(":", 1)[1]
        if preset not in PRESETS:
            raise ValueError(f"unknown synthetic preset {preset!r}; choose one of {', '.join(PRESETS)}")
        out = work_dir / f"synthetic-{preset}-{dtype}"
        if not (out / "config.json").exists():
            write_synthetic_model(out, PRESETS[preset], dtype)
        return out
    p = Path(spec)
    if not (p / "config.json").is_file():
        raise ValueError(f"model {spec!r}: no config.json there (use tiny:<arch>, synthetic:<preset> or an HF folder)")
    return p


def write_synthetic_model(out: Path, shape: dict[str, int], dtype: str) -> None:
    """Write ``config.json`` and a word-level tokenizer (``<t{id}>`` tokens) for a Llama shape."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    vocab_size = shape["vocab_size"]
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    # Every id has a token, so any id an engine samples decodes (a BPE trained on a small corpus
    # would leave most of a 32k/128k vocabulary without text).
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"<t{i}>": i for i in range(len(specials), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(str(out))
    cfg = LlamaConfig(
        **shape, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, torch_dtype=dtype,
    )
    cfg.save_pretrained(str(out))
    (out / "genbackends_synthetic.json").write_text(json.dumps({"shape": shape, "dtype": dtype}))


def num_parameters(model_dir: Path) -> int:
    """Parameter count of a Llama-shaped config (embeddings, layers, final norm, untied head)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    v = cfg["vocab_size"]
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    per_layer = attn + 3 * h * i + 2 * h
    head = 0 if cfg.get("tie_word_embeddings") else v * h
    return v * h + L * per_layer + h + head


def materialize_weights(model_dir: Path, out: Path, dtype: str) -> Path:
    """A copy of a weightless model folder with random safetensors weights (for backends that
    cannot initialise randomly from ``config.json``). Config and tokenizer files are symlinked."""
    import torch

    from genbackends_bench.sync_sources import hf_tensors, write_safetensors

    if (out / "config.json").exists() and list(out.glob("*.safetensors")):
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file() and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    write_safetensors(hf_tensors(model_dir, "cpu", torch_dtype), out)
    return out
