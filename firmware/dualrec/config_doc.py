"""docs/config.md, generated from the configuration models (dualrec.config), so it cannot drift.

`dualrec config-doc > docs/config.md` writes it; tests/test_config_doc.py
regenerates it and fails when the committed file differs, when a key has no description, or
when the examples do not load. Each key's type, default and allowed values come from its
annotation and constraints; its description and example from its ``Field(description=...,
examples=[...])``; each section's text from its class docstring.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

from annotated_types import Ge, Le, MaxLen, MinLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from dualrec.config import BoardProfile, SiteConfig

HEADER = """\
# Configuration reference

<!-- Generated from firmware/dualrec/config.py by `dualrec config-doc > docs/config.md`. Do not
edit: change the models' descriptions and regenerate; tests/test_config_doc.py fails when this
file is out of date. -->

A box is configured by two TOML files: the **board profile** (`boards/<name>.toml`: what
hardware is there) and the **site config** (`/etc/dualrec/site.toml`, written by
`dualrec-tool provision`: who the box is, how it records, where segments go). Unknown keys and
values out of range are refused: `dualrec check-config` names the file, the key and the reason.
Relative paths in the site config are relative to the file's directory.

Worked examples of the operation log for real terminals (GB18030 with CRLF, UTF-8 with LF, a
terminal that logs through a receipt printer): [oplog-terminals.md](oplog-terminals.md).
"""


class DocError(ValueError):
    """A model lacks what the reference needs (a description, an example for a required key)."""


def render() -> str:
    """The whole of docs/config.md."""
    parts = [HEADER]
    for title, model in (("Board profile", BoardProfile), ("Site config", SiteConfig)):
        parts.append(f"## {title}\n\n{_doc(model)}\n")
        for name, field in model.model_fields.items():
            parts.append(_section(name, field))
    return "\n".join(parts)


def example_toml(model: type[BaseModel]) -> str:
    """A file of this model with every section and every key set to its example (or default)."""
    return "\n".join(_example_block(name, _section_model(f.annotation)[0])
                     for name, f in model.model_fields.items())


def _section(name: str, field: FieldInfo) -> str:
    model, optional = _section_model(field.annotation)
    if field.is_required():
        presence = "required"
    elif optional:
        presence = "optional section"
    else:
        presence = "optional; every key has a default"
    rows = ["| key | type | default | allowed | description |", "| --- | --- | --- | --- | --- |"]
    for key, f in model.model_fields.items():
        if not f.description:
            raise DocError(f"[{name}] {key}: no Field(description=...)")
        kind, allowed = _describe(f.annotation, f.metadata)
        if f.is_required():
            default = "required"
        elif f.get_default() is None:
            default = "absent"
        else:
            default = f"`{_toml(f.get_default())}`"
        rows.append("| " + " | ".join(_cell(c) for c in (
            f"`{key}`", kind, default, allowed, f.description)) + " |")
    return (f"### `[{name}]` ({presence})\n\n{_doc(model)}\n\n" + "\n".join(rows) +
            f"\n\nExample:\n\n```toml\n{_example_block(name, model)}```\n")


def _example_block(name: str, model: type[BaseModel]) -> str:
    lines = [f"[{name}]"]
    tables: list[str] = []
    for key, f in model.model_fields.items():
        if f.examples:
            value = f.examples[0]
        elif f.is_required():
            raise DocError(f"[{name}] {key}: a required key needs Field(examples=[...])")
        else:
            value = f.get_default()
        if value is None:
            lines.append(f"# {key} = (absent)")
        elif isinstance(value, dict) and value:
            tables += _tables(f"{name}.{_key(key)}", value)  # an inline table is one line
        else:
            lines.append(f"{key} = {_toml(value)}")
    return "\n".join(lines + tables) + "\n"


def _tables(path: str, value: dict[str, Any]) -> list[str]:
    """A non-empty TOML table and its sub-tables as [path] headers (after the plain keys)."""
    out = ["", f"[{path}]"]
    subs: list[str] = []
    for k, v in value.items():
        if isinstance(v, dict) and v:
            subs += _tables(f"{path}.{_key(k)}", v)
        else:
            out.append(f"{_key(k)} = {_toml(v)}")
    return (out if len(out) > 2 else []) + subs


def _section_model(annotation: Any) -> tuple[type[BaseModel], bool]:
    """The section's model and whether the section may be left out (X | None)."""
    args = typing.get_args(annotation)
    if _is_union(annotation) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    if not (inspect.isclass(annotation) and issubclass(annotation, BaseModel)):
        raise DocError(f"{annotation!r} is not a section model")
    return annotation, False


def _describe(annotation: Any, metadata: list[Any]) -> tuple[str, str]:
    """(type, allowed values) of a key, from its annotation and constraints."""
    allowed = _constraints(metadata)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        inner, extra = _describe(args[0], _annotated_metadata(annotation))
        return inner, _join(allowed, extra)
    if _is_union(annotation) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        kind, extra = _describe(inner, [])
        return f"{kind} or absent", _join(allowed, extra)
    if origin is Literal:
        kinds = {_kind(type(a)) for a in args}
        kind = kinds.pop() if len(kinds) == 1 else "number"
        return kind, _join("one of " + ", ".join(f"`{_toml(a)}`" for a in args), allowed)
    if origin is list:
        kind, extra = _describe(args[0], [])
        return f"list of {_plural(kind)}", _join(allowed, f"each {extra}" if extra else "")
    if origin is dict:
        kind, extra = _describe(args[1], [])
        return f"table of {_plural(kind)}", _join(allowed, f"each {extra}" if extra else "")
    return _kind(annotation), allowed


def _annotated_metadata(annotation: Any) -> list[Any]:
    out: list[Any] = []
    for m in annotation.__metadata__:
        out += m.metadata if isinstance(m, FieldInfo) else [m]
    return out


def _constraints(metadata: list[Any]) -> str:
    lo = hi = None
    words = []
    for m in metadata:
        if isinstance(m, Ge):
            lo = m.ge
        elif isinstance(m, Le):
            hi = m.le
        elif isinstance(m, MinLen):
            words.append(f"at least {m.min_length}")
        elif isinstance(m, MaxLen):
            words.append(f"at most {m.max_length}")
        elif getattr(m, "pattern", None):
            words.append(f"matches `{m.pattern}`")
    if lo is not None or hi is not None:
        words.insert(0, f"{_num(lo) if lo is not None else '…'} … "
                        f"{_num(hi) if hi is not None else '…'}")
    return "; ".join(words)


def _kind(t: Any) -> str:
    if isinstance(t, type) and issubclass(t, BaseModel):
        return "table"
    return {bool: "boolean", int: "integer", float: "number", str: "string",
            Path: "path"}.get(t, getattr(t, "__name__", str(t)))


def _plural(kind: str) -> str:
    if kind.endswith(" or absent"):
        return f"({kind})"
    head, sep, rest = kind.partition(" of ")
    return f"{head}s{sep}{rest}"


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _num(v: Any) -> str:
    # Thousands separated as TOML allows (1_000_000), so big limits read at a glance.
    return f"{v:_}" if isinstance(v, int) and abs(v) >= 10_000 else str(v)


def _toml(value: Any) -> str:
    """A value as it is written in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str | Path):
        text = str(value)
        if "\\" in text and "'" not in text and text.isprintable():
            return f"'{text}'"  # a literal string: a regular expression reads as it is
        return json.dumps(text, ensure_ascii=False)  # JSON's escapes are TOML's
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_key(k)} = {_toml(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    if isinstance(value, BaseModel):
        return _toml(value.model_dump(mode="json"))
    raise DocError(f"cannot write {value!r} as TOML")


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml(k)


def _cell(text: str) -> str:
    """Table cells are one line and | separates them, even inside a code span."""
    return " ".join(text.split()).replace("|", "\\|")


def _doc(obj: Any) -> str:
    return " ".join((inspect.getdoc(obj) or "").split())
