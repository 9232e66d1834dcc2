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
    (see :class:`genbackends_megatron.source.MegatronWeightSource` for the options; a mixture of
    experts gets :class:`genbackends_megatron.moe_source.MegatronMoEWeightSource`)."""
    if getattr(model.dims, "num_experts", 0):
        # Mixture of experts: shards spread over EP x expert-TP too; HF-named path only for now.
        from genbackends_megatron.moe_source import MegatronMoEWeightSource

        ranks = tuple(kwargs.pop("engine_ranks", (0,)))
        if len(ranks) != 1 or set(kwargs) - {"bucket_bytes"}:
            raise TypeError(f"a MoE source takes one engine rank and bucket_bytes; got engine_ranks={ranks}, {sorted(kwargs)}")
        return MegatronMoEWeightSource(model, engine_rank=ranks[0], **kwargs)
    from genbackends_megatron.source import MegatronWeightSource

    return MegatronWeightSource(model, **kwargs)


__all__ = ["make_source"]
