"""The prompt pipeline on the real tiny tokenizer."""
from __future__ import annotations

import json

import pytest

from genbackends.errors import PromptError
from genbackends.prompts import build_prompt_dataset, load_prompts, read_prompt_file


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_llama))


def test_list_gives_prompt_and_ids(tok):
    ds = build_prompt_dataset(["the cat sat", "a dog"], tok, 32)
    assert [d["prompt"] for d in ds] == ["the cat sat", "a dog"]
    assert ds[0]["input_ids"] == tok.encode("the cat sat")
    assert set(ds[0]) == {"prompt", "input_ids"}


def test_text_and_jsonl_files(tok, tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\nsecond one\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "first prompt", "id": 1}) + "\n\n" + json.dumps({"prompt": "second one"}) + "\n")
    assert read_prompt_file(tmp_path / "p.txt") == ["first prompt", "second one"]
    assert load_prompts(str(tmp_path / "p.jsonl")) == ["first prompt", "second one"]
    assert build_prompt_dataset(tmp_path / "p.txt", tok, 32) == build_prompt_dataset(str(tmp_path / "p.jsonl"), tok, 32)


def test_jsonl_errors_name_line(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(PromptError, match=r"p\.jsonl line 2: expected an object with a string 'prompt'"):
        read_prompt_file(tmp_path / "p.jsonl")
    (tmp_path / "q.jsonl").write_text('{"prompt": "ok"}\n{oops\n')
    with pytest.raises(PromptError, match=r"q\.jsonl line 2: not valid JSON"):
        read_prompt_file(tmp_path / "q.jsonl")


def test_missing_file(tmp_path):
    with pytest.raises(PromptError, match="prompt file not found"):
        load_prompts(str(tmp_path / "nope.txt"))


@pytest.mark.parametrize("prompts, idx", [(["ok", ""], 1), (["", "ok"], 0), (["a", "b", "   "], 2)])
def test_empty_prompt_names_index(tok, prompts, idx):
    with pytest.raises(PromptError, match=f"prompt {idx} is empty"):
        build_prompt_dataset(prompts, tok, 32)


def test_empty_line_in_text_file_is_empty_prompt(tok, tmp_path):
    (tmp_path / "p.txt").write_text("one\n\nthree\n")
    with pytest.raises(PromptError, match="prompt 1 is empty"):
        build_prompt_dataset(tmp_path / "p.txt", tok, 32)


def test_max_prompt_length_must_be_positive(tok):
    with pytest.raises(PromptError, match="max_prompt_length must be > 0, got 0"):
        build_prompt_dataset(["x"], tok, 0)


def test_truncation_by_tokens(tok):
    text = "the quick brown fox jumps over the lazy dog " * 4
    full = tok.encode(text)
    assert len(full) > 8
    left = build_prompt_dataset([text], tok, 8)[0]
    right = build_prompt_dataset([text], tok, 8, truncation="right")[0]
    assert left["input_ids"] == full[-8:] and right["input_ids"] == full[:8]
    assert left["prompt"] == text  # the text is kept as given
    with pytest.raises(PromptError, match=f"prompt 0 has {len(full)} tokens; max_prompt_length is 8"):
        build_prompt_dataset([text], tok, 8, truncation="error")


def test_chat_template(tok):
    ds = build_prompt_dataset(["hello there"], tok, 64, apply_chat_template=True, system_prompt="be brief")
    expected_text = "system: be brief\nuser: hello there\nassistant: "
    assert ds[0]["input_ids"] == tok.encode(expected_text, add_special_tokens=False)
    assert ds[0]["prompt"] == "hello there"


def test_non_string_prompt_rejected(tok):
    with pytest.raises(PromptError, match="prompt 1 is a int"):
        build_prompt_dataset(["a", 3], tok, 8)
