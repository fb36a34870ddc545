"""Conditional and partial GETs of a segment file: ``If-None-Match``, ``If-Range``
and ``Range`` in, the answer out.

`decide_range` is a synchronous core: header values and the file's ETag and
size go in, a `RangeDecision` (200, 206, 304 or 416 with the byte span and any
``Content-Range``) comes out. Only single byte ranges are served as 206; several
ranges, or a unit other than bytes, get the whole file (RFC 9110 allows ignoring
``Range``).

Imports nothing of the project; never agent, another stage, metrics or systemd.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["RangeDecision", "decide_range"]

_BYTE_RANGE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*")
# A byte position with more digits than this is past the end of any file; reading
# it as this bound keeps every answer the same without converting huge numbers.
_MAX_DIGITS = 18


def _position(digits: str) -> int:
    return int(digits) if len(digits) <= _MAX_DIGITS else 10**_MAX_DIGITS


def _opaque(tag: str) -> str:
    """An entity tag without its weakness indicator (RFC 9110 weak comparison)."""
    tag = tag.strip()
    return tag[2:] if tag.startswith("W/") else tag


@dataclass(frozen=True)
class RangeDecision:
    """How to answer: ``status``, and ``length`` bytes from ``first`` (0 for 304/416);
    ``content_range`` is the ``Content-Range`` header value, when there is one."""

    status: int
    first: int
    length: int
    content_range: str | None = None


def decide_range(etag: str, size: int, *, if_none_match: str | None = None,
                 range_header: str | None = None,
                 if_range: str | None = None) -> RangeDecision:
    """The answer to a GET of a ``size``-byte file whose strong ETag is ``etag``
    (quoted, as sent in the ``ETag`` header; empty when the file has none, so no
    tag matches it)."""
    # If-None-Match compares weakly (W/"x" matches "x"); If-Range strongly.
    if if_none_match is not None and (
            if_none_match.strip() == "*"
            or (etag and _opaque(etag) in [_opaque(t) for t in if_none_match.split(",")])):
        return RangeDecision(304, 0, 0)
    if range_header is None or (if_range is not None and (not etag or if_range.strip() != etag)):
        return RangeDecision(200, 0, size)
    m = _BYTE_RANGE.fullmatch(range_header)
    if m is None or (not m.group(1) and not m.group(2)):
        return RangeDecision(200, 0, size)
    a, b = m.group(1), m.group(2)
    a_pos, b_pos = _position(a) if a else 0, _position(b) if b else 0
    unsatisfiable = RangeDecision(416, 0, 0, f"bytes */{size}")
    if not a:  # the last N bytes
        n = min(b_pos, size)
        first, last = size - n, size - 1
        if n == 0:
            return unsatisfiable
    else:
        first = a_pos
        last = min(b_pos, size - 1) if b else size - 1
        if first >= size or (b and b_pos < first):
            return unsatisfiable
    return RangeDecision(206, first, last - first + 1, f"bytes {first}-{last}/{size}")
