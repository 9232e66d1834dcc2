"""The config reference, generated from the pydantic models (so it cannot drift from the code).

``python -m genbackends.config_docs`` prints it as markdown; the README holds a copy between
``<!-- config-reference:start -->`` and ``<!-- config-reference:end -->`` that a test keeps equal.
"""
from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from genbackends.config import GenConfig

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "")
    return text.replace("NoneType", "None").replace("|", "\\|")


def _default(info: FieldInfo) -> str:
    if info.default is PydanticUndefined:
        if info.default_factory is not None:
            value = info.default_factory()
            return "(section)" if isinstance(value, BaseModel) else json.dumps(value)
        return "**required**"
    return json.dumps(info.default)


def _constraints(info: FieldInfo) -> str:
    parts = []
    for m in info.metadata:
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("min_length", "min length")):
            v = getattr(m, attr, None)
            if v is not None:
                parts.append(f"{sym} {v}")
    return ", ".join(parts)


def _is_section(info: FieldInfo) -> bool:
    ann = info.annotation
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _table(model: type[BaseModel], prefix: str) -> list[str]:
    lines = ["| field | type | default | constraints | meaning |", "|---|---|---|---|---|"]
    for name, info in model.model_fields.items():
        if _is_section(info):
            continue
        desc = (info.description or "").replace("|", "\\|")
        lines.append(
            f"| `{prefix}{name}` | `{_type_name(info.annotation)}` | `{_default(info)}` | {_constraints(info)} | {desc} |"
        )
    return lines


def config_reference() -> str:
    """Markdown tables for :class:`GenConfig` and each of its sections."""
    out = [
        f"Top level ({GenConfig.__doc__.strip().splitlines()[0].rstrip('.')}). Unknown keys are errors everywhere.",
        "",
        *_table(GenConfig, ""),
    ]
    for name, info in GenConfig.model_fields.items():
        if _is_section(info):
            model = info.annotation
            doc = (model.__doc__ or "").strip().splitlines()[0]
            out += ["", f"`{name}:` {doc}", "", *_table(model, f"{name}.")]
    return "\n".join(out) + "\n"


def readme_block() -> str:
    """The README section between the markers, markers included."""
    return f"{START}\n{config_reference()}{END}"


if __name__ == "__main__":
    print(config_reference(), end="")
