"""Atomic weight syncs (issue 14, findings 1-3) on real engines: hf, vLLM in-process, vLLM TP=2
worker processes (mp executor) reached by our gloo group and by vLLM's weight-transfer engine API
(``options.vllm.sync_transport: group`` / ``transfer_engine``).

Each bad sync (a source that raises at tensor k of n across several buckets, a tensor that
contradicts its manifest, NaN, Inf, an int tensor) is refused or rolled back: the fingerprint
(prompt logprobs, greedy tokens and their logprobs for 3 prompts) is bit-identical before and
after, the engine still generates, and a good sync afterwards gives what transformers computes on
the new weights. A NaN sync accepted with the finite check off, followed by a good sync, leaves
no trace (stale KV memory, issue 14 finding 1): the engine equals its fresh self again.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterator

import pytest
import torch
from safetensors.torch import load_file

from genbackends.errors import WeightSyncError
from genbackends.registry import get_registry
from genbackends.weights import TensorSpec, bucketize

from vllm_helpers import PROMPTS, HFReference, vllm_config

BUCKET = 300_000  # several buckets on the tiny model (one or two tensors each)
NEW = 6


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


class FailingSource:
    """Announces ``manifest`` honestly (or not) and yields ``pairs`` in buckets; raises before
    producing tensor ``fail_at`` (0-based)."""

    def __init__(self, pairs: list[tuple[str, torch.Tensor]], manifest: dict[str, TensorSpec] | None = None,
                 fail_at: int | None = None):
        self.pairs, self.fail_at = pairs, fail_at
        self._manifest = manifest or {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in pairs}

    def manifest(self) -> dict[str, TensorSpec]:
        return dict(self._manifest)

    def iter_buckets(self, bucket_bytes: int | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
        def gen() -> Iterator[tuple[str, torch.Tensor]]:
            for i, p in enumerate(self.pairs):
                if i == self.fail_at:
                    raise RuntimeError(f"trainer lost tensor {i}")
                yield p

        yield from bucketize(gen(), bucket_bytes)


def _ordered(w: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    # lm_head and embeddings last: the bad tensor arrives after several buckets were written
    return sorted(w.items(), key=lambda kv: (kv[0] in ("lm_head.weight", "model.embed_tokens.weight"), kv[0]))


def bad_source(case: str, base: dict[str, torch.Tensor], alt: dict[str, torch.Tensor]) -> Any:
    """A sync of the *alt* weights that must be refused or rolled back; ``case`` says how it breaks."""
    pairs = _ordered(alt)
    if case == "raise_at_k":
        return FailingSource(pairs, fail_at=10)
    if case == "lies_about_shape":  # manifest (V, H), tensor (300, 128): issue 14 finding 3
        man = {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in pairs}
        return FailingSource([(n, t[:, :128].contiguous() if n == "lm_head.weight" else t) for n, t in pairs], man)
    if case in ("nan", "inf"):
        poison = [(n, t.clone()) for n, t in pairs]
        k = [n for n, _ in poison].index("model.embed_tokens.weight" if case == "nan" else "model.layers.1.mlp.down_proj.weight")
        poison[k][1].view(-1)[7] = float("nan") if case == "nan" else float("inf")
        return FailingSource(poison)
    if case == "int":  # issue 14 finding 2: hf used to cast this silently
        return {"lm_head.weight": (base["lm_head.weight"] * 1000).long()}
    raise AssertionError(case)


CASES = ["raise_at_k", "lies_about_shape", "nan", "inf", "int"]
MESSAGES = {
    "raise_at_k": r"restored to its previous weights.*trainer lost tensor 10",
    "lies_about_shape": r"restored.*'lm_head.weight'.*shape \(300, 128\).*manifest.*announced \(300, 256\)",
    "nan": r"restored.*'model.embed_tokens.weight' \(shape \(300, 256\)\) holds NaN at index \(0, 7\)",
    "inf": r"restored.*'model.layers.1.mlp.down_proj.weight'.*holds \+Inf at index \(0, 7\)",
    "int": r"unchanged.*non-float.*'lm_head.weight' is int64",
}


def fingerprint(backend: Any) -> list[tuple]:
    """Prompt logprobs, greedy tokens and their logprobs of the 3 prompts (exact floats)."""
    recs = backend.generate(PROMPTS, sampling={"temperature": 0.0, "max_new_tokens": NEW, "ignore_eos": True, "prompt_logprobs": 0})
    return [(tuple(r.prompt_logprobs[1:]), tuple(r.token_ids), tuple(r.logprobs)) for r in recs]


def reference(backend: Any, ref: HFReference) -> list[tuple]:
    out = []
    for d in backend.build_dataset(PROMPTS):
        ids = d["input_ids"]
        toks = ref.greedy(ids, NEW)
        full = ids + toks
        lp = torch.log_softmax(ref.logits(full), -1)
        out.append((ref.prompt_logprobs(ids), toks, [float(lp[len(ids) - 1 + i, t]) for i, t in enumerate(toks)]))
    return out


def assert_close(fp: list[tuple], ref: list[tuple], tol: float = 1e-3) -> None:
    # fp32 engine vs fp32 transformers: usually < 2e-4, but 6.5e-4 was seen twice in 2026-12-02 runs
    # (same tokens; the comparison differed between two calls in one process, so summation order, not
    # weights). A missed or wrong tensor moves these logprobs by whole nats; the before/after checks
    # of this module are exact equalities.
    for (plp, toks, lps), (rplp, rtoks, rlps) in zip(fp, ref):
        assert list(toks) == list(rtoks)
        assert max(abs(a - b) for a, b in zip(list(plp) + list(lps), list(rplp) + list(rlps))) < tol


@pytest.fixture(scope="module")
def weights(tiny_llama, tiny_llama_alt):
    return _weights(tiny_llama), _weights(tiny_llama_alt)


@pytest.fixture(scope="module")
def refs(tiny_llama, tiny_llama_alt):
    return {"base": HFReference(tiny_llama), "alt": HFReference(tiny_llama_alt)}


def _hf_backend(model):
    from genbackends.config import GenConfig

    cfg = GenConfig.model_validate(dict(backend="hf", model=str(model), seq_length=128, dtype="float32",
                                        sampling={"temperature": 0.0, "max_new_tokens": NEW, "seed": 0},
                                        options={"hf": {"sync_bucket_bytes": BUCKET}}))
    return get_registry().create_backend(cfg)


@pytest.fixture(scope="module", params=["hf", "vllm", "vllm_tp2"])
def engine(request, tiny_llama):
    if request.param == "hf":
        b = _hf_backend(tiny_llama)
    elif request.param == "vllm":
        b = get_registry().create_backend(vllm_config(tiny_llama, vllm={"bucket_bytes": BUCKET}))
    else:
        # worker processes (mp executor), reached by two transports in turn (the option is read per
        # sync): our gloo group, and vLLM's weight-transfer API (start_weight_update, update_weights
        # per bucket, finish_weight_update: one update per sync; on the CPU its wire is our gloo
        # engine registered in vLLM's factory), which the engine is built for
        b = get_registry().create_backend(vllm_config(
            tiny_llama, parallel={"tensor_parallel_size": 2},
            vllm={"bucket_bytes": BUCKET, "sync_transport": "transfer_engine"}))
    b.setup()
    b.kind = request.param
    b.fresh = fingerprint(b)  # a fresh engine on the base weights
    yield b
    b.shutdown()


@pytest.mark.parametrize("transport", ["group", "transfer_engine"])
def test_bad_syncs_leave_the_engine_as_it_was(engine, weights, refs, transport):
    if engine.kind != "vllm_tp2" and transport != "group":
        pytest.skip("one process: no transport to choose")
    if engine.kind == "vllm_tp2":
        engine.options.sync_transport = transport
    base, alt = weights
    assert_close(engine.fresh, reference(engine, refs["base"]))
    cases = CASES if engine.kind != "vllm_tp2" else ["raise_at_k", "lies_about_shape", "nan"]
    for case in cases:
        with pytest.raises(WeightSyncError, match=MESSAGES[case]) as err:
            engine.sync_weights(bad_source(case, base, alt))
        assert "\n" not in str(err.value)
        assert fingerprint(engine) == engine.fresh, f"{engine.kind}: {case} changed the engine"
    # a good sync afterwards: what transformers computes on the new weights
    report = engine.sync_weights(FailingSource(_ordered(alt)))
    if engine.kind != "hf":
        assert report.details["snapshot_bytes"] + report.details["snapshot_bytes_retained"] > 0
        assert {"snapshot", "check", "check_finite", "load", "reset_cache"} <= set(report.phases)
    if engine.kind == "vllm_tp2":
        assert report.transport == transport, report.transport
    assert_close(fingerprint(engine), reference(engine, refs["alt"]))
    engine.sync_weights(base)
    assert fingerprint(engine) == engine.fresh


def test_nan_accepted_unchecked_leaves_no_trace_after_a_good_sync(engine, weights):
    """Issue 14 finding 1: NaN weights let in (check off) fill KV memory with NaN; after the good
    weights are synced back, 4 generate calls in a row equal the fresh engine's (KV scrubbed)."""
    if engine.kind == "vllm_tp2":
        pytest.skip("covered in-process; the TP2 engine keeps CI time down")
    base, _ = weights
    opts = engine.options
    flag = "sync_check_finite" if engine.kind == "hf" else "check_finite"
    setattr(opts, flag, False)
    try:
        engine.sync_weights({"model.embed_tokens.weight": torch.full_like(base["model.embed_tokens.weight"], float("nan"))})
    finally:
        setattr(opts, flag, True)
    assert all(math.isnan(x) for x in fingerprint(engine)[0][0][1:])
    engine.sync_weights({"model.embed_tokens.weight": base["model.embed_tokens.weight"]})
    for _ in range(4):
        assert fingerprint(engine) == engine.fresh


def test_failed_unatomic_transfer_update_does_not_block_the_next_sync(engine, weights, refs):
    """vLLM's transfer engine takes one weight update per sync; one that fails half way with
    ``sync_atomic`` off (no snapshot, no restore) must still be closed on the workers: vLLM refuses
    a new ``start_weight_update`` while one is open. The next sync then works and equals
    transformers."""
    if engine.kind != "vllm_tp2":
        pytest.skip("the transfer engine serves engines in worker processes")
    base, alt = weights
    opts = engine.options
    opts.sync_transport, opts.sync_atomic = "transfer_engine", False
    try:
        with pytest.raises(WeightSyncError, match="trainer lost tensor 10.*sync_atomic is off.*mix"):
            engine.sync_weights(FailingSource(_ordered(alt), fail_at=10))
    finally:
        opts.sync_atomic = True
    report = engine.sync_weights(FailingSource(_ordered(alt)))
    assert report.transport == "transfer_engine", report.transport
    assert_close(fingerprint(engine), reference(engine, refs["alt"]))
    engine.sync_weights(base)
    assert fingerprint(engine) == engine.fresh
