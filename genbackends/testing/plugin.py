"""The pytest side of the conformance kit: command-line options, session fixtures, check names.

Fixtures (all session-scoped; override any of them in your ``conftest.py``):

* ``genbackends_kit``: the :class:`KitSettings` from the command line;
* ``genbackends_model_dir``: the model folder (``--genbackends-model``, else a tiny Llama);
* ``genbackends_config``: the :class:`~genbackends.config.GenConfig` the backend is built from;
* ``genbackends_registry``: the registry the backend comes from;
* ``genbackends_recorder``: a :class:`HookRecorder` registered with the registry's plugin manager
  before the backend is created;
* ``genbackends_backend``: the backend, set up once for the whole run (one engine start);
* ``genbackends_reference``: the float64 transformers reference of the same folder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from genbackends.hookspecs import hookimpl

# Check names, in the order the suite runs them (each test carries @pytest.mark.genbackends_check(name)).
CHECKS: tuple[str, ...] = (
    "contract", "records", "ordering", "tokens", "greedy", "logprobs", "sampling", "stop",
    "sync_reject", "sync_apply", "sleep", "hooks", "shutdown",
)
# The kit's defaults under the user's config: small budget, fp32 weights for tight parity.
BASE_CONFIG: dict[str, Any] = {"seq_length": 64, "dtype": "float32", "sampling": {"max_new_tokens": 8}}


@dataclass
class KitSettings:
    """What the command line asked for."""

    backend: str | None
    model: str | None
    config_file: str | None
    overrides: list[str]
    logprob_tol: float
    repeat_tol: float
    skip: set[str] = field(default_factory=set)


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("genbackends", "genbackends conformance kit")
    g.addoption("--genbackends-backend", default=None, metavar="NAME", help="registered backend name to check")
    g.addoption("--genbackends-model", default=None, metavar="PATH",
                help="tiny HF model folder (safetensors); default: a tiny Llama built by genbackends.tiny")
    g.addoption("--genbackends-config", default=None, metavar="FILE",
                help="YAML config merged over the kit's defaults (seq_length 64, dtype float32)")
    g.addoption("--genbackends-set", action="append", default=[], metavar="KEY=VALUE",
                help="config override, repeatable (e.g. options.vllm.enforce_eager=true)")
    g.addoption("--genbackends-logprob-tol", type=float, default=1e-3, metavar="TOL",
                help="absolute tolerance of logprobs vs the float64 reference (default 1e-3)")
    g.addoption("--genbackends-repeat-tol", type=float, default=1e-5, metavar="TOL",
                help="how far two identical greedy generate calls may differ (default 1e-5; GPU kernels "
                     "are not bitwise repeatable, e.g. 1e-4 there)")
    g.addoption("--genbackends-skip", action="append", default=[], metavar="CHECK[,CHECK]",
                help=f"checks that do not apply to this backend: {', '.join(CHECKS)}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "genbackends_check(name): a conformance-kit check (see --genbackends-skip)")


def _settings(config: pytest.Config) -> KitSettings:
    skip = {s.strip() for arg in config.getoption("--genbackends-skip") for s in arg.split(",") if s.strip()}
    unknown = sorted(skip - set(CHECKS))
    if unknown:
        raise pytest.UsageError(f"--genbackends-skip: unknown check(s) {', '.join(unknown)}; known: {', '.join(CHECKS)}")
    return KitSettings(
        backend=config.getoption("--genbackends-backend"),
        model=config.getoption("--genbackends-model"),
        config_file=config.getoption("--genbackends-config"),
        overrides=list(config.getoption("--genbackends-set")),
        logprob_tol=config.getoption("--genbackends-logprob-tol"),
        repeat_tol=config.getoption("--genbackends-repeat-tol"),
        skip=skip,
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kit_items = [i for i in items if i.get_closest_marker("genbackends_check") is not None]
    if not kit_items:
        return
    s = _settings(config)
    if s.backend is None and s.config_file is None:
        raise pytest.UsageError("the genbackends conformance kit needs --genbackends-backend NAME (or --genbackends-config FILE naming one)")
    for item in kit_items:
        name = item.get_closest_marker("genbackends_check").args[0]
        if name in s.skip:
            item.add_marker(pytest.mark.skip(reason=f"check {name!r} skipped by --genbackends-skip"))


class HookRecorder:
    """A plugin that records every event hook call: ``events`` is a list of ``(hook, kwargs)``."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def of(self, hook: str) -> list[dict[str, Any]]:
        return [kw for h, kw in self.events if h == hook]

    @hookimpl
    def genbackends_on_backend_ready(self, backend: Any, startup_seconds: float) -> None:
        self.events.append(("genbackends_on_backend_ready", {"backend": backend, "startup_seconds": startup_seconds}))

    @hookimpl
    def genbackends_on_after_generate(self, backend: Any, records: Any, stats: Any) -> None:
        self.events.append(("genbackends_on_after_generate", {"backend": backend, "records": records, "stats": stats}))

    @hookimpl
    def genbackends_on_after_sync(self, backend: Any, report: Any) -> None:
        self.events.append(("genbackends_on_after_sync", {"backend": backend, "report": report}))

    @hookimpl
    def genbackends_on_memory_phase(self, backend: Any, phase: str, stats: Any) -> None:
        self.events.append(("genbackends_on_memory_phase", {"backend": backend, "phase": phase, "stats": stats}))


@pytest.fixture(scope="session")
def genbackends_kit(pytestconfig: pytest.Config) -> KitSettings:
    return _settings(pytestconfig)


@pytest.fixture(scope="session")
def genbackends_model_dir(genbackends_kit: KitSettings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if genbackends_kit.model:
        return Path(genbackends_kit.model).resolve()
    from genbackends.tiny import build_tiny_model

    return Path(build_tiny_model(tmp_path_factory.mktemp("genbackends_kit_tiny"), arch="llama", seed=0))


@pytest.fixture(scope="session")
def genbackends_config(genbackends_kit: KitSettings, genbackends_model_dir: Path) -> Any:
    from genbackends.config_loader import load_config

    overrides = list(genbackends_kit.overrides)
    if genbackends_kit.backend:
        overrides.append(f"backend={genbackends_kit.backend}")
    overrides.append(f"model={genbackends_model_dir}")
    return load_config(genbackends_kit.config_file, overrides, base=BASE_CONFIG)


@pytest.fixture(scope="session")
def genbackends_registry(genbackends_config: Any) -> Any:
    from genbackends.registry import get_registry

    return get_registry(allow=genbackends_config.plugins) if genbackends_config.plugins else get_registry()


@pytest.fixture(scope="session")
def genbackends_recorder(genbackends_registry: Any) -> Iterator[HookRecorder]:
    rec = HookRecorder()
    genbackends_registry.pm.register(rec, name="genbackends-conformance-recorder")
    yield rec
    genbackends_registry.pm.unregister(rec)


@pytest.fixture(scope="session")
def genbackends_backend(genbackends_registry: Any, genbackends_config: Any, genbackends_recorder: HookRecorder) -> Iterator[Any]:
    backend = genbackends_registry.create_backend(genbackends_config)
    backend.setup()
    yield backend
    try:
        backend.shutdown()
    except Exception:  # noqa: BLE001 - the shutdown check may have shut it down already
        pass


@pytest.fixture(scope="session")
def genbackends_reference(genbackends_config: Any) -> Any:
    from genbackends.testing.reference import Float64Reference

    return Float64Reference(genbackends_config.model, genbackends_config.tokenizer_path)
