"""Every example config loads, validates, and its options blocks pass their backends' models."""
from __future__ import annotations

import pytest

from genbackends.config_loader import load_config, load_yaml_tree
from genbackends.registry import Registry

from conftest import _REPO

# Fragments (no `backend:`) only exist to be included by the others, which load them.
EXAMPLES = [p for p in sorted((_REPO / "examples").glob("*.yaml")) if "backend" in load_yaml_tree(p)]


def test_examples_exist():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_is_valid(path):
    cfg = load_config(path)
    reg = Registry(allow=["hf", "vllm"])
    for backend in ("hf", "vllm"):
        switched = load_config(path, [f"backend={backend}"])
        reg.create_backend(switched)  # validates options.<backend>; starts nothing
    assert cfg.backend in reg.backends
