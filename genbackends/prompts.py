"""The prompt pipeline shared by every backend (the seed's ``VLLMPromptPipeline`` contract).

Prompts come from a Python list, a text file (one prompt per line) or a JSONL file (one object
per line with a ``"prompt"`` field). Each becomes ``{"prompt": str, "input_ids": list[int]}``:
``prompt`` is the text as given, ``input_ids`` what the engine sees (after the chat template, if
on, and truncation).

Truncation is by **tokens**, not characters (the seed cuts characters, which can leave a prompt
far over or under the budget). By default (``prompts.truncation: left``) the **last**
``max_prompt_length`` tokens are kept: generation continues from the end of the prompt, and the end
is where the question and the chat template's assistant cue sit; cutting it off would make the
model continue a sentence in the middle of the context. ``right`` keeps the first tokens (the
seed's behaviour, by tokens), ``error`` rejects long prompts.

Any tokenizer with ``encode(text, add_special_tokens=...) -> list[int]`` works (HF tokenizers,
vLLM's ``llm.get_tokenizer()``); the chat template needs ``apply_chat_template``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

from genbackends.errors import PromptError


class TokenizerLike(Protocol):
    """What the pipeline needs from a tokenizer."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:  # pragma: no cover
        ...


def read_prompt_file(path: str | os.PathLike[str]) -> list[str]:
    """Read prompts from a text file (one per line) or a ``.jsonl`` file (``"prompt"`` field).

    Text files: every line is a prompt; one trailing empty line is ignored, any other empty line
    is an empty prompt (rejected later with its index). JSONL files: blank lines are skipped; a
    line that is not an object with a string ``prompt`` is an error naming the file and line.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptError(f"prompt file not found: {str(p)!r}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"cannot read prompt file {str(p)!r}: {e}") from None
    if p.suffix.lower() == ".jsonl":
        prompts = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptError(f"{p} line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise PromptError(f"{p} line {lineno}: expected an object with a string 'prompt' field")
            prompts.append(obj["prompt"])
        return prompts
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def load_prompts(source: Any) -> list[str]:
    """Normalise a prompt source into a list of strings.

    ``source``: a path (``os.PathLike``, or a ``str`` without spaces ending in ``.txt``/``.jsonl``),
    a single prompt string, or a sequence of strings / ``{"prompt": str}`` mappings.
    """
    if isinstance(source, os.PathLike):
        return read_prompt_file(source)
    if isinstance(source, str):
        # A single word ending in .txt/.jsonl is a file name (a missing file is an error, not a
        # prompt that happens to look like a path).
        if source.lower().endswith((".txt", ".jsonl")) and not any(c.isspace() for c in source):
            return read_prompt_file(source)
        return [source]
    if isinstance(source, Iterable):
        out = []
        for i, item in enumerate(source):
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
                out.append(item["prompt"])
            else:
                raise PromptError(f"prompt {i} is a {type(item).__name__}; expected a string or {{'prompt': str}}")
        return out
    raise PromptError(f"prompts must be a list of strings or a prompt file path, got {type(source).__name__}")


def check_prompts(prompts: Sequence[str]) -> None:
    """Reject an empty prompt list and empty (or whitespace-only) prompts, naming the index."""
    if not prompts:
        raise PromptError("no prompts given")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise PromptError(f"prompt {i} is empty")


def encode_prompt(
    tokenizer: Any,
    prompt: str,
    *,
    apply_chat_template: bool = False,
    system_prompt: str | None = None,
) -> list[int]:
    """Token ids of one prompt, with the tokenizer's chat template when asked.

    Without the template the tokenizer adds its usual special tokens (as vLLM does for text
    prompts); the template's output already holds them, so it is encoded without.
    """
    if apply_chat_template:
        if getattr(tokenizer, "apply_chat_template", None) is None or not getattr(tokenizer, "chat_template", True):
            raise PromptError("prompts.apply_chat_template is on but the tokenizer has no chat template")
        messages = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False))
    try:
        return list(tokenizer.encode(prompt, add_special_tokens=True))
    except TypeError:  # tokenizers without the keyword
        return list(tokenizer.encode(prompt))


def truncate_ids(ids: list[int], max_len: int, mode: str, index: int) -> list[int]:
    """Cut ``ids`` to ``max_len`` tokens: ``left`` keeps the last, ``right`` the first tokens."""
    if len(ids) <= max_len:
        return ids
    if mode == "error":
        raise PromptError(f"prompt {index} has {len(ids)} tokens; max_prompt_length is {max_len}")
    return ids[-max_len:] if mode == "left" else ids[:max_len]


def build_prompt_dataset(
    prompts: Any,
    tokenizer: Any,
    max_prompt_length: int,
    *,
    apply_chat_template: bool = False,
    system_prompt: str | None = None,
    truncation: str = "left",
) -> list[dict[str, Any]]:
    """Prompts -> ``[{"prompt": str, "input_ids": list[int]}, ...]`` (see the module docstring).

    Everything is checked before anything is returned: an empty prompt raises
    :class:`PromptError` naming its index; ``max_prompt_length`` must be > 0.
    """
    if max_prompt_length <= 0:
        raise PromptError(f"max_prompt_length must be > 0, got {max_prompt_length} (seq_length - max_new_tokens)")
    texts = load_prompts(prompts)
    check_prompts(texts)
    dataset = []
    for i, text in enumerate(texts):
        ids = encode_prompt(tokenizer, text, apply_chat_template=apply_chat_template, system_prompt=system_prompt)
        if not ids:
            raise PromptError(f"prompt {i} encodes to no tokens")
        dataset.append({"prompt": text, "input_ids": truncate_ids(ids, max_prompt_length, truncation, i)})
    return dataset


def dataset_from_config(prompts: Any, tokenizer: Any, config: Any) -> list[dict[str, Any]]:
    """:func:`build_prompt_dataset` with the knobs of a :class:`~genbackends.config.GenConfig`:
    what a backend's ``build_dataset`` calls."""
    pc = config.prompts
    return build_prompt_dataset(
        prompts,
        tokenizer,
        config.max_prompt_length,
        apply_chat_template=pc.apply_chat_template,
        system_prompt=pc.system_prompt,
        truncation=pc.truncation,
    )
