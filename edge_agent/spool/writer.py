"""The open segment: encoded audio appended to ``tmp/<id>/``, fsynced on schedule.

Owns `SegmentWriter`: appends what the encoder (`audio.encoders.make_encoder`)
produces, fsyncs every ``segments.fsync_seconds`` (of time or of audio written,
whichever comes first), writes the encoder's durable
marks after each fsync (WAV sizes: what that fsync made durable), and finishes the
file for sealing. An fsync that failed is never retried on the same descriptor.
Synchronous: the segmenter calls it from its worker thread.

Imports only the bottom layer (``audio``, ``fs``, the spool's ``model``); never
agent or another stage.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from numpy.typing import NDArray

from ..audio.encoders import StreamEncoder
from ..fs import FileOps
from .model import FORMATS, SegmentHeader, SpoolError

__all__ = ["SegmentWriter"]


class SegmentWriter:
    """One segment being recorded into ``tmp/<id>/``; made by :meth:`Spool.open_segment`.

    Not thread-safe: one thread at a time (the segmenter's worker).

    Args:
        fs: The spool's file operations.
        seg_dir: ``tmp/<id>``.
        header: What ``open.json`` holds.
        encoder: Turns PCM into the bytes of the audio file.
        fsync_seconds: Most time, and most audio, between fsyncs while writing.
        on_fsync_failure: Called when an fsync fails (the spool counts them).
    """

    def __init__(self, fs: FileOps, seg_dir: Path, header: SegmentHeader,
                 encoder: StreamEncoder, fsync_seconds: float, *,
                 on_fsync_failure: Callable[[], None] = lambda: None) -> None:
        self.fs = fs
        self.header = header
        self.id = header.id
        self.dir = seg_dir
        self.audio = self.dir / FORMATS[header.format][0]
        self.frames = 0
        self.bytes = 0
        self.unsynced = False
        self._enc = encoder
        self._fd: int | None = None
        self._fsync_failed = False
        self._fsync_seconds = fsync_seconds
        self._on_fsync_failure = on_fsync_failure
        self._last_sync: float | None = None
        self._synced_frames = 0  # frames written at the last fsync
        self._fsync_frames = max(1, round(fsync_seconds * header.rate))
        self._durable_marks: list[tuple[int, bytes]] = []
        self.published = False  # renamed into sealed/ (maybe not yet durable)
        self.closed = False

    def _append(self, data: bytes) -> None:
        if not data:
            return
        if self._fd is None:
            raise SpoolError(f"segment {self.id} is not open")
        self.fs.write(self._fd, data, str(self.audio))
        self.bytes += len(data)
        self.unsynced = True

    def open(self, now: float) -> None:
        """Create the audio file with the encoder's first bytes, durable."""
        self._fd = self.fs.create(self.audio)
        self._append(self._enc.start())
        self.sync(now)

    def write(self, pcm: NDArray[Any], now: float) -> None:
        """Encode ``pcm`` and append the bytes produced; fsync when one is due.

        ``now`` is a monotonic time in seconds (Trio's clock in the agent). Counting
        audio as well as time makes a batch of ``fsync_seconds`` of audio durable
        in the same trip, however the capture's timing jitters.
        """
        if len(pcm):
            self._append(self._enc.write(pcm))
            self.frames += int(pcm.shape[0])
        if (self._last_sync is None or now - self._last_sync >= self._fsync_seconds
                or self.frames - self._synced_frames >= self._fsync_frames):
            self.sync(now)

    def sync(self, now: float, *, flush_encoder: bool = False) -> None:
        """Make everything appended so far durable.

        An fsync that failed is never retried on the same descriptor: the kernel may
        already have dropped the pages it could not write, so a second fsync would
        report success for data that is gone. The segment must be abandoned.
        """
        if flush_encoder:
            self._append(self._enc.flush())
        if self._fsync_failed:
            raise OSError(errno.EIO, f"an earlier fsync of segment {self.id} failed")
        if self._fd is None:
            raise SpoolError(f"segment {self.id} is not open")
        if self.unsynced or self._last_sync is None:
            try:
                self.fs.fsync(self._fd, str(self.audio))
            except OSError:
                self._fsync_failed = True
                self._on_fsync_failure()
                raise
            self.unsynced = False
            patches = self._enc.after_sync(self.bytes)
            if patches and patches != self._durable_marks:
                for offset, data in patches:
                    self.fs.pwrite(self._fd, data, offset, str(self.audio))
                self._durable_marks = patches
                self.unsynced = True  # the marks themselves become durable next time
        self._last_sync = now
        self._synced_frames = self.frames

    def finish(self) -> None:
        """Append the encoder's last bytes and patches, sync, and close the file."""
        fs = self.fs
        if self._fd is None or self.closed:
            raise SpoolError(f"segment {self.id} is not open (an earlier seal failed)")
        tail, patches = self._enc.finish()
        self._append(tail)
        assert self._fd is not None
        for offset, data in patches:
            fs.pwrite(self._fd, data, offset, str(self.audio))
            self.unsynced = True
        self.sync(self._last_sync or 0.0)
        if self.unsynced:  # marks of what the sync made durable (WAV sizes)
            self.sync(self._last_sync or 0.0)
        fd, self._fd = self._fd, None
        fs.close(fd, str(self.audio))

    def close(self) -> None:
        """Release the descriptor and encoder without syncing (after a failure)."""
        self.closed = True
        self._enc.close()
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
