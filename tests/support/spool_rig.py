"""Spool rigs: a segmenter on a real spool under MockClock with injectable disk
faults and kills (`Rig`, `FaultyOps`), and sealed tone segments for uploader tests."""

from __future__ import annotations

import errno
import itertools
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import trio
import trio.testing

from edge_agent.audio.opus import decode_ogg_opus_file
from edge_agent.audio.pcm import read_wav
from edge_agent.blocking import InlineRunner
from edge_agent.clock import ManualClock
from edge_agent.config import SegmentsConfig
from edge_agent.fs import FileOps
from edge_agent.ring import AudioRing
from edge_agent.spool import Segmenter, Spool
from edge_agent.supervisor import Backoff
from edge_agent.wire import (
    SegmentMeta,
)

UTC0 = 1_800_000_003.0  # 3 s past a multiple of 5 s and of 60 s


MONO0 = 1000.0


class Kill(BaseException):
    """Stands for the process dying at that instant: nothing after it runs."""


class FaultyOps(FileOps):
    """The real file operations, counted, with faults on demand.

    ``fail_at=N`` makes the N-th operation fail (``mode="fail"``: EIO) or kill the
    process (``"kill"``, ``"powercut"``: every later operation raises `Kill` too).
    ``fail_when(op, path)`` may return an exception to raise for any operation.
    ``fake_fsync`` skips the real fsync (the crash tests model the page cache
    themselves) but still tracks what each fsync made durable, so `power_cut` can
    drop what was not.
    """

    def __init__(self, *, fail_at: int | None = None, mode: str = "fail",
                 fail_when: Callable[[str, str], BaseException | None] | None = None,
                 fake_fsync: bool = False) -> None:
        self.fail_at = fail_at
        self.mode = mode
        self.fail_when = fail_when
        self.fake_fsync = fake_fsync
        self.calls = 0
        self.ops: list[tuple[str, str]] = []
        self.dead = False
        self.fired: tuple[str, str] | None = None
        self.durable: dict[str, int] = {}  # path -> size at its last fsync
        self.written: set[str] = set()
        # Every fsync as (which opened file, succeeded); fd numbers are reused, so each
        # create/open gets a generation number of its own.
        self.fsyncs: list[tuple[int, bool]] = []
        self._generation: dict[int, int] = {}

    def before(self, op: str, path: str) -> None:
        if self.dead:
            raise Kill(f"dead before {op} {path}")
        self.calls += 1
        self.ops.append((op, path))
        if self.fail_when is not None and (exc := self.fail_when(op, path)) is not None:
            raise exc
        if self.calls == self.fail_at:
            self.fired = (op, path)
            if self.mode == "fail":
                raise OSError(errno.EIO, f"injected EIO at {op}", path)
            self.dead = True
            raise Kill(f"killed at {op} {path}")

    def create(self, path: Path) -> int:
        fd = super().create(path)
        self._generation[fd] = self.calls
        return fd

    def open_rw(self, path: Path) -> int:
        fd = super().open_rw(path)
        self._generation[fd] = self.calls
        return fd

    def write(self, fd: int, data: bytes, path: str = "") -> None:
        self.written.add(path)
        super().write(fd, data, path)

    def pwrite(self, fd: int, data: bytes, offset: int, path: str = "") -> None:
        self.written.add(path)
        super().pwrite(fd, data, offset, path)

    def fsync(self, fd: int, path: str = "") -> None:
        generation = self._generation.get(fd, -1)
        try:
            if self.fake_fsync:
                self.before("fsync", path)
            else:
                super().fsync(fd, path)
        except OSError:
            self.fsyncs.append((generation, False))
            raise
        self.fsyncs.append((generation, True))
        self.durable[path] = os.fstat(fd).st_size

    def fsync_dir(self, path: Path) -> None:
        if self.fake_fsync:
            self.before("fsync_dir", str(path))
        else:
            super().fsync_dir(path)

    def power_cut(self) -> None:
        """Lose what no fsync covered: each written file keeps its fsynced prefix plus a
        torn half of the rest whose last bytes never reached the disk (zeros)."""
        for name in self.written:
            path = Path(name)
            if not path.exists():
                continue  # renamed since; its new name was fsynced where it matters
            size = path.stat().st_size
            keep = self.durable.get(name, 0)
            if size <= keep:
                continue
            torn = keep + (size - keep) // 2
            with path.open("r+b") as f:
                f.truncate(torn)
                zeros = min(512, torn - keep)
                f.seek(torn - zeros)
                f.write(b"\0" * zeros)


def signal_at(start: int, count: int, rate: int) -> np.ndarray:
    """A deterministic, non-trivial mono int16 signal for absolute frames start...start+count."""
    n = np.arange(start, start + count, dtype=np.float64)
    x = 0.3 * np.sin(2 * np.pi * 440 * n / rate) + 0.2 * np.sin(2 * np.pi * 97 * n / rate)
    return (x * 32767).astype(np.int16).reshape(-1, 1)


class Rig:
    """A ring fed with a known signal on a controllable timeline, a spool and a segmenter."""

    def __init__(self, root: Path, *, fmt: str = "opus", seconds: int = 5, rate: int = 8000,
                 ring_seconds: float = 60, fs: FileOps | None = None, utc0: float = UTC0,
                 **cfg: Any) -> None:
        self.rate = rate
        self.clock = ManualClock(utc_now=utc0, mono_now=MONO0)
        self.config = SegmentsConfig(seconds=seconds, format=fmt, **cfg)
        self.ring = AudioRing(rate=rate, channels=1, dtype="int16", seconds=ring_seconds)
        self.root = root
        self.fs = fs
        self.spool = self.new_spool()
        self.segmenter = Segmenter(self.ring, self.spool, self.config, runner=InlineRunner(),
                                   backoff=Backoff(initial=1.0, maximum=4.0, jitter=0.0))
        self.utc0 = utc0
        self.t = 0.0  # seconds of timeline since utc0 (audio and holes)
        self.step = 0.0  # wall-clock steps so far
        self.fed: list[np.ndarray] = []

    def new_spool(self, fs: FileOps | None = None) -> Spool:
        return Spool(self.root, device_id="dev-1", config=self.config, clock=self.clock,
                     fs=fs if fs is not None else self.fs)

    def write_block(self, frames: int) -> None:
        block = signal_at(self.ring.head, frames, self.rate)
        self.clock.utc_now = self.utc0 + self.t + self.step
        self.clock.mono_now = MONO0 + self.t
        self.ring.write(block, utc=self.clock.utc_now, mono=self.clock.mono_now, synced=True)
        self.fed.append(block)
        self.t += frames / self.rate

    async def feed(self, seconds: float, *, block_ms: int = 20, paced: bool = True,
                   between: Callable[[], Any] | None = None) -> None:
        frames = self.rate * block_ms // 1000
        for _ in range(round(seconds * 1000 / block_ms)):
            self.write_block(frames)
            if between is not None:
                between()
            if paced:
                await trio.sleep(block_ms / 1000)
            else:
                await trio.lowlevel.checkpoint()

    def fed_signal(self) -> np.ndarray:
        return np.concatenate(self.fed) if self.fed else np.zeros((0, 1), np.int16)


def decoded_frames(meta: SegmentMeta, path: Path) -> np.ndarray:
    """The segment's audio as int16 at its rate (WAV, FLAC via ffmpeg) or float (Opus)."""
    if meta.format == "wav":
        samples, rate = read_wav(path)
        assert rate == meta.rate
        return samples
    if meta.format == "flac":
        out = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "s16le", "-"],
                             capture_output=True, check=True).stdout
        return np.frombuffer(out, dtype="<i2").reshape(-1, meta.channels)
    decoded = decode_ogg_opus_file(path)
    return decoded.pcm


def assert_clean(root: Path) -> None:
    assert os.listdir(root / "tmp") == []
    assert os.listdir(root / "trash") == []


DEVICE = "dev-7"
RATE = 16000  # of the tone segments `seal` records
_starts = itertools.count()


def open_spool(root: Path, fs: FileOps | None = None, **segments: Any) -> Spool:
    config = SegmentsConfig(**{"seconds": 5, "min_free_mb": 0, **segments})
    spool = Spool(root, device_id=DEVICE, config=config, clock=ManualClock(), fs=fs)
    spool.recover()
    return spool


def seal(spool: Spool, seconds: float = 2.0, start_ts: float | None = None) -> SegmentMeta:
    """Record and seal one segment of a tone (unique per call) into `spool`."""
    n = next(_starts)
    start = 1_900_000_000.0 + 10 * n if start_ts is None else start_ts
    t = np.arange(int(seconds * RATE)) / RATE
    pcm = (np.sin(2 * np.pi * (300 + 7 * n) * t) * 8000).astype(np.int16)[:, None]
    writer = spool.open_segment(start_ts=start, mono_start=100.0 + 10 * n, rate=RATE,
                                channels=1, sample_format="int16", clock_synced=True)
    writer.write(pcm, 0.0)
    return spool.seal(writer)
