"""The conformance checks. Collected with ``--pyargs genbackends.testing.suite`` (or ``from
genbackends.testing.suite import *`` in a test file of yours) and the plugin loaded with
``-p genbackends.testing``. The tests run in this order on one backend; ``test_shutdown`` is last.

Every assertion message says what the backend must do differently (``docs/writing-a-backend.md``
explains each rule).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import pytest

from genbackends.errors import BackendStateError, WeightSyncError
from genbackends.records import GenerationRecord
from genbackends.testing.reference import checkpoint_tensors, perturbed
from genbackends.testing.sampling import generate

PROMPTS = ["the cat sat on the mat", "a b c", "hello world, this is a longer prompt about the sea"]
MAX_NEW = 8


def check(name: str) -> Any:
    return pytest.mark.genbackends_check(name)


def _where(r: GenerationRecord) -> str:
    return f"prompt {r.prompt_index} completion {r.index}"


def _tokens(records: Sequence[GenerationRecord]) -> list[list[int]]:
    return [list(r.token_ids) for r in records]


def _same_outputs(before: Sequence[GenerationRecord], after: Sequence[GenerationRecord], tol: float, what: str) -> None:
    assert len(after) == len(before), f"{what}: {len(after)} records instead of {len(before)}"
    for b, a in zip(before, after):
        assert list(a.token_ids) == list(b.token_ids), (
            f"{what}: greedy tokens of {_where(a)} changed from {list(b.token_ids)} to {list(a.token_ids)}"
        )
        diff = max((abs(x - y) for x, y in zip(a.logprobs, b.logprobs)), default=0.0)
        assert diff <= tol, f"{what}: logprobs of {_where(a)} moved by {diff:.3g} (> {tol:g})"


@pytest.fixture(scope="session")
def greedy_baseline(genbackends_backend: Any) -> list[GenerationRecord]:
    """Greedy records of PROMPTS on the weights the backend was set up with."""
    return generate(genbackends_backend, PROMPTS, temperature=0.0)


# ---- the class itself -----------------------------------------------------------------------
@check("contract")
def test_options_and_capabilities(genbackends_registry: Any, genbackends_config: Any, genbackends_backend: Any) -> None:
    from genbackends.capabilities import SYNC_PATHS, BackendCapabilities
    from genbackends.config import GenConfig
    from genbackends.errors import ConfigError

    name = genbackends_config.backend
    data = genbackends_config.model_dump()
    data["options"] = {**data.get("options", {}), name: {**data.get("options", {}).get(name, {}), "genbackends_kit_bogus": 1}}
    try:
        genbackends_registry.create_backend(GenConfig.model_validate(data))
    except ConfigError as e:
        assert "genbackends_kit_bogus" in str(e), f"the error for an unknown option must name it (options.{name}.genbackends_kit_bogus), got: {e}"
    else:
        raise AssertionError(
            f"options.{name}.genbackends_kit_bogus was accepted; the options model must forbid unknown keys "
            "(derive it from genbackends.backend.BackendOptions)"
        )
    caps = genbackends_backend.capabilities()
    assert isinstance(caps, BackendCapabilities), f"capabilities() must return a BackendCapabilities, got {type(caps).__name__}"
    assert caps.sync_paths and set(caps.sync_paths) <= set(SYNC_PATHS), (
        f"capabilities().sync_paths {sorted(caps.sync_paths)} must be a non-empty subset of {SYNC_PATHS}"
    )
    assert all(level in (1, 2) for level in caps.sleep_levels), f"capabilities().sleep_levels {caps.sleep_levels} may hold only 1 and 2"


# ---- records --------------------------------------------------------------------------------
@check("records")
def test_record_fields(genbackends_backend: Any, greedy_baseline: list[GenerationRecord]) -> None:
    recs = greedy_baseline
    assert len(recs) == len(PROMPTS), f"generate() of {len(PROMPTS)} prompts with n=1 gave {len(recs)} records; expected one per prompt"
    for r in recs:
        assert isinstance(r, GenerationRecord), f"decode_internal must return genbackends.GenerationRecord objects, got {type(r).__name__}"
        w = _where(r)
        assert isinstance(r.request_id, str) and r.request_id, f"{w}: request_id must be a non-empty str, got {r.request_id!r}"
        assert 0 <= r.prompt_index < len(PROMPTS), f"{w}: prompt_index {r.prompt_index} out of range"
        assert r.prompt == PROMPTS[r.prompt_index], f"{w}: prompt must be the prompt text as given, got {r.prompt!r}"
        assert all(isinstance(t, int) for t in r.prompt_token_ids) and r.prompt_token_ids, f"{w}: prompt_token_ids must be a non-empty list of int"
        assert all(isinstance(t, int) for t in r.token_ids), f"{w}: token_ids must be a list of int"
        assert 1 <= len(r.token_ids) <= MAX_NEW, (
            f"{w}: {len(r.token_ids)} tokens with max_new_tokens={MAX_NEW}; completions must have 1..max_new_tokens tokens"
        )
        assert isinstance(r.text, str), f"{w}: text must be a str"
        assert len(r.logprobs) == len(r.token_ids), (
            f"{w}: {len(r.logprobs)} logprobs for {len(r.token_ids)} tokens; return the logprob of every sampled token"
        )
        assert all(isinstance(x, float) and math.isfinite(x) and x <= 1e-6 for x in r.logprobs), (
            f"{w}: logprobs must be finite floats <= 0, got {r.logprobs}"
        )
        assert math.isclose(r.cumulative_logprob, sum(r.logprobs), rel_tol=1e-4, abs_tol=1e-4), (
            f"{w}: cumulative_logprob {r.cumulative_logprob} != sum(logprobs) {sum(r.logprobs)}"
        )
        assert r.finish_reason in ("stop", "length"), f"{w}: finish_reason must be 'stop' or 'length', got {r.finish_reason!r}"
        if r.finish_reason == "length":
            assert len(r.token_ids) == MAX_NEW, f"{w}: finish_reason 'length' after {len(r.token_ids)} of {MAX_NEW} tokens"
        assert r.prompt_logprobs is None, f"{w}: prompt_logprobs must be None unless sampling.prompt_logprobs is set"


@check("ordering")
def test_ordering_n_and_indices(genbackends_backend: Any) -> None:
    n = 3
    cfg = genbackends_backend.config
    old = cfg.prompts.batch_size
    cfg.prompts.batch_size = 2  # two forward_step batches: prompt_index must be batch-relative
    try:
        recs = generate(genbackends_backend, PROMPTS, temperature=1.0, n=n, seed=0)
    finally:
        cfg.prompts.batch_size = old
    assert len(recs) == len(PROMPTS) * n, f"n={n}: {len(recs)} records for {len(PROMPTS)} prompts; expected one per (prompt, completion)"
    got = [(r.prompt_index, r.index) for r in recs]
    want = [(p, k) for p in range(len(PROMPTS)) for k in range(n)]
    assert sorted(got) == want, (
        f"n={n}: (prompt_index, index) pairs {got}; expected each prompt once per index 0..{n - 1} "
        "(with prompts.batch_size, decode_internal's prompt_index is relative to its batch; the base class offsets it)"
    )
    assert got == want, f"records are not in prompt order then completion index: got {got}; decode_internal must return prompt order, then index"
    for p in range(len(PROMPTS)):
        ids = {r.request_id for r in recs if r.prompt_index == p}
        assert len(ids) == 1, f"prompt {p}: its {n} completions carry request_ids {sorted(ids)}; use one request_id per prompt"
        assert recs[p * n].prompt == PROMPTS[p], f"prompt {p}: record prompt {recs[p * n].prompt!r} is not {PROMPTS[p]!r}"
    assert len({r.request_id for r in recs}) == len(PROMPTS), "request_id must differ between prompts"


@check("tokens")
def test_prompt_tokens_and_text(genbackends_backend: Any, genbackends_reference: Any, greedy_baseline: list[GenerationRecord]) -> None:
    from genbackends.prompts import dataset_from_config

    data = dataset_from_config(PROMPTS, genbackends_reference.tokenizer, genbackends_backend.config)
    for r in greedy_baseline:
        assert list(r.prompt_token_ids) == data[r.prompt_index]["input_ids"], (
            f"{_where(r)}: prompt_token_ids {list(r.prompt_token_ids)} differ from genbackends.prompts.dataset_from_config "
            f"with the model's tokenizer {data[r.prompt_index]['input_ids']}; build_dataset must use dataset_from_config"
        )
        want = genbackends_reference.text(r.token_ids)
        assert r.text == want, (
            f"{_where(r)}: text {r.text!r} != tokenizer.decode(token_ids, skip_special_tokens=True) {want!r}"
        )


# ---- numerics against the float64 reference -------------------------------------------------
def _check_against_reference(records: Sequence[GenerationRecord], ref: Any, tol: float, *, greedy: bool, what: str) -> None:
    for r in records:
        rows = ref.completion_rows(r.prompt_token_ids, r.token_ids)
        for j, (tok, lp) in enumerate(zip(r.token_ids, r.logprobs)):
            row = rows[j]
            want = float(row[tok])
            if greedy:
                best = int(row.argmax())
                gap = float(row[best]) - want
                assert tok == best or gap <= tol, (
                    f"{what}: {_where(r)} step {j}: temperature 0 chose token {tok} but the float64 reference's argmax is "
                    f"{best} (logprob gap {gap:.3g} > tol {tol:g}); greedy must take the argmax of the model's logits"
                )
            diff = abs(lp - want)
            if diff > tol:
                hint = "logprobs must be the raw log_softmax of the model's logits (before temperature/top-k/top-p)"
                raise AssertionError(
                    f"{what}: {_where(r)} step {j} token {tok}: logprob {lp:.6f}, float64 reference {want:.6f} "
                    f"(diff {diff:.3g} > tol {tol:g}); {hint}"
                )


@check("greedy")
def test_greedy_matches_float64_reference(genbackends_backend: Any, genbackends_reference: Any,
                                          genbackends_kit: Any, greedy_baseline: list[GenerationRecord]) -> None:
    ref = genbackends_reference
    _check_against_reference(greedy_baseline, ref, genbackends_kit.logprob_tol, greedy=True, what="greedy")
    for r in greedy_baseline:
        eos_at = [j for j, t in enumerate(r.token_ids) if t in ref.eos_ids]
        if r.finish_reason == "stop":
            assert eos_at and eos_at[0] == len(r.token_ids) - 1, (
                f"{_where(r)}: finish_reason 'stop' without a stop string must end on the EOS token (kept in token_ids); got {list(r.token_ids)}"
            )
        else:
            assert not eos_at, f"{_where(r)}: generated past EOS at step {eos_at[0]}; EOS must end the completion with finish_reason 'stop'"


@check("logprobs")
def test_sampled_logprobs_are_raw_log_softmax(genbackends_backend: Any, genbackends_reference: Any, genbackends_kit: Any) -> None:
    tol = genbackends_kit.logprob_tol
    recs = generate(genbackends_backend, PROMPTS, temperature=0.8, n=2, seed=0, prompt_logprobs=0)
    _check_against_reference(recs, genbackends_reference, tol, greedy=False, what="temperature 0.8")
    for r in recs:
        plp = r.prompt_logprobs
        ids = list(r.prompt_token_ids)
        assert plp is not None and len(plp) == len(ids), (
            f"{_where(r)}: with sampling.prompt_logprobs=0, prompt_logprobs must have one entry per prompt token "
            f"({len(ids)}), got {None if plp is None else len(plp)}"
        )
        assert plp[0] is None, f"{_where(r)}: prompt_logprobs[0] must be None (nothing predicts the first token)"
        full = genbackends_reference.log_softmax(ids)
        for i in range(1, len(ids)):
            want = float(full[i - 1, ids[i]])
            assert plp[i] is not None and abs(plp[i] - want) <= tol, (
                f"{_where(r)}: prompt_logprobs[{i}] = {plp[i]}, float64 reference {want:.6f}; it must be the raw log_softmax "
                "at the previous position"
            )


@check("sampling")
def test_sampling_n_seed_and_eval(genbackends_backend: Any, greedy_baseline: list[GenerationRecord]) -> None:
    b = genbackends_backend
    a1 = generate(b, PROMPTS, temperature=1.0, n=3, seed=0)
    for p in range(len(PROMPTS)):
        comps = [tuple(r.token_ids) for r in a1 if r.prompt_index == p]
        assert len(set(comps)) > 1, (
            f"prompt {p}: the 3 completions at temperature 1.0 are identical; sample each of the n completions independently"
        )
    a2 = generate(b, PROMPTS, temperature=1.0, n=3, seed=0)
    assert _tokens(a1) == _tokens(a2), "sampling.seed=0 gave different tokens on two identical calls; seed the sampler per call"
    ev = generate(b, PROMPTS, eval_mode=True, temperature=1.0, eval_temperature=0.0)
    assert _tokens(ev) == _tokens(greedy_baseline), (
        "eval_mode=True with eval_temperature=0 did not give the greedy tokens; read sampling through "
        "config.sampling.resolved(eval_mode) in forward_step"
    )
    tr = generate(b, PROMPTS, eval_mode=False, temperature=1.0, eval_temperature=0.0, seed=0)
    assert _tokens(tr) != _tokens(greedy_baseline), (
        "eval_mode=False with temperature=1.0 gave exactly the greedy tokens; training mode must use sampling.temperature, "
        "not the eval_* values"
    )


@check("stop")
def test_stop_strings(genbackends_backend: Any, genbackends_reference: Any, greedy_baseline: list[GenerationRecord]) -> None:
    ref = genbackends_reference
    stops = []
    for r in greedy_baseline:
        # a 2-character window of the text, as near its middle as possible, past its first character
        t = r.text
        starts = sorted(range(1, len(t) - 1), key=lambda i: abs(i - len(t) // 2))
        for i in starts:
            cand = t[i : i + 2]
            if cand.strip() and "\ufffd" not in cand and ";" not in cand:
                stops.append(cand)
                break
    if not stops:
        pytest.skip("no usable stop string in the greedy completions of this model (texts too short)")
    recs = generate(genbackends_backend, PROMPTS, temperature=0.0, stop_token_list=";".join(stops))
    stopped = 0
    for base, r in zip(greedy_baseline, recs):
        # expected: the shortest greedy prefix whose text holds a stop string, cut before it
        exp = None
        for k in range(1, len(base.token_ids) + 1):
            text = ref.tokenizer.decode(list(base.token_ids[:k]), skip_special_tokens=True)
            found = [(text.find(s), s) for s in stops if s in text]
            if found:
                pos, s = min(found)
                exp = (list(base.token_ids[:k]), text[:pos], s)
                break
        if exp is None:  # no stop string in this completion: it must be unchanged
            assert list(r.token_ids) == list(base.token_ids), f"{_where(r)}: stop strings {stops} changed a completion that holds none of them"
            continue
        stopped += 1
        toks, text, s = exp
        assert list(r.token_ids) == toks, (
            f"{_where(r)}: stop string {s!r}: token_ids {list(r.token_ids)}, expected {toks} (end at the token that completes "
            "the stop string, and keep that token)"
        )
        assert r.finish_reason == "stop", f"{_where(r)}: stop string {s!r} reached but finish_reason is {r.finish_reason!r}; use 'stop'"
        assert r.text == text, f"{_where(r)}: stop string {s!r}: text {r.text!r}, expected {text!r} (cut just before the stop string)"
    assert stopped, (
        f"stop strings {stops} were taken from the records' text, yet the model tokenizer's decode of the greedy tokens holds "
        "none of them: record text must be tokenizer.decode(token_ids) (see the 'tokens' check)"
    )


# ---- weights ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def kit_weights(genbackends_config: Any) -> dict[str, Any]:
    orig = checkpoint_tensors(genbackends_config.model)
    return {"orig": orig, "new": perturbed(orig)}


def _rejected(backend: Any, source: Any, what: str) -> None:
    try:
        backend.sync_weights(source)
    except WeightSyncError:
        return
    except Exception as e:  # noqa: BLE001 - the wrong type is the finding
        raise AssertionError(f"{what}: sync_weights raised {type(e).__name__}: {e}; it must raise genbackends.WeightSyncError") from None
    raise AssertionError(f"{what}: sync_weights accepted it; validate the whole sync (validate_manifest) before writing and raise WeightSyncError")


@check("sync_reject")
def test_rejected_sync_unknown_name_changes_nothing(genbackends_backend: Any, kit_weights: dict, genbackends_kit: Any,
                                                   greedy_baseline: list[GenerationRecord]) -> None:
    import torch

    src = dict(kit_weights["new"])  # valid new weights first: a backend that writes as it goes would apply them
    src["genbackends_conformance.no_such_weight"] = torch.zeros(3)
    _rejected(genbackends_backend, src, "a sync with an unknown weight name")
    _same_outputs(greedy_baseline, generate(genbackends_backend, PROMPTS, temperature=0.0), genbackends_kit.repeat_tol,
                  "after a rejected sync (unknown name) outputs must be unchanged: nothing may be written before validation passes")


@check("sync_reject")
def test_rejected_sync_wrong_shape_changes_nothing(genbackends_backend: Any, kit_weights: dict, genbackends_kit: Any,
                                                  greedy_baseline: list[GenerationRecord]) -> None:
    import torch

    src = dict(kit_weights["new"])
    victim = sorted(n for n, t in src.items() if t.dim() == 2)[-1]
    t = src[victim]
    src[victim] = torch.zeros((t.shape[0] + 1, *t.shape[1:]), dtype=t.dtype)
    _rejected(genbackends_backend, src, f"a sync with a wrong shape for {victim!r}")
    _same_outputs(greedy_baseline, generate(genbackends_backend, PROMPTS, temperature=0.0), genbackends_kit.repeat_tol,
                  "after a rejected sync (wrong shape) outputs must be unchanged: nothing may be written before validation passes")


@check("sync_apply")
def test_sync_applies_and_restores(genbackends_backend: Any, kit_weights: dict, genbackends_reference: Any,
                                   genbackends_kit: Any, greedy_baseline: list[GenerationRecord]) -> None:
    from genbackends.weights import SyncReport

    b, ref = genbackends_backend, genbackends_reference
    report = b.sync_weights(kit_weights["new"])
    assert isinstance(report, SyncReport), f"sync_weights must return a genbackends.weights.SyncReport, got {type(report).__name__}"
    try:
        ref.load(kit_weights["new"])
        after = generate(b, PROMPTS, temperature=0.0)
        assert _tokens(after) != _tokens(greedy_baseline), "a valid sync of new weights left every greedy output unchanged; write the tensors into the live model"
        _check_against_reference(after, ref, genbackends_kit.logprob_tol, greedy=True, what="after a valid sync")
    finally:
        ref.load(kit_weights["orig"])
        b.sync_weights(kit_weights["orig"])
    _same_outputs(greedy_baseline, generate(b, PROMPTS, temperature=0.0), genbackends_kit.logprob_tol,
                  "syncing the original weights back must restore the original outputs")


# ---- memory, hooks, shutdown -----------------------------------------------------------------
@check("sleep")
def test_sleep_wake_keeps_outputs(genbackends_backend: Any, kit_weights: dict, genbackends_kit: Any,
                                  greedy_baseline: list[GenerationRecord]) -> None:
    b = genbackends_backend
    levels = sorted({1, *b.capabilities().sleep_levels})
    for level in levels:
        b.sleep(level)
        if level >= 2:  # level 2 may discard the weights: wake them, sync, then the cache
            b.wake_up(["weights"])
            b.sync_weights(kit_weights["orig"])
            b.wake_up(["kv_cache"])
        else:
            b.wake_up()
        _same_outputs(greedy_baseline, generate(b, PROMPTS, temperature=0.0), genbackends_kit.logprob_tol,
                      f"after sleep({level}) and wake_up() outputs must equal those before")


@check("hooks")
def test_event_hooks_fire(genbackends_backend: Any, genbackends_recorder: Any, kit_weights: dict, genbackends_kit: Any) -> None:
    b, rec = genbackends_backend, genbackends_recorder
    ready = rec.of("genbackends_on_backend_ready")
    assert len(ready) == 1 and ready[0]["backend"] is b, (
        f"genbackends_on_backend_ready fired {len(ready)} time(s) for setup(); it must fire once, after setup() finished"
    )
    assert isinstance(ready[0]["startup_seconds"], float) and ready[0]["startup_seconds"] >= 0
    checks = [("genbackends_on_after_generate", lambda: generate(b, PROMPTS[:1], temperature=0.0), "generate()")]
    if "sync_apply" in genbackends_kit.skip:
        # the backend does not take the model's weights: only a rejected sync can be made, and it reports nothing
        rec.events.clear()
        with pytest.raises(WeightSyncError):
            b.sync_weights({"genbackends_conformance.no_such_weight": kit_weights["orig"][next(iter(kit_weights["orig"]))]})
        assert not rec.of("genbackends_on_after_sync"), "genbackends_on_after_sync fired for a rejected sync; fire it only for a sync that happened"
    else:
        checks.append(("genbackends_on_after_sync", lambda: b.sync_weights(kit_weights["orig"]), "sync_weights()"))
    for hook, call, what in checks:
        rec.events.clear()
        result = call()
        got = rec.of(hook)
        assert len(got) == 1, f"{hook} fired {len(got)} time(s) for one {what}; it must fire exactly once"
        assert got[0]["backend"] is b, f"{hook}: 'backend' must be the backend itself"
        if hook == "genbackends_on_after_generate":
            stats = got[0]["stats"]
            missing = {"seconds", "num_prompts", "prompt_tokens", "output_tokens", "output_tokens_per_s"} - set(stats)
            assert not missing, f"{hook}: stats lack {sorted(missing)}"
            assert len(got[0]["records"]) == len(result)
        else:
            assert got[0]["report"] is result, f"{hook}: 'report' must be the SyncReport sync_weights returned"
    rec.events.clear()
    b.sleep(1)
    b.wake_up()
    phases = [kw["phase"] for kw in rec.of("genbackends_on_memory_phase")]
    assert phases == ["sleep", "wake_up"], (
        f"genbackends_on_memory_phase fired with phases {phases} for sleep(1) + wake_up(); expected ['sleep', 'wake_up']"
    )


@check("shutdown")
def test_shutdown(genbackends_backend: Any, kit_weights: dict) -> None:
    b = genbackends_backend
    b.shutdown()
    calls = [
        ("generate", lambda: b.generate(PROMPTS[:1])),
        ("sync_weights", lambda: b.sync_weights(kit_weights["orig"])),
        ("sleep", lambda: b.sleep(1)),
        ("wake_up", lambda: b.wake_up()),
    ]
    for name, call in calls:
        try:
            call()
        except BackendStateError:
            continue
        except Exception as e:  # noqa: BLE001 - the wrong type is the finding
            raise AssertionError(
                f"{name}() after shutdown() raised {type(e).__name__}: {e}; it must raise genbackends.errors.BackendStateError "
                "(start it with self._require_ready())"
            ) from None
        raise AssertionError(f"{name}() after shutdown() did not raise; it must raise BackendStateError (start it with self._require_ready())")
    b.shutdown()  # a second shutdown is harmless
