"""Config tables into msgspec structs, with one line per bad key.

`convert_table` builds a struct (and its nested structs) from a parsed TOML
table key by key, so that one bad value costs one line naming its key path and
what was expected, and the other keys are still checked: a person fixing a file
on a device wants every problem at once. A bad key keeps its default, and is
named in ``bad`` so that the rules across keys can leave it out.

Imports nothing of the project; `config` holds the schema and the rules.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from typing import Annotated, Any, Literal

import msgspec

__all__ = ["convert_table", "names_any"]


def names_any(problem: str, key_paths: list[str]) -> bool:
    """Whether `problem` names one of `key_paths` (not merely a longer key)."""
    return any(re.search(rf"(?<![\w.]){re.escape(k)}(?!\w)", problem) for k in key_paths)


def convert_table(
    raw: Any, cls: type[msgspec.Struct], path: str, problems: list[str], bad: list[str]
) -> msgspec.Struct:
    """`cls` from a raw table; a key that is bad is reported in `problems`, named
    in `bad` and left at its default."""
    if not isinstance(raw, dict):
        problems.append(f"{path.rstrip('.') or 'config'}: expected a table, got {_show(raw)}")
        bad.append(path.rstrip("."))
        return cls()
    fields = {f.encode_name: f for f in msgspec.structs.fields(cls)}
    hints = typing.get_type_hints(cls, include_extras=True)
    for key in raw:
        if key not in fields:
            problems.append(_unknown_key(f"{path}{key}", key, list(fields)))
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        if name not in raw:
            continue
        ftype = hints[field.name]
        key_path = f"{path}{name}"
        if isinstance(ftype, type) and issubclass(ftype, msgspec.Struct):
            kwargs[field.name] = convert_table(raw[name], ftype, key_path + ".", problems, bad)
            continue
        try:
            kwargs[field.name] = msgspec.convert(raw[name], ftype, strict=True)
        except msgspec.ValidationError as exc:
            problems.append(f"{key_path}: {_expected(ftype, str(exc))}, got {_show(raw[name])}")
            bad.append(key_path)
    return cls(**kwargs)


def _unknown_key(key_path: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{key_path}: unknown key{hint}; known keys here: {', '.join(sorted(known))}"


def _expected(ftype: Any, message: str) -> str:
    """Say in words what a key accepts, including any bound msgspec reported."""
    base = _describe(ftype)
    # msgspec reports bounds as "Expected `int` >= 8000".
    bound = re.match(r"Expected `[^`]+` (.+?)(?: - at .*)?$", message)
    if bound and not bound.group(1).startswith("got"):
        if bound.group(1).startswith("matching regex"):
            return f"expected {base} of letters, digits, '.', '_' or '-' (at most 64)"
        return f"expected {base} {bound.group(1)}"
    return f"expected {base}"


def _describe(ftype: Any) -> str:
    origin = typing.get_origin(ftype)
    if origin is Annotated:
        return _describe(typing.get_args(ftype)[0])
    if origin is Literal:
        return "one of " + ", ".join(f'"{a}"' for a in typing.get_args(ftype))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(ftype))
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(ftype, getattr(ftype, "__name__", str(ftype)))


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)
