"""Megatron-core -> vLLM (and any genbackends backend) weight adapter.

Pure layout math (:mod:`.tables`, :mod:`.layout`, :mod:`.plan`) imports neither megatron nor
vLLM. The model builder (:mod:`.model_builder`) needs megatron-core; the direct writer needs vLLM.

Public API for trainers and demos::

    from genbackends_megatron.model_builder import init_parallel, build_model, load_hf_weights, forward_logprobs
    from genbackends_megatron import make_source
    source = make_source(model)            # a WeightSource (and DirectWeightSource)
    report = backend.sync_weights(source)
"""
from __future__ import annotations

from typing import Any


def make_source(model: Any, **kwargs: Any) -> Any:
    """A weight source over a live :class:`~genbackends_megatron.model_builder.MegatronModel`
    (see :class:`genbackends_megatron.source.MegatronWeightSource` for the options)."""
    from genbackends_megatron.source import MegatronWeightSource

    return MegatronWeightSource(model, **kwargs)


__all__ = ["make_source"]
