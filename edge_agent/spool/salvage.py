"""Salvage of a segment file cut short by a crash: how much of it is intact audio.

Owns the scanning of a cut file's bytes. Ogg (Opus, Ogg FLAC): every complete,
CRC-valid page, found by libogg's page sync, so damage in the middle of a file
(a bad block, garbage) costs the pages it hit, not everything after it: the
intact pages after the damage are spliced on (renumbered, so decoders see no
hole) and the audio that went missing becomes a gap in the segment's metadata.
A page after damage is placed by its granule less the Opus packets it holds, or
by the number in the header of the FLAC frame it opens. WAV: the
durable length its header records (see the WAV encoder's ``sizes="durable"``).
Pure functions on bytes: the caller maps the file, cuts it, writes the spliced
tail and applies the patches.

Imports only the bottom layer (``audio``, ``clock``, ``wire``, the spool's
``model``); never agent or another stage.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
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


def _splice(data: memoryview, pages: list[OggPage], prefix: list[OggPage],
            first_sample: Callable[[OggPage], int | None]
            ) -> tuple[bytes, list[tuple[int, int]], int]:
    """The intact pages after the prefix, renumbered; each hole as (the granule
    where it starts, samples missing), in the stream's granule units; and the
    granule of the last page kept.

    ``first_sample`` says where a page's first packet starts in the stream (None:
    it cannot say), which places a page that follows damage.
    """
    tail = bytearray()
    holes: list[tuple[int, int]] = []
    sequence = prefix[-1].sequence
    granule = max(0, *(p.granule for p in prefix))
    previous_end, previous_kept = prefix[-1].end, True
    for page in pages[len(prefix):]:
        follows = previous_kept and page.start == previous_end
        previous_end = page.end
        begins = None if follows else first_sample(page)
        if page.granule < 0 or (not follows and (page.continued or begins is None)):
            # No position to place it by, or its first packet began in the damage.
            previous_kept = False
            continue
        if begins is not None and begins > granule:
            holes.append((granule, begins - granule))
        sequence += 1
        tail += renumbered(data, page, sequence)
        granule, previous_kept = page.granule, True
    return bytes(tail), holes, granule


def _gap_notes(holes: list[tuple[int, int]], header: SegmentHeader, unit_rate: int,
               origin: int) -> list[GapNote]:
    """Holes in granule units (``unit_rate`` a second, counted from ``origin``) as gap
    notes at the frame of the salvaged audio they fall after."""
    notes, missed = [], 0
    for at, missing in holes:
        held = max(at - origin - missed, 0)
        notes.append(GapNote(frame=round(held * header.rate / unit_rate),
                             seconds=missing / unit_rate,
                             utc=iso_utc(header.start_ts + max(at - origin, 0) / unit_rate),
                             reason="damage"))
        missed += missing
    return notes


def _opus_first_sample(page: OggPage) -> int:
    return page.granule - sum(opus_packet_samples(p) for p in page.packets)


def _flac_block_size(head: OggPage) -> int | None:
    """The fixed block size from STREAMINFO in the Ogg FLAC mapping's first packet
    (None: variable block sizes, where frame headers carry sample numbers)."""
    packet = head.packets[0] if head.packets else b""
    if not packet.startswith(b"\x7fFLAC") or len(packet) < 21:
        return None
    smallest, largest = struct.unpack(">HH", packet[17:21])
    return largest if smallest == largest else None


def _flac_first_sample(page: OggPage, block: int | None) -> int | None:
    """Where the FLAC frame that opens ``page`` starts: its header's frame number
    (times the fixed block size) or sample number, coded as in UTF-8."""
    frame = page.packets[0] if page.packets else b""
    if len(frame) < 5 or frame[0] != 0xFF or frame[1] & 0xFE != 0xF8:
        return None
    lead = frame[4]
    ones = 8 - (lead ^ 0xFF).bit_length()  # leading one bits: the coded length
    if ones == 1 or ones > 7 or len(frame) < 4 + ones:
        return None
    value = lead & (0x7F >> ones) if ones else lead
    for byte in frame[5 : 4 + ones]:
        if byte & 0xC0 != 0x80:
            return None
        value = value << 6 | byte & 0x3F
    if frame[1] & 1:  # variable block size: the number is the first sample's
        return value
    return None if block is None else value * block


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
            block = _flac_block_size(prefix[0])
            tail, holes, granule = _splice(data, pages, prefix,
                                           lambda p: _flac_first_sample(p, block))
            # Ogg FLAC granules count samples at the stream rate.
            held = granule - sum(missing for _, missing in holes)
            return Salvage(end, held, [], tail, _gap_notes(holes, header, header.rate, 0))
        tail, holes, _ = _splice(data, pages, prefix, _opus_first_sample)
        try:
            decoded = decode_ogg_opus(bytes(data[:end]) + tail)
        except OpusError as exc:
            raise Unsalvageable(f"Opus pages do not decode: {exc}") from exc
        frames = round(decoded.pcm.shape[0] * header.rate / decoded.rate)
        gaps = _gap_notes(holes, header, DECODE_RATE, _pre_skip(prefix[0]))
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
