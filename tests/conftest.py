"""Shared pytest fixtures for every area of genbackends.

Tiny models are built once per test session with :func:`genbackends.tiny.build_tiny_model`
(deterministic in the seed, no network) into a session temp folder. Each fixture returns the
model folder as a :class:`pathlib.Path`; the folder holds ``config.json``, the tokenizer and
``model.safetensors`` and loads in transformers and vLLM alike.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

# In-process vLLM engines in tests (one process, no engine-core subprocess).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

_REPO = Path(__file__).resolve().parent.parent


def _build(tmp_path_factory: pytest.TempPathFactory, arch: str, seed: int = 0) -> Path:
    from genbackends.tiny import build_tiny_model

    out = tmp_path_factory.mktemp(f"tiny_{arch}_s{seed}", numbered=True)
    return build_tiny_model(out, arch=arch, seed=seed)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (where pyproject.toml lives)."""
    return _REPO


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``factory(arch="llama", seed=0) -> Path``: builds (once per (arch, seed)) a tiny model."""
    cache: dict[tuple[str, int], Path] = {}

    def factory(arch: str = "llama", seed: int = 0) -> Path:
        key = (arch, seed)
        if key not in cache:
            cache[key] = _build(tmp_path_factory, arch, seed)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory: Callable[..., Path]) -> Path:
    """Folder of a tiny Llama-shaped model (seed 0, fp32, untied embeddings, vocab 300)."""
    return tiny_model_factory("llama", 0)


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_model_factory: Callable[..., Path]) -> Path:
    """Folder of a tiny Qwen2-shaped model (seed 0, QKV bias, tied embeddings)."""
    return tiny_model_factory("qwen2", 0)


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_model_factory: Callable[..., Path]) -> Path:
    """Folder of a tiny Qwen3-shaped model (seed 0, q/k norms)."""
    return tiny_model_factory("qwen3", 0)


@pytest.fixture(scope="session")
def tiny_llama_alt(tiny_model_factory: Callable[..., Path]) -> Path:
    """Same shape as ``tiny_llama`` with different weights (seed 1): a sync target that changes
    outputs."""
    return tiny_model_factory("llama", 1)
