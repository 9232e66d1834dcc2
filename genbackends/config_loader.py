"""Loading configs: YAML files with ``includes:``, ``--set`` overrides, validation into
:class:`~genbackends.config.GenConfig`.

The steps, each with its own function so callers (CLI, demo, benchmarks, tests) can reuse them:

1. :func:`load_yaml_tree` reads a YAML file with ``yaml.safe_load`` and resolves its ``includes:``
   (a path or a list of paths, relative to the including file). Included files are merged first, in
   order, then the including file's own keys on top: later keys win, mappings merge deeply, lists
   and scalars are replaced. An include cycle is an error naming the whole chain.
2. :func:`apply_overrides` applies ``KEY.PATH=VALUE`` strings; the value is parsed as YAML
   (``0.7`` is a float, ``true`` a bool, ``null`` None, ``"a;b"`` a string). A mapping value
   (``--set 'sampling={temperature: 0.5}'``) merges into the section like an include does
   instead of replacing it: keys it does not name keep their values (``KEY={}`` empties a section).
3. :func:`validate_config` builds the :class:`GenConfig`; errors name the field path and the bad
   value in one line.

Paths inside a config (``model``, ``tokenizer``, ``prompts.file``) are used as written, i.e.
relative to the working directory of the process, like paths given on a command line.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from pydantic import ValidationError

from genbackends.config import GenConfig, format_validation_error
from genbackends.errors import ConfigError

INCLUDES_KEY = "includes"


def _read_yaml(path: Path) -> dict[str, Any]:
    """``yaml.safe_load`` one file; a syntax error names the file, line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {str(path)!r}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        # A binary file or another encoding: say which file and where, not a raw codec error.
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"malformed YAML in {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a config must be a mapping, got {type(data).__name__}")
    return data


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``top`` over ``base``: nested mappings merge key by key, anything else in ``top``
    replaces what ``base`` had. Neither input is modified."""
    out = copy.deepcopy(dict(base))
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml_tree(path: str | os.PathLike[str], _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read ``path`` and everything it includes into one merged mapping (``includes`` removed)."""
    p = Path(path)
    resolved = p.resolve()
    if resolved in _chain:
        names = " -> ".join(str(c) for c in (*_chain, resolved))
        raise ConfigError(f"include cycle: {names}")
    data = _read_yaml(p)
    includes = data.pop(INCLUDES_KEY, None)
    if includes is None:
        return data
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) and i for i in includes):
        raise ConfigError(f"{p}: 'includes' must be a path or a list of paths, got {includes!r}")
    merged: dict[str, Any] = {}
    for inc in includes:
        inc_path = Path(inc) if os.path.isabs(inc) else p.parent / inc
        if not inc_path.exists():
            raise ConfigError(f"{p}: included file {inc!r} not found (looked at {str(inc_path)!r})")
        merged = deep_merge(merged, load_yaml_tree(inc_path, (*_chain, resolved)))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``"a.b.c=VALUE"`` into ``(["a", "b", "c"], parsed VALUE)``."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. sampling.temperature=0.7), got {text!r}")
    parts = key.split(".")
    if any(not part for part in parts):
        raise ConfigError(f"--set key {key!r} has an empty part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not valid YAML on its own (e.g. "a: b: c"): take it as a plain string
    return parts, value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``KEY.PATH=VALUE`` override applied in order."""
    out = copy.deepcopy(dict(data))
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"--set {text!r}: {where} is {nxt!r}, not a section")
            node = nxt
        old = node.get(parts[-1])
        if isinstance(value, Mapping) and value and isinstance(old, Mapping):
            # `--set 'sampling={temperature: 0.5}'` must not drop the section's other keys;
            # an empty mapping (`--set options.vllm={}`) still clears a section.
            node[parts[-1]] = deep_merge(old, value)
        else:
            node[parts[-1]] = value
    return out


def validate_config(data: Mapping[str, Any], source: str | os.PathLike[str] | None = None) -> GenConfig:
    """Build a :class:`GenConfig`; a :class:`ConfigError` names every bad field path and value."""
    try:
        return GenConfig.model_validate(dict(data))
    except ValidationError as e:
        msg = format_validation_error(e)
        if source is not None:
            msg = msg.replace("invalid config:", f"invalid config {source}:", 1)
        raise ConfigError(msg) from None


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Iterable[str] = (),
    *,
    base: Mapping[str, Any] | None = None,
) -> GenConfig:
    """Load, merge, override and validate a config.

    ``path``: a YAML file (with optional ``includes:``); ``overrides``: ``KEY.PATH=VALUE``
    strings applied after the file; ``base``: a mapping the file is merged over (defaults a
    program supplies). Either ``path`` or ``base`` must be given.
    """
    if path is None and base is None:
        raise ConfigError("load_config needs a config path or a base mapping")
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = deep_merge(data, load_yaml_tree(path))
    data = apply_overrides(data, overrides)
    cfg = validate_config(data, source=path)
    if path is not None:
        cfg.set_source(str(path))  # so errors found later (options.* blocks) name the file
    return cfg


def config_to_yaml(config: GenConfig) -> str:
    """The resolved config as YAML (what ``genbackends config`` prints); loads back equal."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, default_flow_style=False)
