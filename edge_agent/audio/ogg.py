"""Ogg pages of a damaged file: which are intact, and how to splice them.

libogg's page sync (``ogg_sync_pageseek``) finds every complete, CRC-valid page
and skips what is not one (a torn write, zeros, garbage in the middle of a
file), so a salvage can keep the pages after the damage too. pyogg binds libogg,
but declares ``ogg_sync_buffer`` as returning a copied string; this module loads
its own handle of the same library with the pointer types the sync API needs,
and uses pyogg's structure definitions.

Part of ``audio/``: no Trio; imports only ``audio.opus`` (the page CRC).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass
from typing import Any

from pyogg import ogg as _pyogg

from .opus import ogg_crc32

__all__ = ["OggPage", "intact_pages", "renumbered"]

_HEADER = 27


@functools.cache
def _libogg() -> Any:
    lib = ctypes.CDLL(ctypes.util.find_library("ogg") or "libogg.so.0")
    for name, args, res in (
        ("ogg_sync_init", [ctypes.c_void_p], ctypes.c_int),
        ("ogg_sync_buffer", [ctypes.c_void_p, ctypes.c_long], ctypes.c_void_p),
        ("ogg_sync_wrote", [ctypes.c_void_p, ctypes.c_long], ctypes.c_int),
        ("ogg_sync_pageseek", [ctypes.c_void_p, ctypes.c_void_p], ctypes.c_long),
        ("ogg_sync_clear", [ctypes.c_void_p], ctypes.c_int),
    ):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


@dataclass(frozen=True)
class OggPage:
    """One intact page: where it is in the file and what its header says."""

    start: int
    end: int
    granule: int  # the stream position at the end of the page (-1: none ends here)
    sequence: int
    continued: bool  # its first packet began on the page before
    packets: list[bytes]  # the packets that end on this page (and a trailing partial one)


def _parse(data: memoryview, start: int, end: int) -> OggPage:
    nsegs = data[start + 26]
    lacing = bytes(data[start + _HEADER : start + _HEADER + nsegs])
    pos = start + _HEADER + nsegs
    packets, size = [], 0
    for value in lacing:
        size += value
        if value < 255:
            packets.append(bytes(data[pos : pos + size]))
            pos, size = pos + size, 0
    if size:
        packets.append(bytes(data[pos : pos + size]))
    return OggPage(start, end, int.from_bytes(data[start + 6 : start + 14], "little", signed=True),
                   int.from_bytes(data[start + 18 : start + 22], "little"),
                   bool(data[start + 5] & 1), packets)


def intact_pages(data: bytes | bytearray | memoryview) -> list[OggPage]:
    """Every complete, CRC-valid page of ``data`` in order, damage skipped."""
    view = memoryview(data).cast("B")
    if not len(view):
        return []
    lib = _libogg()
    state = _pyogg.ogg_sync_state()
    page = _pyogg.ogg_page()
    lib.ogg_sync_init(ctypes.byref(state))
    try:
        buffer = lib.ogg_sync_buffer(ctypes.byref(state), len(view))
        ctypes.memmove(buffer, bytes(view), len(view))
        lib.ogg_sync_wrote(ctypes.byref(state), len(view))
        pages, pos = [], 0
        while (n := lib.ogg_sync_pageseek(ctypes.byref(state), ctypes.byref(page))) != 0:
            if n > 0:
                pages.append(_parse(view, pos, pos + n))
            pos += abs(n)
        return pages
    finally:
        lib.ogg_sync_clear(ctypes.byref(state))


def renumbered(data: bytes | bytearray | memoryview, page: OggPage, sequence: int) -> bytes:
    """The bytes of ``page`` with page sequence number ``sequence`` (CRC redone), so a
    stream spliced past damage has no hole a decoder would stop at."""
    out = bytearray(memoryview(data)[page.start : page.end])
    out[18:22] = sequence.to_bytes(4, "little")
    out[22:26] = b"\0\0\0\0"
    out[22:26] = ogg_crc32(out).to_bytes(4, "little")
    return bytes(out)
