"""One way for the checks to generate with per-call sampling."""
from __future__ import annotations

import inspect
from typing import Any, Sequence

from genbackends.records import GenerationRecord

# What every check starts from; a check changes only the knobs it is about.
BASE_SAMPLING: dict[str, Any] = {"max_new_tokens": 8, "temperature": 0.0, "seed": 0, "n": 1}


def generate(backend: Any, prompts: Sequence[str], eval_mode: bool = False, **knobs: Any) -> list[GenerationRecord]:
    """``backend.generate(prompts, sampling=..., eval_mode=...)`` with a whole
    :class:`~genbackends.config.SamplingConfig` built from the kit's base plus ``knobs``: every
    other field takes its default, so a user's config cannot change what a check means."""
    from genbackends.config import SamplingConfig

    sampling = SamplingConfig.model_validate({**BASE_SAMPLING, **knobs})
    if "sampling" in inspect.signature(backend.generate).parameters:
        return backend.generate(list(prompts), sampling=sampling, eval_mode=eval_mode)
    # a generate() override without the per-call argument: the context-manager form
    with backend.sampling_overrides(**{k: getattr(sampling, k) for k in SamplingConfig.model_fields}):
        return backend.generate(list(prompts), eval_mode=eval_mode)
