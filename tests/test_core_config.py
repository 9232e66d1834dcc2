"""Config loading: includes, overrides, validation errors (the pure parts; the CLI tests run the
same paths through the `genbackends` command)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from genbackends.backend import NoOptions
from genbackends.config import GenConfig
from genbackends.config_loader import apply_overrides, config_to_yaml, deep_merge, load_config, load_yaml_tree
from genbackends.errors import ConfigError
from pydantic import BaseModel, ConfigDict


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


BASE = """
backend: hf
model: /m
seq_length: 64
sampling: {max_new_tokens: 16, temperature: 0.5, top_k: 5}
"""


def test_deep_merge_later_wins_and_lists_replace():
    a = {"x": {"y": 1, "z": [1, 2]}, "k": 1}
    b = {"x": {"z": [3]}, "k": 2}
    assert deep_merge(a, b) == {"x": {"y": 1, "z": [3]}, "k": 2}
    assert a == {"x": {"y": 1, "z": [1, 2]}, "k": 1}  # inputs untouched


def test_includes_relative_to_including_file_later_keys_win(tmp_path):
    _write(tmp_path / "common" / "base.yaml", BASE)
    _write(tmp_path / "common" / "eval.yaml", "sampling: {temperature: 0.9, eval_temperature: 0.0}\n")
    top = _write(
        tmp_path / "exp" / "run.yaml",
        """
        includes: [../common/base.yaml, ../common/eval.yaml]
        sampling: {top_k: 7}
        """,
    )
    cfg = load_config(top)
    # base < eval < top: temperature from eval.yaml, top_k from top, max_new_tokens from base
    assert (cfg.sampling.temperature, cfg.sampling.top_k, cfg.sampling.max_new_tokens) == (0.9, 7, 16)
    assert cfg.sampling.eval_temperature == 0.0
    # nested include: paths are relative to the file that names them
    _write(tmp_path / "common" / "nested.yaml", "includes: base.yaml\nseq_length: 99\n")
    top2 = _write(tmp_path / "exp" / "run2.yaml", "includes: ../common/nested.yaml\n")
    assert load_config(top2).seq_length == 99


def test_include_cycle_names_chain(tmp_path):
    _write(tmp_path / "a.yaml", "includes: b.yaml\nbackend: hf\n")
    _write(tmp_path / "b.yaml", "includes: c.yaml\n")
    _write(tmp_path / "c.yaml", "includes: a.yaml\n")
    with pytest.raises(ConfigError, match=r"include cycle: .*a\.yaml -> .*b\.yaml -> .*c\.yaml -> .*a\.yaml"):
        load_yaml_tree(tmp_path / "a.yaml")


def test_missing_include_names_it(tmp_path):
    top = _write(tmp_path / "a.yaml", "includes: nope.yaml\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: included file 'nope\.yaml' not found"):
        load_yaml_tree(top)


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "backend: hf\nsampling:\n  top_p: [1, 2\n  n: 1\n")
    with pytest.raises(ConfigError) as ei:
        load_config(bad)
    msg = str(ei.value)
    assert "malformed YAML in" in msg and "bad.yaml line" in msg and "\n" not in msg


def test_safe_load_only(tmp_path):
    evil = _write(tmp_path / "e.yaml", "backend: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(evil)


def test_overrides_parse_yaml_scalars(tmp_path):
    top = _write(tmp_path / "a.yaml", BASE)
    cfg = load_config(
        top,
        [
            "sampling.temperature=0.7",
            "sampling.ignore_eos=true",
            "sampling.seed=null",
            "sampling.stop_token_list=a;b",
            "options.hf.attn_implementation=eager",
            "cache.block_size=16",
        ],
    )
    assert cfg.sampling.temperature == 0.7 and cfg.sampling.ignore_eos is True and cfg.sampling.seed is None
    assert cfg.sampling.stop_strings == ["a", "b"]
    assert cfg.options == {"hf": {"attn_implementation": "eager"}}
    assert cfg.cache.block_size == 16


@pytest.mark.parametrize("bad", ["sampling.temperature", "=3", "a..b=1"])
def test_bad_override_syntax(bad):
    with pytest.raises(ConfigError, match="--set"):
        apply_overrides({}, [bad])


def test_override_into_scalar_is_error():
    with pytest.raises(ConfigError, match="sampling is 3, not a section"):
        apply_overrides({"sampling": 3}, ["sampling.n=2"])


@pytest.mark.parametrize(
    "override, field, value",
    [
        ("sampling.top_p=1.5", "sampling.top_p", "1.5"),
        ("cache.gpu_memory_utilization=0", "cache.gpu_memory_utilization", "0"),
        ("sampling.top_k=0", "sampling.top_k", "0"),
        ("sampling.n=0", "sampling.n", "0"),
        ("parallel.executor=magic", "parallel.executor", "'magic'"),
        ("sampling.temprature=1", "sampling.temprature", "1"),
    ],
)
def test_validation_errors_name_field_and_value(tmp_path, override, field, value):
    top = _write(tmp_path / "a.yaml", BASE)
    with pytest.raises(ConfigError) as ei:
        load_config(top, [override])
    msg = str(ei.value)
    assert f"{field}:" in msg and f"(got {value})" in msg and "a.yaml" in msg and "\n" not in msg


def test_max_prompt_length_must_be_positive(tmp_path):
    top = _write(tmp_path / "a.yaml", BASE)
    with pytest.raises(ConfigError, match=r"max_prompt_length = seq_length - sampling.max_new_tokens = 16 - 16 = 0"):
        load_config(top, ["seq_length=16"])


def test_config_yaml_roundtrip(tmp_path):
    top = _write(tmp_path / "a.yaml", BASE)
    cfg = load_config(top, ["options.vllm.enforce_eager=true"])
    again = GenConfig.model_validate(yaml.safe_load(config_to_yaml(cfg)))
    assert again == cfg


class _HFOpts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attn_implementation: str | None = None


class _VOpts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enforce_eager: bool = False


def test_switching_backend_word_keeps_working(tmp_path):
    """One file with an options block per backend: each backend validates only its own block."""
    top = _write(
        tmp_path / "a.yaml",
        BASE + "options:\n  vllm: {enforce_eager: true}\n  hf: {attn_implementation: eager}\n",
    )
    hf = load_config(top)
    vl = load_config(top, ["backend=vllm"])
    assert hf.backend_options(_HFOpts).attn_implementation == "eager"
    assert vl.backend_options(_VOpts).enforce_eager is True
    # a backend without a block gets defaults
    assert load_config(top, ["backend=echo"]).backend_options(NoOptions) == NoOptions()
    # a bad option names options.<backend>.<field>
    bad = load_config(top, ["options.hf.bogus=1"])
    with pytest.raises(ConfigError, match=r"options\.hf\.bogus: Extra inputs are not permitted \(got 1\)"):
        bad.backend_options(_HFOpts)


def test_flat_options_rejected_with_hint(tmp_path):
    top = _write(tmp_path / "a.yaml", BASE + "options: {enforce_eager: true}\n")
    with pytest.raises(ConfigError, match="options must be keyed by backend name"):
        load_config(top)


def test_top_level_must_be_mapping(tmp_path):
    top = _write(tmp_path / "a.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level of a config must be a mapping"):
        load_config(top)


def test_greedy_with_n_above_1_rejected(tmp_path):
    top = _write(tmp_path / "a.yaml", BASE)
    with pytest.raises(ConfigError, match=r"sampling.n: n=2 needs sampling.temperature > 0"):
        load_config(top, ["sampling.temperature=0", "sampling.n=2"])
    assert load_config(top, ["sampling.temperature=0", "sampling.n=2", "sampling.use_beam_search=true"]).sampling.n == 2
