"""Salvage of a segment file cut short by a crash: how much of it is intact audio.

Owns the scanning of a cut file's bytes. Ogg (Opus, Ogg FLAC): every complete,
CRC-valid page, found by libogg's page sync, so damage in the middle of a file
(a bad block, garbage) costs the pages it hit, not everything after it: for
Opus, the intact pages after the damage are spliced on (renumbered, so decoders
see no hole) and the audio that went missing becomes a gap in the segment's
metadata. Ogg FLAC keeps the run of pages before the first damage. WAV: the
durable length its header records (see the WAV encoder's ``sizes="durable"``).
Pure functions on bytes: the caller maps the file, cuts it, writes the spliced
tail and applies the patches.

Imports only the bottom layer (``audio``, ``clock``, ``wire``, the spool's
``model``); never agent or another stage.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..audio.ogg import OggPage, contiguous_prefix, intact_pages, renumbered
from ..audio.opus import DECODE_RATE, OpusError, decode_ogg_opus, opus_packet_samples
from ..audio.pcm import WAV_HEADER_BYTES, wav_size_patches
from ..clock import iso_utc
from ..wire import GapNote
from .model import SegmentHeader

__all__ = ["Salvage", "Unsalvageable", "salvage"]


@dataclass(frozen=True)
class Salvage:
    """What to keep of a cut file."""

    keep_bytes: int  # cut the file here
    frames: int  # frames at the segment's rate held in what is kept
    patches: list[tuple[int, bytes]]  # (offset, bytes) to write after cutting
    tail: bytes = b""  # intact pages from past damage, appended after the cut
    gaps: list[GapNote] = field(default_factory=list)  # audio the damage took


class Unsalvageable(Exception):
    """The file is not what its header says (goes to quarantine with this reason)."""


def _splice_opus(data: memoryview, pages: list[OggPage], prefix: list[OggPage]
                 ) -> tuple[bytes, list[tuple[int, float]]]:
    """The intact pages after the prefix, renumbered, and each hole as
    (its start in samples at 48 kHz from the stream start, seconds missing)."""
    tail = bytearray()
    holes: list[tuple[int, float]] = []
    sequence = prefix[-1].sequence
    granule = max(prefix[-1].granule, 0)
    previous_end, previous_kept = prefix[-1].end, True
    for page in pages[len(prefix):]:
        follows = previous_kept and page.start == previous_end
        previous_end = page.end
        if page.granule < 0 or (not follows and page.continued):
            # No position to place it by, or its first packet began in the damage.
            previous_kept = False
            continue
        if not follows:
            held = sum(opus_packet_samples(p) for p in page.packets)
            missing = page.granule - held - granule
            if missing > 0:
                holes.append((granule, missing / DECODE_RATE))
        sequence += 1
        tail += renumbered(data, page, sequence)
        granule, previous_kept = page.granule, True
    return bytes(tail), holes


def _pre_skip(head: OggPage) -> int:
    """The encoder's pre-skip (samples at 48 kHz) from the OpusHead packet."""
    packet = head.packets[0] if head.packets else b""
    return int.from_bytes(packet[10:12], "little") if packet.startswith(b"OpusHead") else 0


def salvage(data: memoryview, header: SegmentHeader) -> Salvage:
    """Work out how much of a cut segment file is intact audio.

    Raises:
        Unsalvageable: The bytes are not the format ``header`` names.
    """
    if header.format in ("opus", "flac"):
        pages = intact_pages(data)
        prefix = contiguous_prefix(pages)
        if not prefix:
            if len(data) == 0 or not any(data[:4096]):
                return Salvage(0, 0, [])
            raise Unsalvageable("not an Ogg stream (no valid first page)")
        end = prefix[-1].end
        audio_granules = [p.granule for p in prefix if p.granule > 0]
        if not audio_granules:
            return Salvage(0, 0, [])
        if header.format == "flac":
            # Ogg FLAC granules count samples at the stream rate.
            return Salvage(end, max(audio_granules), [])
        tail, holes = _splice_opus(data, pages, prefix)
        pre_skip = _pre_skip(prefix[0])
        try:
            decoded = decode_ogg_opus(bytes(data[:end]) + tail)
        except OpusError as exc:
            raise Unsalvageable(f"Opus pages do not decode: {exc}") from exc
        frames = round(decoded.pcm.shape[0] * header.rate / decoded.rate)
        gaps, missed = [], 0.0
        for at, seconds in holes:
            # Granules count from the stream start, including the encoder's pre-skip.
            frame = round(max(at - pre_skip, 0) * header.rate / DECODE_RATE)
            utc = header.start_ts + frame / header.rate + missed
            gaps.append(GapNote(frame=frame, seconds=seconds, utc=iso_utc(utc),
                                reason="damage"))
            missed += seconds
        return Salvage(end, frames, [], tail, gaps)
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
