"""Sampling rules every backend shares, written once.

* :func:`greedy_n_problem`: greedy decoding with ``n > 1`` is refused (vLLM refuses it, every
  backend follows so one config behaves the same everywhere);
* :func:`token_budget`: how many new tokens one prompt may get;
* :func:`pad_token_id`: the pad id for padded batches;
* :func:`with_sampling`: a config with per-call sampling applied, validated by the config's own
  model, so a per-call ``sampling=`` argument and ``sampling_overrides`` are checked exactly like
  the YAML (``sampling.top_p: Input should be less than or equal to 1 (got 7)``).

This module must not import :mod:`genbackends.config` at import time (the config imports it).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from genbackends.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from genbackends.config import GenConfig, SamplingConfig


def greedy_n_problem(sampling: "SamplingConfig") -> str | None:
    """Why this sampling is refused for ``n > 1`` (greedy in training or in eval mode), or
    ``None`` when it is fine. Beam search with width ``n`` is deterministic and allowed."""
    s = sampling
    if s.n == 1 or s.use_beam_search:
        return None
    for eval_mode, name in ((False, "temperature"), (True, "eval_temperature")):
        if s.resolved(eval_mode).temperature == 0:
            return (
                f"sampling.n: n={s.n} needs sampling.{name} > 0 (greedy decoding gives one completion); "
                "use n: 1 or use_beam_search"
            )
    return None


def check_greedy_n(sampling: "SamplingConfig") -> None:
    """Raise :class:`ConfigError` with :func:`greedy_n_problem`'s message, if any."""
    problem = greedy_n_problem(sampling)
    if problem:
        raise ConfigError(problem)


def token_budget(sampling: "SamplingConfig", seq_length: int, prompt_len: int) -> int:
    """New tokens one prompt may get: ``max_new_tokens`` with ``new_token_limit`` (prompts from
    the pipeline are at most ``seq_length - max_new_tokens`` long, so this never passes
    ``seq_length``), else the room left in ``seq_length`` (at least 1)."""
    if sampling.new_token_limit:
        return sampling.max_new_tokens
    return max(1, seq_length - prompt_len)


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (pads are masked out; the id only has to
    be a valid token). ``tokenizer`` may be ``None`` (token-id-only engines): 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int) and v >= 0:
            return v
    return 0


def with_sampling(config: "GenConfig", sampling: Any) -> "GenConfig":
    """``config`` with ``sampling`` applied, validated by the config's own model.

    ``sampling`` is a mapping of sampling fields (applied on top of ``config.sampling``: only the
    keys given change) or a whole :class:`~genbackends.config.SamplingConfig` (replaces it).
    Every problem, per field or across fields, is one :class:`ConfigError` line naming
    ``sampling.<field>``. ``config`` itself is not changed.
    """
    from pydantic import BaseModel, ValidationError

    from genbackends.config import SamplingConfig, format_validation_error

    if sampling is None:
        return config
    if isinstance(sampling, SamplingConfig):
        # re-validated: a model_copy(update=...) or model_construct() holds unchecked values
        data = {k: getattr(sampling, k) for k in sampling.model_fields_set}
    elif isinstance(sampling, Mapping):
        data = {**config.sampling.model_dump(exclude_unset=True), **dict(sampling)}
    elif isinstance(sampling, BaseModel):
        raise ConfigError(f"sampling must be a dict or a SamplingConfig, got a {type(sampling).__name__}")
    else:
        raise ConfigError(f"sampling must be a dict or a SamplingConfig, got {sampling!r}")
    # exclude_unset keeps which fields a user set (backends log knobs they ignore by that)
    whole = {**config.model_dump(exclude_unset=True), "sampling": data}
    try:
        new = type(config).model_validate(whole)
    except ValidationError as e:
        msg = format_validation_error(e)
        raise ConfigError("invalid sampling: " + msg.removeprefix("invalid config: ")) from None
    if config.__pydantic_private__:  # e.g. the file the config came from, for later messages
        new.__pydantic_private__ = dict(config.__pydantic_private__)
    return new
