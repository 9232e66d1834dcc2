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

from genbackends_vllm import compat


def max_tokens_for(config: GenConfig, prompt_len: int) -> int:
    """Response budget of one prompt under ``new_token_limit``."""
    if config.sampling.new_token_limit:
        return config.sampling.max_new_tokens
    return max(1, config.seq_length - prompt_len)


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
    """vLLM refuses ``n > 1`` with greedy sampling (all completions would be the same): fail at
    creation, naming the knobs, rather than at the first generate."""
    s = config.sampling
    if s.use_beam_search or s.n == 1:
        return
    for mode, field in ((False, "temperature"), (True, "eval_temperature")):
        if s.resolved(mode).temperature == 0:
            raise ConfigError(
                f"sampling.n: n={s.n} needs sampling.{field} > 0 (greedy decoding gives one completion); "
                "use n: 1 or use_beam_search"
            )


def sampling_params(
    config: GenConfig, prompt_lens: Sequence[int], eval_mode: bool, tokenizer: Any = None
) -> list[Any]:
    """One ``SamplingParams`` per prompt (they differ only in ``max_tokens`` when
    ``new_token_limit`` is false)."""
    from vllm import SamplingParams

    check_greedy_n(config)
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
