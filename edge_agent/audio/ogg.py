"""Ogg pages of a damaged file: which are intact, and how to splice them.

libogg's page sync (``ogg_sync_pageseek``) finds every complete, CRC-valid page
and skips what is not one (a torn write, zeros, garbage in the middle of a
file), so a salvage can keep the pages after the damage too. pyogg binds libogg,
but declares ``ogg_sync_buffer`` as returning a copied string; this module loads
its own handle of the same library with the pointer types the sync API needs,
and uses pyogg's structure definitions.

Also the page CRC, and `last_complete_page_end` for a file cut by a crash.

Part of ``audio/``: no Trio; imports nothing else of the project.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import zlib
from dataclasses import dataclass
from typing import Any, Final

from pyogg import ogg as _pyogg

__all__ = [
    "OggPage",
    "contiguous_prefix",
    "intact_pages",
    "last_complete_page_end",
    "ogg_crc32",
    "renumbered",
]

_HEADER: Final = 27
_BIT_REVERSED: Final = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


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


def ogg_crc32(page: bytes | bytearray | memoryview) -> int:
    """Ogg's CRC-32 (poly 0x04C11DB7, MSB first, init 0, no final xor).

    Computed with zlib's C implementation of the bit-reflected CRC-32 with the
    same polynomial: feeding it bit-reversed bytes (with zlib's init and final
    xor undone) yields the bit-reversed Ogg CRC. That is the same arithmetic
    as the spec's table-driven loop, at C speed, which matters when a Pi
    salvages a large file on boot.
    """
    reflected = zlib.crc32(bytes(page).translate(_BIT_REVERSED), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{reflected:032b}"[::-1], 2)


def contiguous_prefix(pages: list[OggPage]) -> list[OggPage]:
    """The pages from the start of the file up to the first damage."""
    run: list[OggPage] = []
    for page in pages:
        if page.start != (run[-1].end if run else 0):
            break
        run.append(page)
    return run


def last_complete_page_end(data: bytes | bytearray | memoryview) -> int:
    """The offset just after the run of complete, CRC-valid pages that ``data``
    starts with (a torn write, zeros or garbage ends it); 0 when ``data`` does not
    start with a valid page."""
    run = contiguous_prefix(intact_pages(data))
    return run[-1].end if run else 0


def renumbered(data: bytes | bytearray | memoryview, page: OggPage, sequence: int) -> bytes:
    """The bytes of ``page`` with page sequence number ``sequence`` (CRC redone), so a
    stream spliced past damage has no hole a decoder would stop at."""
    out = bytearray(memoryview(data)[page.start : page.end])
    out[18:22] = sequence.to_bytes(4, "little")
    out[22:26] = b"\0\0\0\0"
    out[22:26] = ogg_crc32(out).to_bytes(4, "little")
    return bytes(out)
