"""The config file as a person reads and edits it.

`config init` and `config show` write every key under a one-line comment taken
from the schema (each field's ``Meta(description=...)``, each section's docstring),
so the comments say what the agent really reads and never drift from it.

`config set` edits the file in place with tomlkit, because the file belongs to
the person who wrote it: their comments, order and formatting stay, and only the
assigned values change. A key the file lacks goes after the last key of its
section (not after the comment that introduces the next section); a section the
file lacks goes at its end. The edited text is validated before it is returned,
so a bad edit writes nothing.

Above ``config``: only the command line uses it.
"""

from __future__ import annotations

import os
import re
import tomllib
import typing
from collections.abc import Iterable, MutableMapping
from pathlib import Path
from typing import Any

import msgspec
import tomlkit
import tomlkit.exceptions
from tomlkit.items import AoT, String, StringType, Table

from .config import AgentConfig, ConfigError, parse_toml, read_config_text, validate

__all__ = ["HEADER", "describe", "edit", "parse_assignment", "render"]

HEADER = (
    "# edge-agent configuration: every key with its default and what it does.\n"
    "# Check a change with `edge-agent config check FILE`; edit on site with\n"
    "# `edge-agent config set FILE key.path=value` (it keeps your comments).\n"
)


# ----------------------------------------------------------------------------
# Writing a whole file


def describe(section: type[msgspec.Struct]) -> dict[str, str]:
    """Each key of a config section with its description in the schema ("" if none)."""
    hints = typing.get_type_hints(section, include_extras=True)
    described = {}
    for field in msgspec.structs.fields(section):
        metas = getattr(hints[field.name], "__metadata__", ())
        texts = [m.description for m in metas if isinstance(m, msgspec.Meta) and m.description]
        described[field.encode_name] = texts[-1] if texts else ""
    return described


def render(cfg: AgentConfig, *, header: str = "") -> str:
    """`cfg` as the text of a config file: every section and key under its comment."""
    values = msgspec.to_builtins(cfg)
    sections = typing.get_type_hints(AgentConfig)
    chunks = [header] if header else []
    for field in msgspec.structs.fields(AgentConfig):
        chunks.extend(_render_table(field.encode_name, sections[field.name],
                                    values[field.encode_name]))
    return "\n".join(chunks)


def _render_table(name: str, section: type[msgspec.Struct], values: dict[str, Any]
                  ) -> list[str]:
    """One table under its comment, then its sub-tables (``[upload.s3]``) after it."""
    summary = (section.__doc__ or "").strip().splitlines()[:1]
    lines = [f"# {line}" for line in summary] + [f"[{name}]"]
    tables: list[str] = []
    hints = typing.get_type_hints(section)
    descriptions = describe(section)
    for field in msgspec.structs.fields(section):
        sub = hints[field.name]
        if isinstance(sub, type) and issubclass(sub, msgspec.Struct):
            tables.extend(_render_table(f"{name}.{field.encode_name}", sub,
                                        values[field.encode_name]))
            continue
        if description := descriptions[field.encode_name]:
            lines.append(f"# {description}")
        lines.append(f"{field.encode_name} = {tomlkit.item(values[field.encode_name]).as_string()}")
    return ["\n".join(lines) + "\n", *tables]


# ----------------------------------------------------------------------------
# Editing a file in place


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """Parse `key.path=value` from the command line.

    The value is read as a TOML value when it is one (`48000`, `true`, `"x"`,
    `[1, 2]`), otherwise it is taken as a bare string, so `device.id=edge-7`
    works without shell-quoted TOML quotes.
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError([f"{text}: expected key.path=value"])
    parts = key.split(".")
    if any(not re.fullmatch(r"[A-Za-z0-9_-]+", part) for part in parts):
        raise ConfigError([f"{key}: expected a dotted key path such as capture.rate"])
    value = value.strip()
    try:
        parsed: Any = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return parts, parsed


def edit(path: str | os.PathLike[str], assignments: Iterable[str]) -> str:
    """The text of the config file at `path` with each ``key.path=value`` made in
    place, validated; raises `ConfigError` with every problem (nothing is written)."""
    p = Path(path)
    text = read_config_text(p)
    parse_toml(text, p)  # a broken file gets the same line as from `config check`
    if text and not text.endswith("\n"):
        text += "\n"  # else a section added at the end would be glued to the last line
    try:
        doc = tomlkit.parse(text)
    except tomlkit.exceptions.ParseError as exc:
        raise ConfigError([f"{p}: not valid TOML: {exc}"]) from None
    for assignment in assignments:
        _assign(doc, *parse_assignment(assignment))
    edited = doc.as_string()
    try:
        raw = tomllib.loads(edited)
    except tomllib.TOMLDecodeError as exc:  # tomlkit wrote what it cannot read back
        raise ConfigError([f"{p}: the edit would not be valid TOML ({exc}); "
                           "file left unchanged"]) from None
    try:
        validate(raw)
    except ConfigError as exc:
        raise ConfigError(
            [f"{p}: {line} (file left unchanged)" for line in exc.problems]) from None
    return edited


def _assign(doc: tomlkit.TOMLDocument, parts: list[str], value: Any) -> None:
    """Set a value at a key path, adding what is missing where a person would."""
    node: MutableMapping[str, Any] = doc
    for i, part in enumerate(parts[:-1]):
        if part not in node:
            node[part] = tomlkit.table()
        child = node[part]
        if not isinstance(child, MutableMapping):
            raise ConfigError([f"{'.'.join(parts[: i + 1])}: is a value, not a table"])
        node = child
    key = parts[-1]
    if key in node:
        node[key] = _styled_like(node[key], value)  # tomlkit keeps the line's comment
    elif isinstance(node, Table):
        _add_after_last_key(node, key, value)
    else:
        node[key] = value


def _styled_like(old: Any, value: Any) -> Any:
    """A 'literal string' stays one when the new value can be written so."""
    if (isinstance(old, String) and old.type is StringType.SLL and isinstance(value, str)
            and "'" not in value and "\n" not in value):
        return tomlkit.string(value, literal=True)
    return value


def _add_after_last_key(table: Table, key: str, value: Any) -> None:
    """Add `key` after the last key of `table`, indented like it.

    tomlkit's parser keeps the comments above the next section's header at the
    end of this table, so a plain append would land under them.
    """
    body = table.value.body
    keys = [i for i, (k, item) in enumerate(body)
            if k is not None and not isinstance(item, (Table, AoT))]
    item = tomlkit.item(value)
    if keys:
        item.trivia.indent = body[keys[-1]][1].trivia.indent
    at = keys[-1] + 1 if keys else 0
    if at < len(body):
        # tomlkit has no public insert; `_insert_at` is what its own append uses.
        table.value._insert_at(at, key, item)
    else:
        table.add(key, item)
