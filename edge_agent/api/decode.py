"""Reading spooled segments for the API: opening a segment's file safely, and
decoding the part of it a response needs.

`open_under` opens a file component by component below the spool root with
``O_NOFOLLOW``, so neither ``..`` nor a symlink anywhere below the root can lead
outside it. `decode_segment` decodes frames ``[first, last)`` of a WAV, Ogg FLAC
or Ogg Opus segment; `windows` cuts a long piece into parts decoded one at a
time. Blocking: called in worker threads.

Imports only the bottom layer (audio, wire) and the API's own plan/seams;
never agent, another stage, metrics or systemd.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from numpy.typing import NDArray

from ..audio.flac import FlacError, decode_ogg_flac
from ..audio.opus import DECODE_RATE, OpusError, decode_ogg_opus
from ..audio.pcm import read_wav
from ..audio.resample import StreamResampler
from ..wire import SegmentMeta
from .plan import SegmentPiece
from .seams import SpoolView

__all__ = [
    "SegmentUnreadable",
    "UnsafePath",
    "decode_segment",
    "open_segment",
    "open_under",
    "resample_exact",
    "windows",
]

_SEGMENT_WINDOW_SECONDS = 30.0  # of a spooled segment decoded at a time
# Opus decoded from this many 48 kHz frames (200 ms) before the range: after a
# seek the decoder, and then the resampler, need that long to settle.
_OPUS_LEAD_IN = DECODE_RATE // 5


class UnsafePath(Exception):
    """A path below the spool root that is not a plain directory/file chain."""


def open_under(root: Path, relative: Sequence[str]) -> int:
    """Open ``root/relative...`` read-only, refusing anything but real directories
    and a regular file below ``root``.

    Every component is opened relative to the previous one with ``O_NOFOLLOW``,
    so a symlink (or ``..``) anywhere below ``root`` is refused rather than
    followed, and nothing outside ``root`` can be reached.

    Returns:
        An open file descriptor (the caller closes it).

    Raises:
        FileNotFoundError: a component does not exist.
        UnsafePath: a component is a symlink, not a directory/regular file, or a
            name that is not a plain file name.
    """
    if not relative:
        raise UnsafePath("empty path")
    for part in relative:
        if part in ("", ".", "..") or "/" in part or "\0" in part:
            raise UnsafePath(f"not a plain file name: {part!r}")
    nofollow = os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in relative[:-1]:
            try:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | nofollow, dir_fd=fd)
            except NotADirectoryError:
                raise UnsafePath(f"{part} is not a directory") from None
            except OSError as exc:
                if exc.errno == 40:  # ELOOP: a symlink
                    raise UnsafePath(f"{part} is a symlink") from None
                raise
            os.close(fd)
            fd = nxt
        try:
            # O_NONBLOCK: a FIFO planted here must not hang the open.
            out = os.open(relative[-1], os.O_RDONLY | os.O_NONBLOCK | nofollow, dir_fd=fd)
        except OSError as exc:
            if exc.errno == 40:
                raise UnsafePath(f"{relative[-1]} is a symlink") from None
            raise
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(out).st_mode):
        os.close(out)
        raise UnsafePath(f"{relative[-1]} is not a regular file")
    return out


def open_segment(spool: SpoolView, seg_id: str) -> tuple[int, int]:
    """(fd, size) of a segment's audio file; retried once if it moved meanwhile
    (a state change renames its directory)."""
    for attempt in range(2):
        try:
            path = spool.audio_path(seg_id)
        except KeyError:
            raise FileNotFoundError(seg_id) from None
        try:
            fd = open_under(spool.root, path.relative_to(spool.root).parts)
        except FileNotFoundError:
            if attempt:
                raise
            continue
        return fd, os.fstat(fd).st_size
    raise FileNotFoundError(seg_id)


class SegmentUnreadable(Exception):
    """A spooled segment's audio cannot be decoded."""


def _fit(pcm: NDArray[Any], frames: int) -> NDArray[Any]:
    """Exactly ``frames`` frames: cut, or padded with silence."""
    if len(pcm) >= frames:
        return pcm[:frames]
    pad = np.zeros((frames - len(pcm), pcm.shape[1]), dtype=pcm.dtype)
    return np.concatenate([pcm, pad])


def resample_exact(pcm: NDArray[Any], in_rate: int, out_rate: int,
                    frames: int) -> NDArray[Any]:
    if in_rate == out_rate:
        return _fit(pcm, frames)
    rs = StreamResampler(in_rate, out_rate, int(pcm.shape[1]))
    out = np.concatenate([rs.process(pcm), rs.flush()])
    return _fit(out, frames)


def decode_segment(fd: int, meta: SegmentMeta, first: int = 0,
                   last: int | None = None) -> NDArray[Any]:
    """Frames ``[first, last)`` of a segment file (open as `fd`) at ``meta.rate``,
    as ``(frames, meta.channels)``; by default the whole segment.

    Only that part is decoded and held (a file salvaged past damage is decoded
    from its start): WAV is read from `first` on, FLAC and Opus seek to it
    (reading the file as the decoder asks: a storage error is a
    SegmentUnreadable, never a crash). WAV and FLAC keep the capture's integers
    exactly (int16, or int32); Opus is float32, decoded at 48 kHz from a little
    before `first` (so the decoder and the resampler have settled) and brought
    back to the segment's rate.

    Raises:
        SegmentUnreadable: the file cannot be decoded.
    """
    last = meta.frames if last is None else last
    frames = last - first
    if first > 0 and any(g.reason == "damage" for g in meta.gaps):
        # Salvaged past damage: the file's own positions run on across the hole,
        # so a seek would land late. Decode from the start and keep the part.
        return decode_segment(fd, meta, 0, last)[first:]
    try:
        with open(fd, "rb", closefd=False) as f:
            f.seek(0)
            if meta.format == "wav":
                pcm, _rate = read_wav(f, start=first, frames=frames)
            elif meta.format == "flac":
                pcm = decode_ogg_flac(f, meta.sample_format, first=first, last=last)
            elif meta.format == "opus":
                pcm = _decode_opus_part(f, meta.rate, first, last)
            else:
                raise SegmentUnreadable(f"unknown segment format {meta.format!r}")
    except (OpusError, FlacError, ValueError, OSError) as exc:
        raise SegmentUnreadable(str(exc)) from exc
    if len(pcm) == 0:  # nothing there (a salvaged file ends earlier): silence
        pcm = np.zeros((0, meta.channels), dtype=pcm.dtype)
    if pcm.ndim != 2 or pcm.shape[1] != meta.channels:
        raise SegmentUnreadable(f"decoded shape {pcm.shape} does not match "
                                f"{meta.channels} channel(s)")
    return _fit(pcm, frames)


def _decode_opus_part(f: BinaryIO, rate: int, first: int, last: int) -> NDArray[Any]:
    """Frames ``[first, last)`` at `rate` of an Ogg Opus segment captured at `rate`.

    Decoding (always at 48 kHz) starts `_OPUS_LEAD_IN` early, so the decoder
    and the resampler have settled by `first`, and on a 48 kHz frame that falls
    exactly on a frame at `rate`, so the part lines up with a whole decode to
    the sample (a 44.1 kHz frame meets a 48 kHz one every 160 of the latter).
    """
    step = DECODE_RATE // math.gcd(DECODE_RATE, rate)
    start = max(0, (first * DECODE_RATE // rate - _OPUS_LEAD_IN) // step * step)
    stop = -(-last * DECODE_RATE // rate) + _OPUS_LEAD_IN
    pcm = decode_ogg_opus(f, start=start, frames=stop - start).pcm
    if rate != DECODE_RATE:
        rs = StreamResampler(DECODE_RATE, rate, int(pcm.shape[1]))
        pcm = np.concatenate([rs.process(pcm), rs.flush()])
    skip = first - start * rate // DECODE_RATE
    return pcm[skip : skip + last - first]



def windows(piece: SegmentPiece, rate: int) -> Iterator[SegmentPiece]:
    """The piece in parts of `_SEGMENT_WINDOW_SECONDS`, decoded one at a time so a
    long segment is never in memory whole. A segment at another rate than the
    ring's is converted in one go (its resampler runs across the whole piece)."""
    step = round(_SEGMENT_WINDOW_SECONDS * piece.meta.rate)
    if piece.meta.rate != rate or piece.last - piece.first <= step:
        yield piece
        return
    for a in range(piece.first, piece.last, step):
        b = min(a + step, piece.last)
        yield dataclasses.replace(piece, first=a, last=b, frames=b - a,
                                  utc=piece.utc + (a - piece.first) / piece.meta.rate)
