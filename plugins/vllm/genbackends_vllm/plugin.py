"""Entry point of the vLLM backend plugin (``genbackends.plugins: vllm``).

Importing this module must not import vLLM (the registry loads every plugin at start-up), so
the backend class is imported here but imports vLLM only in ``setup()``.
"""
from __future__ import annotations

from genbackends.hookspecs import hookimpl


@hookimpl
def genbackends_register_backends() -> list[type]:
    """The ``vllm`` backend."""
    from genbackends_vllm.backend import VLLMBackend

    return [VLLMBackend]
