"""Shared pytest fixtures for every area of genbackends.

Tiny models are built once per test session with :func:`genbackends.tiny.build_tiny_model`
(deterministic in the seed, no network) into a session temp folder. Each fixture returns the
model folder as a :class:`pathlib.Path`; the folder holds ``config.json``, the tokenizer and
``model.safetensors`` and loads in transformers and vLLM alike.
"""
from __future__ import annotations

import os
from pathlib import Path
import subprocess
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


# ---- out-of-tree plugin distributions and the CLI in a subprocess ------------------------------
FIXTURE_PLUGINS = {"echo": "echo_plugin", "broken": "broken_plugin", "dup": "dup_plugin"}
# Plugins the CLI tests load: the built-ins and the test distributions (keeps the tests
# independent of whatever else is installed in the environment).
TEST_ALLOW = "hf,vllm,megatron,echo,broken,echo-copy"


@pytest.fixture(scope="session")
def plugin_sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The test plugin distributions under tests/fixtures/, each pip-installed (a real wheel
    build, real dist-info with entry points) into its own target folder: ``{"echo": Path, ...}``.
    Put a folder on ``sys.path``/``PYTHONPATH`` to "install" that distribution."""
    import shutil
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("plugin_sites")
    sites: dict[str, Path] = {}
    procs = []
    for key, folder in FIXTURE_PLUGINS.items():
        src = root / f"src_{key}"
        shutil.copytree(_REPO / "tests" / "fixtures" / folder, src)  # keep build debris out of the repo
        sites[key] = root / f"site_{key}"
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
               "--no-index", "--target", str(sites[key]), str(src)]
        procs.append((key, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for key, p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"pip install of test plugin {key} failed:\n{out}"
    return sites


@pytest.fixture(scope="session")
def run_cli(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., subprocess.CompletedProcess]:
    """``run_cli(*args, sites=(), env=None, cwd=None, timeout=300)`` runs the ``genbackends``
    console script in a subprocess with the given plugin sites on ``PYTHONPATH``."""
    import subprocess
    import sys

    script = Path(sys.executable).with_name("genbackends")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "genbackends.cli"]
    default_cwd = tmp_path_factory.mktemp("cli_cwd")

    def run(*args: str, sites=(), env=None, cwd=None, timeout: int = 300):
        e = dict(os.environ)
        e.pop("PYTHONPATH", None)
        e["GENBACKENDS_PLUGINS"] = TEST_ALLOW
        if sites:
            e["PYTHONPATH"] = os.pathsep.join(str(s) for s in sites)
        e.update(env or {})
        return subprocess.run(
            [*base, *map(str, args)], capture_output=True, text=True, env=e, cwd=str(cwd or default_cwd), timeout=timeout
        )

    return run


# ---- the GPU lane ------------------------------------------------------------------------------
# Tests marked ``@pytest.mark.gpu`` need CUDA (they check what the CPU cannot show: memory freed by
# sleep, real shard shapes, bf16 parity on CUDA vLLM, NCCL). They are *deselected* in the CPU run
# (not skipped: a skip would look like a missing engine) and are the only tests selected by
# ``--gpu-lane`` (``scripts/test-gpu``), which fails at once when CUDA is missing.
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--gpu-lane", action="store_true", default=False,
                     help="run only the tests marked gpu (needs CUDA; see scripts/test-gpu)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; runs only in the GPU lane (--gpu-lane)")
    if config.getoption("--gpu-lane"):
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError("--gpu-lane needs a CUDA GPU (torch.cuda.is_available() is False)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_lane = config.getoption("--gpu-lane")
    keep, drop = [], []
    for item in items:
        is_gpu = item.get_closest_marker("gpu") is not None
        (keep if is_gpu == gpu_lane else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
