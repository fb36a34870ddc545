"""Salvage of a segment file cut short by a crash: how much of it is intact audio.

Owns the scanning of a cut file's bytes: the last complete, CRC-valid Ogg page and
the granule positions of the pages before it (Opus, Ogg FLAC), or the durable
length a WAV header records (see the WAV encoder's ``sizes="durable"``). Pure
functions on bytes: the caller maps the file, cuts it and applies the patches.

Imports only the bottom layer (``audio``, the spool's ``model``); never agent or
another stage.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ..audio.opus import OpusError, decode_ogg_opus, last_complete_page_end
from ..audio.pcm import WAV_HEADER_BYTES, wav_size_patches
from .model import SegmentHeader

__all__ = ["Salvage", "Unsalvageable", "ogg_granules", "salvage"]


@dataclass(frozen=True)
class Salvage:
    """What to keep of a cut file."""

    keep_bytes: int  # cut the file here
    frames: int  # frames at the segment's rate held in what is kept
    patches: list[tuple[int, bytes]]  # (offset, bytes) to write after cutting


class Unsalvageable(Exception):
    """The file is not what its header says (goes to quarantine with this reason)."""


def ogg_granules(data: memoryview, end: int) -> Iterator[int]:
    """Granule positions of the pages in ``data[:end]`` (pages already CRC-checked)."""
    pos = 0
    while pos < end:
        granule = int.from_bytes(data[pos + 6 : pos + 14], "little", signed=True)
        nsegs = data[pos + 26]
        body = sum(data[pos + 27 : pos + 27 + nsegs])
        pos += 27 + nsegs + body
        yield granule


def salvage(data: memoryview, header: SegmentHeader) -> Salvage:
    """Work out how much of a cut segment file is intact audio.

    Raises:
        Unsalvageable: The bytes are not the format ``header`` names.
    """
    if header.format in ("opus", "flac"):
        end = last_complete_page_end(data)
        if end == 0:
            if len(data) == 0 or not any(data[:4096]):
                return Salvage(0, 0, [])
            raise Unsalvageable("not an Ogg stream (no valid first page)")
        audio_granules = [g for g in ogg_granules(data, end) if g > 0]
        if not audio_granules:
            return Salvage(0, 0, [])
        if header.format == "flac":
            # Ogg FLAC granules count samples at the stream rate.
            return Salvage(end, max(audio_granules), [])
        try:
            decoded = decode_ogg_opus(data[:end])
        except OpusError as exc:
            raise Unsalvageable(f"Opus pages do not decode: {exc}") from exc
        frames = round(decoded.pcm.shape[0] * header.rate / decoded.rate)
        return Salvage(end, frames, [])
    if header.format == "wav":
        if len(data) < WAV_HEADER_BYTES:
            return Salvage(0, 0, [])
        tags = (bytes(data[:4]), bytes(data[8:12]), bytes(data[36:40]))
        if tags != (b"RIFF", b"WAVE", b"data"):
            raise Unsalvageable("not the WAV header this spool writes")
        channels, rate = struct.unpack("<HI", data[22:28])
        (bits,) = struct.unpack("<H", data[34:36])
        if channels != header.channels or rate != header.rate:
            raise Unsalvageable(f"WAV header says {channels} ch at {rate} Hz, "
                                f"open.json {header.channels} ch at {header.rate} Hz")
        block = channels * (bits // 8)
        # The data size the header records is what the last fsync made durable.
        (durable,) = struct.unpack("<I", data[40:44])
        frames = min(len(data) - WAV_HEADER_BYTES, durable) // block
        if frames == 0:
            return Salvage(0, 0, [])
        keep = WAV_HEADER_BYTES + frames * block
        return Salvage(keep, frames, wav_size_patches(keep - WAV_HEADER_BYTES))
    raise Unsalvageable(f"unknown format {header.format!r}")
