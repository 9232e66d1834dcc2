"""Every hook of the ``genbackends`` pluggy project, in one place.

A plugin is a module (or object) with functions decorated by :data:`hookimpl` whose names match
the specs below. Plugins are found through the ``genbackends.plugins`` entry-point group; the
built-in vLLM and HF backends and the Megatron adapter register exactly the same way.

Two kinds of hooks:

* **registration hooks** (``genbackends_register_*``), called once when the registry loads,
  return classes or objects the registry indexes by name;
* **event hooks** (``genbackends_on_*``), fired at points of the RL loop by the base class
  :class:`~genbackends.backend.GenerationBackend` around every backend's public operations
  (backends never fire them themselves), so a metrics or logging plugin that is not a backend is a
  few lines.

The registry registers each plugin with pluggy, so a hookimpl's arguments must be a subset of its
spec's, ``@hookimpl(specname="genbackends_on_after_sync")`` lets a function keep a name of its own,
and a hookimpl whose name matches no spec below makes its plugin broken (the error names the
closest spec).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    import argparse

    from genbackends.backend import GenerationBackend
    from genbackends.records import GenerationRecord
    from genbackends.weights import SyncReport

PROJECT_NAME = "genbackends"
ENTRY_POINT_GROUP = "genbackends.plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def genbackends_register_backends() -> list[type["GenerationBackend"]]:
    """Return the :class:`~genbackends.backend.GenerationBackend` subclasses this plugin provides.

    Each class carries its config name in the class attribute ``name`` (what users write as
    ``backend: <name>``) and its option model in ``options_model``. Two classes claiming the same
    name (from any distributions) make the registry raise an error naming both.
    """


@hookspec
def genbackends_register_weight_adapters() -> list[Any]:
    """Return weight adapters this plugin provides.

    Each adapter object has ``source`` (e.g. ``"megatron"``), ``architectures`` (a list such as
    ``["llama", "qwen2", "qwen3"]``) and a ``make_source(model, **kwargs)`` method returning a
    :class:`~genbackends.weights.WeightSource` that any backend's ``sync_weights`` accepts.
    """


@hookspec
def genbackends_add_cli_commands(subparsers: "argparse._SubParsersAction") -> None:
    """Add subcommands to the ``genbackends`` CLI.

    Receives the argparse sub-parser collection. A command sets ``func=callable(args) -> int`` as
    its default; the CLI calls it and exits with the returned status.
    """


@hookspec
def genbackends_on_backend_ready(backend: "GenerationBackend", startup_seconds: float) -> None:
    """Called after a backend's ``setup()`` finished, with the time it took."""


@hookspec
def genbackends_on_after_generate(
    backend: "GenerationBackend", records: list["GenerationRecord"], stats: dict[str, float]
) -> None:
    """Called after ``generate()`` produced records.

    ``stats`` holds at least ``seconds``, ``num_prompts``, ``prompt_tokens``, ``output_tokens``
    and ``output_tokens_per_s``.
    """


@hookspec
def genbackends_on_after_sync(backend: "GenerationBackend", report: "SyncReport") -> None:
    """Called after a ``sync_weights()`` that returned (a rejected sync raises and fires nothing),
    with its report: path, transport, tensor count, bytes, seconds and phase times.
    ``report.parity`` is still ``None`` here: a caller that verifies (the Megatron adapter's
    ``source.sync(backend, probes=...)``) fills it in after ``sync_weights`` has returned."""


@hookspec
def genbackends_on_memory_phase(backend: "GenerationBackend", phase: str, stats: dict[str, float]) -> None:
    """Called after ``sleep()`` (``phase="sleep"``) and ``wake_up()`` (``phase="wake_up"``) with
    ``seconds`` and, where the engine reports it, ``freed_bytes``/``used_bytes``."""
