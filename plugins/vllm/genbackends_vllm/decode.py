"""vLLM ``RequestOutput`` s -> core :class:`~genbackends.records.GenerationRecord` s.

Every field of the seed's ``RequestOutput``/``CompletionOutput`` tables is carried: the flat ones
into the record's own fields, the rest (``stop_reason``, ``num_cached_tokens``, top-k logprob
dicts when ``logprobs > 0``, fields newer releases add) into ``record.extra``.

Beam search returns ``BeamSearchOutput`` s; :func:`beam_to_request_output` turns each into a real
``RequestOutput`` so ``forward_step`` has one return type.
"""
from __future__ import annotations

from typing import Any, Sequence

from genbackends.records import GenerationRecord

from genbackends_vllm import compat


def _token_logprob(entry: Any, token_id: int) -> float | None:
    if entry is None:
        return None
    lp = entry.get(token_id)
    return None if lp is None else float(lp.logprob)


def _top(entry: Any) -> dict[int, float] | None:
    if entry is None:
        return None
    return {int(t): float(lp.logprob) for t, lp in entry.items()}


def _is_flat(container: Any) -> bool:
    # vLLM's FlatLogprobs (SamplingParams.flat_logprobs): parallel lists, no dict per position.
    return hasattr(container, "start_indices") and hasattr(container, "end_indices")


def _chosen_logprobs(container: Any, chosen: Sequence[int]) -> list[float | None]:
    """Log-probability of ``chosen[i]`` at each position (None where the position has none).

    Per generated token this is the hot loop of decoding, so flat containers are read straight
    from their arrays (vLLM puts the sampled / prompt token first at each position) instead of
    through the per-position dicts ``container[i]`` would build."""
    if _is_flat(container):
        starts, ends, ids, lps = container.start_indices, container.end_indices, container.token_ids, container.logprobs
        out: list[float | None] = []
        for s, e, t in zip(starts, ends, chosen):
            if s == e:
                out.append(None)
            elif ids[s] == t:
                out.append(float(lps[s]))
            else:
                out.append(next((float(lps[k]) for k in range(s, e) if ids[k] == t), None))
        return out
    return [_token_logprob(e, t) for e, t in zip(container, chosen)]


def _tops_if_wider(container: Any) -> list[dict[int, float] | None] | None:
    """Per-position ``{token: logprob}`` dicts, only when some position holds more than the
    chosen token (``logprobs > 0``); ``None`` otherwise (nothing is built for the common case)."""
    if _is_flat(container):
        if not any(e - s > 1 for s, e in zip(container.start_indices, container.end_indices)):
            return None
        ids, lps = container.token_ids, container.logprobs
        return [None if s == e else {int(ids[k]): float(lps[k]) for k in range(s, e)}
                for s, e in zip(container.start_indices, container.end_indices)]
    if not any(len(e or {}) > 1 for e in container):
        return None
    return [_top(e) for e in container]


def request_output_to_records(out: Any, prompt_index: int = 0, prompt_text: str | None = None) -> list[GenerationRecord]:
    """One record per completion of one ``RequestOutput``, in completion-index order."""
    ptoks = list(out.prompt_token_ids or [])
    plp = None
    ptop = None
    if out.prompt_logprobs is not None:
        plp = _chosen_logprobs(out.prompt_logprobs, ptoks)
        plp[:1] = [None] * min(1, len(plp))  # the first prompt token has no logprob
        ptop = _tops_if_wider(out.prompt_logprobs)
    records = []
    for c in sorted(out.outputs, key=lambda c: c.index):
        toks = list(c.token_ids)
        if c.logprobs is not None:
            lps = _chosen_logprobs(c.logprobs, toks)
            tops = _tops_if_wider(c.logprobs)
        else:
            lps, tops = [], None
        extra: dict[str, Any] = {
            "stop_reason": c.stop_reason,
            "finished": bool(getattr(out, "finished", True)),
            "num_cached_tokens": compat.optional_field(out, "num_cached_tokens"),
        }
        if tops is not None:
            extra["top_logprobs"] = tops
        if ptop is not None:
            extra["prompt_top_logprobs"] = ptop
        for name in ("weight_versions",):
            v = compat.optional_field(c, name)
            if v is not None:
                extra[name] = v
        lora = getattr(out, "lora_request", None)
        if lora is not None:
            extra["lora"] = getattr(lora, "lora_name", str(lora))
        cum = c.cumulative_logprob
        records.append(
            GenerationRecord(
                request_id=str(out.request_id),
                prompt=prompt_text if prompt_text is not None else (out.prompt or ""),
                prompt_token_ids=ptoks,
                index=int(c.index),
                text=c.text,
                token_ids=toks,
                logprobs=[float("nan") if x is None else x for x in lps],
                cumulative_logprob=float(cum) if cum is not None else float(sum(x for x in lps if x is not None)),
                finish_reason=c.finish_reason,
                prompt_logprobs=plp,
                prompt_index=prompt_index,
                extra=extra,
            )
        )
    return records


def outputs_to_records(outputs: Sequence[Any], prompts: Sequence[str | None] | None = None) -> list[GenerationRecord]:
    """Records of a batch, prompt order then completion index."""
    records: list[GenerationRecord] = []
    for i, out in enumerate(outputs):
        text = prompts[i] if prompts is not None else None
        records.extend(request_output_to_records(out, prompt_index=i, prompt_text=text))
    return records


def beam_to_request_output(beam_out: Any, request_id: str, prompt_token_ids: list[int], prompt: str | None, tokenizer: Any) -> Any:
    """A ``BeamSearchOutput`` as a ``RequestOutput`` whose completions are the beams, best
    first (index 0 = best score). Sampled-token logprobs are read from the per-step dicts."""
    from vllm.outputs import CompletionOutput, RequestOutput

    n_prompt = len(prompt_token_ids)
    completions = []
    for idx, seq in enumerate(beam_out.sequences):
        gen = list(seq.tokens[n_prompt:])
        steps = list(seq.logprobs or [])[-len(gen):] if gen else []
        # seq.text holds prompt + response; decode the response alone.
        text = tokenizer.decode(gen, skip_special_tokens=True) if tokenizer is not None else (seq.text or "")
        finish = seq.finish_reason or ("stop" if gen and tokenizer is not None and gen[-1] == tokenizer.eos_token_id else "length")
        completions.append(
            CompletionOutput(
                index=idx,
                text=text or "",
                token_ids=gen,
                cumulative_logprob=float(seq.cum_logprob),
                logprobs=steps,
                finish_reason=finish,
                stop_reason=seq.stop_reason,
            )
        )
    return RequestOutput(
        request_id=request_id,
        prompt=prompt,
        prompt_token_ids=list(prompt_token_ids),
        prompt_logprobs=None,
        outputs=completions,
        finished=True,
    )
