"""The HF backend against independent references: a float64 greedy loop over the model's forward
(no generate, no KV cache), float64 log-softmax for logprobs, and probability checks for sampling."""
from __future__ import annotations

import pytest
import torch

from genbackends.config_loader import load_config
from genbackends.errors import BackendStateError, WeightSyncError
from genbackends.registry import Registry
from genbackends.weights import TensorSpec

PROMPTS = ["the cat sat on the mat", "a dog", "once upon a time there was"]


def make_backend(model_dir, **over):
    sampling = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True, **over.pop("sampling", {})}
    cfg = load_config(base={"backend": "hf", "model": str(model_dir), "seq_length": 64, "device": "cpu",
                            "sampling": sampling, **over})
    b = Registry(allow=["hf"]).create_backend(cfg)
    b.setup()
    return b


def f64_model(model_dir, state=None):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    if state:
        with torch.no_grad():
            params = dict(m.named_parameters(remove_duplicate=False))
            for k, v in state.items():
                params[k].copy_(v.double())
    return m


@torch.no_grad()
def ref_greedy(m, prompt_ids, steps, eos=None):
    """Greedy decoding by full forward passes in float64: tokens and their logprobs."""
    ids, toks, lps = list(prompt_ids), [], []
    for _ in range(steps):
        lp = torch.log_softmax(m(torch.tensor([ids])).logits[0, -1], -1)
        t = int(lp.argmax())
        toks.append(t)
        lps.append(float(lp[t]))
        ids.append(t)
        if eos is not None and t == eos:
            break
    return toks, lps


@torch.no_grad()
def ref_logprobs(m, ids):
    lp = torch.log_softmax(m(torch.tensor([ids])).logits[0], -1)
    return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


@pytest.fixture(scope="module")
def llama(tiny_llama):
    b = make_backend(tiny_llama)
    yield b
    b.shutdown()


@pytest.fixture(scope="module")
def ref64(tiny_llama):
    return f64_model(tiny_llama)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_greedy_batched_matches_float64_loop(arch, tiny_model_factory, tiny_llama, llama, ref64):
    model_dir = tiny_model_factory(arch)
    b = llama if arch == "llama" else make_backend(model_dir)
    m = ref64 if arch == "llama" else f64_model(model_dir)
    recs = b.generate(PROMPTS)  # one left-padded batch of ragged prompts
    assert len(recs) == len(PROMPTS)
    for r, text in zip(recs, PROMPTS):
        assert r.prompt == text and r.prompt_token_ids == b.tokenizer.encode(text)
        toks, lps = ref_greedy(m, r.prompt_token_ids, 8)
        assert r.token_ids == toks
        assert max(abs(a - e) for a, e in zip(r.logprobs, lps)) < 1e-4
        assert r.cumulative_logprob == pytest.approx(sum(lps), abs=1e-3)
        assert r.finish_reason == "length" and r.index == 0
        assert r.text == b.tokenizer.decode(toks, skip_special_tokens=True).rstrip("\ufffd")
    if b is not llama:
        b.shutdown()


def test_prompt_logprobs_match_float64(tiny_llama, ref64):
    b = make_backend(tiny_llama, sampling={"prompt_logprobs": 0, "max_new_tokens": 2})
    recs = b.generate(PROMPTS)
    for r in recs:
        assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == len(r.prompt_token_ids)
        ref = ref_logprobs(ref64, r.prompt_token_ids)
        assert max(abs(a - e) for a, e in zip(r.prompt_logprobs[1:], ref)) < 1e-4
    b.shutdown()


def test_n_completions_per_prompt(tiny_llama):
    b = make_backend(tiny_llama, sampling={"n": 3, "temperature": 1.0, "seed": 5})
    recs = b.generate(PROMPTS[:2])
    assert [(r.prompt_index, r.index) for r in recs] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert len({tuple(r.token_ids) for r in recs[:3]}) > 1  # independent samples
    assert len({r.request_id for r in recs}) == 2
    b.shutdown()


def test_greedy_n_above_1_is_a_config_error(tiny_llama):
    """As vLLM refuses it: greedy decoding has one completion."""
    from genbackends.errors import ConfigError

    with pytest.raises(ConfigError, match=r"sampling.n: n=3 needs sampling.temperature > 0"):
        make_backend(tiny_llama, sampling={"n": 3})
    with pytest.raises(ConfigError, match=r"sampling.n: n=2 needs sampling.eval_temperature > 0"):
        make_backend(tiny_llama, sampling={"n": 2, "temperature": 1.0, "eval_temperature": 0.0})


def test_sampling_follows_temperature_distribution_and_returns_raw_logprobs(tiny_llama, ref64):
    """400 one-token samples at temperature 2, top_k -1. The statistic: the mean raw logprob of
    the sampled token, whose exact expectation under softmax(logits / 2) we compute in float64.
    Temperature 1 or transformers' default top-k of 50 would move it by many standard errors.
    Each returned logprob must be the raw model's log-softmax (vLLM's default logprobs mode)."""
    n = 400
    b = make_backend(tiny_llama, sampling={"temperature": 2.0, "top_k": -1, "n": n, "max_new_tokens": 1, "seed": 7})
    recs = b.generate([PROMPTS[0]])
    ids = recs[0].prompt_token_ids
    with torch.no_grad():
        logits = ref64(torch.tensor([ids])).logits[0, -1]
    raw = torch.log_softmax(logits, -1)

    def expect(temp, top_k=None):
        z = logits / temp
        if top_k:
            z = torch.where(z >= torch.topk(z, top_k).values[-1], z, torch.tensor(float("-inf"), dtype=z.dtype))
        p = torch.softmax(z, -1)
        mean = float((p * raw).sum())
        return mean, float((p * (raw - mean) ** 2).sum()) ** 0.5

    mean, std = expect(2.0)
    se = std / n**0.5
    # the test can tell the alternatives apart (a property of the tiny model, checked here)
    assert abs(expect(1.0)[0] - mean) > 6 * se and abs(expect(2.0, 50)[0] - mean) > 6 * se
    got = [r.logprobs[0] for r in recs]
    for r in recs:
        assert r.logprobs[0] == pytest.approx(float(raw[r.token_ids[0]]), abs=1e-4)
    assert abs(sum(got) / n - mean) < 4 * se, (sum(got) / n, mean, se)
    # the same seed gives the same samples
    again = b.generate([PROMPTS[0]])
    assert [r.token_ids for r in again] == [r.token_ids for r in recs]
    b.shutdown()


def test_top_k_1_and_eval_temperature_are_greedy(tiny_llama, llama):
    greedy = [r.token_ids for r in llama.generate(PROMPTS)]
    b = make_backend(tiny_llama, sampling={"temperature": 1.0, "top_k": 1, "seed": 1, "eval_temperature": 0.0,
                                           "eval_top_k": -1})
    assert [r.token_ids for r in b.generate(PROMPTS)] == greedy
    b.config.sampling.top_k = -1
    assert [r.token_ids for r in b.generate(PROMPTS, eval_mode=True)] == greedy
    assert [r.token_ids for r in b.generate(PROMPTS)] != greedy  # train mode samples at temperature 1
    b.shutdown()


def test_stop_string_cuts_text_keeps_token(llama):
    tok = llama.tokenizer
    # find a printable stop string completed by some generated token (random models emit junk)
    stop = None
    for prompt, full in zip(PROMPTS, llama.generate(PROMPTS)):
        for k in range(1, 8):
            piece = tok.decode(full.token_ids[k : k + 1], skip_special_tokens=True)
            prefix = tok.decode(full.token_ids[:k], skip_special_tokens=True)
            if piece.strip() and piece.isprintable() and "\ufffd" not in piece and piece not in prefix and ";" not in piece:
                stop, k_hit = piece, k
                break
        if stop is not None:
            break
    assert stop is not None
    llama.config.sampling.stop_token_list = f"zzzqqq;{stop}"
    try:
        r = llama.generate([prompt])[0]
    finally:
        llama.config.sampling.stop_token_list = None
    assert r.finish_reason == "stop" and r.extra["stop_reason"] == stop
    assert r.token_ids == full.token_ids[: k_hit + 1] and len(r.logprobs) == k_hit + 1
    assert stop not in r.text and r.text == tok.decode(full.token_ids[: k_hit + 1], skip_special_tokens=True).split(stop)[0]


def test_new_token_limit_false_fills_seq_length(tiny_llama):
    b = make_backend(tiny_llama, seq_length=20, sampling={"new_token_limit": False, "max_new_tokens": 4})
    recs = b.generate(PROMPTS)
    for r in recs:
        assert len(r.token_ids) == 20 - len(r.prompt_token_ids) and r.finish_reason == "length"
    b.shutdown()


def test_eos_stops_unless_ignored_after_sync(tiny_llama, llama, ref64):
    """Make EOS the greedy choice partway through (lm_head row of EOS := 3 x the row of a token
    greedy picks), sync it in, and compare with the float64 loop on the same weights."""
    b = make_backend(tiny_llama, sampling={"ignore_eos": False})
    eos = b.tokenizer.eos_token_id
    base = llama.generate([PROMPTS[0]])[0]
    head = b.model.lm_head.weight.detach().clone()
    head[eos] = 3.0 * head[base.token_ids[3]]
    report = b.sync_weights({"lm_head.weight": head})
    assert report.num_tensors == 1 and report.bytes_moved == head.numel() * 4 and "validate" in report.phases
    r = b.generate([PROMPTS[0]])[0]
    m = f64_model(tiny_llama, {"lm_head.weight": head})
    toks, lps = ref_greedy(m, r.prompt_token_ids, 8, eos=eos)
    assert toks[-1] == eos and len(toks) < 8  # the reference does stop early
    assert r.token_ids == toks and r.finish_reason == "stop" and r.extra == {"stop_reason": None}
    assert max(abs(a - e) for a, e in zip(r.logprobs, lps)) < 1e-4
    b.config.sampling.ignore_eos = True
    r2 = b.generate([PROMPTS[0]])[0]
    assert len(r2.token_ids) == 8 and r2.token_ids[: len(toks)] == toks and r2.finish_reason == "length"
    b.shutdown()


def test_rejected_sync_leaves_weights(tiny_llama):
    b = make_backend(tiny_llama)
    before = [r.token_ids for r in b.generate(PROMPTS)]
    w = b.model.lm_head.weight.detach().clone()
    with pytest.raises(WeightSyncError, match=r"wrong shape.*lm_head\.weight: got \(300, 255\), hf model expects \(300, 256\)"):
        b.sync_weights({"model.norm.weight": torch.zeros(256), "lm_head.weight": torch.zeros(300, 255)})
    with pytest.raises(WeightSyncError, match=r"unknown weight name\(s\) 'lm_head.wieght'"):
        b.sync_weights([("model.norm.weight", torch.zeros(256)), ("lm_head.wieght", w)])

    class LyingSource:
        """Announces correct shapes, then delivers a wrong one in its second bucket."""

        def manifest(self):
            return {"model.norm.weight": TensorSpec((256,), torch.float32), "lm_head.weight": TensorSpec((300, 256), torch.float32)}

        def iter_buckets(self, bucket_bytes=None):
            yield [("model.norm.weight", torch.zeros(256))]
            yield [("lm_head.weight", torch.zeros(3, 3))]

    with pytest.raises(WeightSyncError, match="which its manifest did not announce"):
        b.sync_weights(LyingSource())
    assert [r.token_ids for r in b.generate(PROMPTS)] == before  # the first bucket was rolled back
    b.shutdown()


def test_sync_from_safetensors_folder_and_tied_embeddings(tiny_qwen2, tiny_model_factory):
    """Qwen2 ties lm_head to the embedding: syncing the embedding alone changes both; a synced
    safetensors folder of other weights gives that model's outputs."""
    b = make_backend(tiny_qwen2)
    assert "lm_head.weight" in b.expected_weights() and "model.embed_tokens.weight" in b.expected_weights()
    other = tiny_model_factory("qwen2", seed=3)
    b.sync_weights(str(other))
    m = f64_model(other)
    r = b.generate([PROMPTS[0]])[0]
    assert r.token_ids == ref_greedy(m, r.prompt_token_ids, 8)[0]
    emb = torch.randn(b.model.model.embed_tokens.weight.shape)
    b.sync_weights({"model.embed_tokens.weight": emb})
    assert torch.equal(b.model.lm_head.weight, emb)
    b.shutdown()


def test_beam_search(llama, ref64):
    llama.config.sampling.use_beam_search = True
    llama.config.sampling.n = 3
    try:
        recs = llama.generate([PROMPTS[2]])
    finally:
        llama.config.sampling.use_beam_search = False
        llama.config.sampling.n = 1
    assert [r.index for r in recs] == [0, 1, 2]
    assert len({tuple(r.token_ids) for r in recs}) == 3
    cums = [r.cumulative_logprob for r in recs]
    assert cums == sorted(cums, reverse=True)  # equal lengths (ignore_eos): ordered by score
    for r in recs:
        ref = ref_logprobs(ref64, r.prompt_token_ids + r.token_ids)[len(r.prompt_token_ids) - 1 :]
        assert max(abs(a - e) for a, e in zip(r.logprobs, ref)) < 1e-4
    greedy_cum = sum(ref_greedy(ref64, recs[0].prompt_token_ids, 8)[1])
    assert cums[0] >= greedy_cum - 1e-4


def test_token_id_prompts_sleep_wake_and_shutdown(tiny_llama, llama):
    ids = llama.tokenizer.encode(PROMPTS[1])
    direct = llama.decode_internal(llama.forward_step([ids]))
    assert direct[0].token_ids == llama.generate([PROMPTS[1]])[0].token_ids
    llama.sleep()
    llama.wake_up()
    assert llama.decode_internal(llama.forward_step([ids]))[0].token_ids == direct[0].token_ids
    b = make_backend(tiny_llama)
    b.shutdown()
    with pytest.raises(BackendStateError, match="was shut down"):
        b.generate(["x"])


def test_top_logprobs_when_asked(tiny_llama, ref64):
    """logprobs: k and prompt_logprobs: k add vLLM-shaped top-k dicts (the chosen token always in)."""
    b = make_backend(tiny_llama, sampling={"logprobs": 3, "prompt_logprobs": 2, "max_new_tokens": 4})
    r = b.generate([PROMPTS[0]])[0]
    tops, ptops = r.extra["top_logprobs"], r.extra["prompt_top_logprobs"]
    assert len(tops) == 4 and ptops[0] is None and len(ptops) == len(r.prompt_token_ids)
    ids = r.prompt_token_ids + r.token_ids
    with torch.no_grad():
        lp = torch.log_softmax(ref64(torch.tensor([ids])).logits[0], -1)
    for step, d in enumerate(tops):
        pos = len(r.prompt_token_ids) - 1 + step
        ref_top = lp[pos].topk(3)
        assert set(d) == set(ref_top.indices.tolist()) | {r.token_ids[step]}
        for t, v in d.items():
            assert v == pytest.approx(float(lp[pos, t]), abs=1e-4)
    for pos in range(1, len(r.prompt_token_ids)):
        assert set(ptops[pos]) == set(lp[pos - 1].topk(2).indices.tolist()) | {r.prompt_token_ids[pos]}
    b.shutdown()


def test_hf_rejects_parallel_settings(tiny_llama):
    from genbackends.errors import ConfigError

    cfg = load_config(base={"backend": "hf", "model": str(tiny_llama), "seq_length": 64,
                            "sampling": {"max_new_tokens": 4}, "parallel": {"tensor_parallel_size": 2}})
    with pytest.raises(ConfigError, match=r"parallel.tensor_parallel_size: the hf backend runs one model in one process \(got 2\)"):
        Registry(allow=["hf"]).create_backend(cfg)
