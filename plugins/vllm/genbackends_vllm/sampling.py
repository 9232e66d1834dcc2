"""Core sampling config -> vLLM ``SamplingParams`` / ``BeamSearchParams``.

* eval mode applies ``eval_temperature``/``eval_top_k``/``eval_top_p``;
* ``logprobs`` is always at least 0, so vLLM returns the sampled token's logprob (RL needs it);
* ``new_token_limit: false`` gives every prompt ``seq_length - len(prompt)`` tokens, so the
  params are per prompt;
* ``stop_token_list`` entries are stop strings; an entry that is a special token of the
  tokenizer (e.g. ``</s>``) also becomes a stop token id, because special tokens are dropped from
  the detokenized text and a string match on them would never fire.
"""
from __future__ import annotations

from typing import Any, Sequence

from genbackends.config import GenConfig, SamplingConfig
from genbackends.errors import ConfigError
from genbackends.sampling_rules import check_greedy_n as _check_greedy_n
from genbackends.sampling_rules import token_budget

from genbackends_vllm import compat


def max_tokens_for(config: GenConfig, prompt_len: int) -> int:
    """Response budget of one prompt (the shared rule, :func:`genbackends.sampling_rules.token_budget`)."""
    return token_budget(config.sampling, config.seq_length, prompt_len)


def stop_token_ids(stops: Sequence[str], tokenizer: Any) -> list[int]:
    """Ids of stop entries that are single special tokens of ``tokenizer``."""
    if tokenizer is None:
        return []
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    ids = []
    for s in stops:
        if s in special:
            tid = tokenizer.convert_tokens_to_ids(s)
            if isinstance(tid, int) and tid >= 0:
                ids.append(tid)
    return ids


def check_greedy_n(config: GenConfig) -> None:
    """vLLM refuses ``n > 1`` with greedy sampling (the shared rule,
    :func:`genbackends.sampling_rules.greedy_n_problem`): fail naming the knobs."""
    _check_greedy_n(config.sampling)


def check_sampling(config: GenConfig) -> None:
    """What this backend cannot sample, as one-line :class:`ConfigError` s: the shared greedy-n
    rule, and prompt logprobs with beam search (vLLM's beam search does not return them). Run
    at creation and for every call (sampling may be given per call)."""
    s = config.sampling
    if s.use_beam_search and s.prompt_logprobs is not None:
        raise ConfigError(
            "sampling.prompt_logprobs: not available with sampling.use_beam_search (vLLM's beam search does not return them)"
        )
    check_greedy_n(config)


def sampling_params(
    config: GenConfig, prompt_lens: Sequence[int], eval_mode: bool, tokenizer: Any = None
) -> list[Any]:
    """One ``SamplingParams`` per prompt (they differ only in ``max_tokens`` when
    ``new_token_limit`` is false)."""
    from vllm import SamplingParams

    check_sampling(config)
    s: SamplingConfig = config.sampling.resolved(eval_mode)
    stops = s.stop_strings
    common = dict(
        n=s.n,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k if s.top_k > 0 else -1,
        ignore_eos=s.ignore_eos,
        logprobs=s.logprobs,
        prompt_logprobs=s.prompt_logprobs,
        seed=s.seed,
        stop=stops or None,
        stop_token_ids=stop_token_ids(stops, tokenizer) or None,
        # Flat logprob arrays instead of one dict per token: cheaper in the engine's output
        # processing and read without building dicts by decode_internal (see decode.py).
        **compat.flat_logprobs_kwargs(),
    )
    cache: dict[int, Any] = {}
    out = []
    for n in prompt_lens:
        mt = max_tokens_for(config, n)
        if mt not in cache:
            cache[mt] = SamplingParams(max_tokens=mt, **common)
        out.append(cache[mt])
    return out


def beam_search_params(config: GenConfig, max_tokens: int, eval_mode: bool) -> Any:
    """``BeamSearchParams`` with beam width ``n`` (temperature from the resolved sampling)."""
    s = config.sampling.resolved(eval_mode)
    cls = compat.beam_search_params_cls()
    return cls(beam_width=s.n, max_tokens=max_tokens, ignore_eos=s.ignore_eos, temperature=s.temperature)
