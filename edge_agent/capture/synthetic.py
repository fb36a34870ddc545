"""Sources that are not a device: `ToneSource` (a sine, for demos and tests) and
`FileSource` (a WAV file, paced at real time or as fast as possible).

Each makes its audio in a plain generator of blocks; `_deliver` stamps and paces
them. Paced at real time for an agent's ring (``demand`` given) by a clock whose
time passes by itself, a thread of the source's own delivers them through a
`BlockHandoff`, as PortAudio's callback does, so the agent wakes as it would
with a microphone: once per reader batch. Otherwise (no ring, as with
``edge-agent levels``; a test's clock; as fast as possible) Trio paces them.

Part of the `capture` stage. Imports only the bottom layer (`audio`, `clock`)
and its sibling `source`; never agent, another stage, metrics or api.
"""

from __future__ import annotations

import math
import threading
import wave
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import trio
from numpy.typing import NDArray

from ..audio.pcm import SampleFormat, from_float32, mix_down, numpy_dtype, unpack_int24
from ..audio.resample import StreamResampler
from ..clock import Clock
from .handoff import BlockHandoff, Demand, QueuedBlocks
from .source import Block, BlockStream, CaptureError, SourceStats

__all__ = ["FileSource", "ToneSource"]


class _Pacer:
    """Timestamps and (optionally) real-time pacing for generated audio.

    Timestamps follow the sample count from the moment of opening, so a source
    run as fast as possible yields a consistent virtual timeline.
    """

    def __init__(self, clock: Clock, rate: int, realtime: bool) -> None:
        self.clock = clock
        self.rate = rate
        self.realtime = realtime
        self.utc0 = clock.utc()
        self.mono0 = clock.mono()
        self.trio0 = trio.current_time()
        self.position = 0

    async def stamp(self, frames: int) -> tuple[float, float]:
        """Times of the next block; in real-time mode wait until it is 'captured'.

        The monotonic time follows the sample count; UTC is that plus the wall
        clock's offset *now*, so a wall-clock step (NTP) shows in the stamps as it
        would with a real device, while the sample timeline stays continuous.
        """
        offset = self.position / self.rate
        self.position += frames
        if self.realtime:
            await trio.sleep_until(self.trio0 + self.position / self.rate)
        else:
            await trio.lowlevel.checkpoint()
        step = (self.clock.utc() - self.clock.mono()) - (self.utc0 - self.mono0)
        return self.utc0 + offset + step, self.mono0 + offset


@dataclass
class ToneSource:
    """A sine wave at `tone_hz` and `dbfs`, forever or for `seconds`."""

    rate: int
    channels: int
    format: SampleFormat
    clock: Clock
    block_ms: int = 20
    tone_hz: float = 440.0
    dbfs: float = -20.0
    seconds: float = 0.0
    realtime: bool = True
    stats: SourceStats = field(default_factory=SourceStats)
    demand: Demand | None = None

    def open(self) -> BlockStream:
        return _deliver(self, self._frames(), self.realtime, self.demand)

    def _frames(self) -> Iterator[NDArray[Any]]:
        block = max(1, self.rate * self.block_ms // 1000)
        total = round(self.seconds * self.rate) if self.seconds > 0 else None
        amplitude = 10 ** (self.dbfs / 20)
        step = 2 * math.pi * self.tone_hz / self.rate
        position = 0
        while total is None or position < total:
            n = block if total is None else min(block, total - position)
            phase = step * (position + np.arange(n))
            mono = (amplitude * np.sin(phase)).astype(np.float32)
            yield from_float32(np.repeat(mono[:, None], self.channels, axis=1), self.format)
            position += n


@dataclass
class FileSource:
    """A WAV file delivered in capture blocks, converted to the capture format.

    The file is read block by block (memory does not depend on its length) and
    resampled with libsoxr when its rate differs from the capture rate.
    """

    path: Path
    rate: int
    channels: int
    format: SampleFormat
    clock: Clock
    block_ms: int = 20
    realtime: bool = True
    loop: bool = False
    stats: SourceStats = field(default_factory=SourceStats)
    demand: Demand | None = None

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.describe()  # fail early, with the reason, on a file we cannot read

    def describe(self) -> tuple[int, int, int]:
        """(rate, channels, bytes per sample) of the file; CaptureError if unusable."""
        try:
            with wave.open(str(self.path), "rb") as w:
                params = w.getparams()
        except FileNotFoundError:
            raise CaptureError(f"{self.path}: no such file") from None
        except (wave.Error, EOFError, OSError) as exc:
            raise CaptureError(f"{self.path}: not a PCM WAV file ({exc})") from None
        if params.sampwidth not in (2, 3, 4) or params.comptype != "NONE":
            raise CaptureError(
                f"{self.path}: unsupported WAV sample width {8 * params.sampwidth} bits; "
                "expected 16, 24 or 32-bit PCM"
            )
        return params.framerate, params.nchannels, params.sampwidth

    def open(self) -> BlockStream:
        return _deliver(self, self._frames(), self.realtime, self.demand)

    def _frames(self) -> Iterator[NDArray[Any]]:
        file_rate, file_channels, width = self.describe()
        in_block = max(1, file_rate * self.block_ms // 1000)
        resampler = (
            StreamResampler(file_rate, self.rate, self.channels) if file_rate != self.rate else None
        )
        while True:
            with wave.open(str(self.path), "rb") as w:
                while raw := w.readframes(in_block):
                    block = self._convert(raw, width, file_channels, resampler)
                    if len(block):
                        yield block
            if not self.loop:
                break
        if resampler is not None:
            tail = resampler.flush()
            if len(tail):
                yield from_float32(tail, self.format)

    def _convert(
        self, raw: bytes, width: int, file_channels: int, resampler: StreamResampler | None
    ) -> NDArray[Any]:
        if width == 3:
            samples: NDArray[Any] = unpack_int24(raw, file_channels)
        else:
            dtype = np.dtype("<i2") if width == 2 else np.dtype("<i4")
            samples = np.frombuffer(raw, dtype=dtype).reshape(-1, file_channels)
        if resampler is None and file_channels == self.channels and (
                (width, self.format) in ((2, SampleFormat.INT16), (4, SampleFormat.INT32))):
            return samples.astype(samples.dtype.newbyteorder("="))  # already the capture format
        mixed = mix_down(samples, self.channels)
        if resampler is not None:
            mixed = resampler.process(mixed)
        return from_float32(mixed, self.format)


class _Generated(Protocol):
    rate: int
    channels: int
    format: SampleFormat
    clock: Clock
    block_ms: int
    stats: SourceStats


@asynccontextmanager
async def _deliver(source: _Generated, frames: Iterator[NDArray[Any]], realtime: bool,
                   demand: Demand | None) -> AsyncIterator[AsyncIterator[Block]]:
    """Open: the blocks `frames` makes, stamped and paced (see the module docstring)."""
    source.stats.opens += 1
    if realtime and demand is not None and source.clock.real_time:
        stop = threading.Event()
        try:
            yield _from_thread(source, frames, demand, stop)
        finally:
            stop.set()
    else:
        yield _paced_by_trio(source, frames, realtime)


async def _paced_by_trio(source: _Generated, frames: Iterator[NDArray[Any]],
                         realtime: bool) -> AsyncIterator[Block]:
    pacer = _Pacer(source.clock, source.rate, realtime)
    for data in frames:
        utc, mono = await pacer.stamp(len(data))
        source.stats.blocks += 1
        source.stats.frames += len(data)
        yield Block(data, utc, mono)


def _from_thread(source: _Generated, frames: Iterator[NDArray[Any]], demand: Demand,
                 stop: threading.Event) -> QueuedBlocks:
    """The blocks, made and paced at real time by a thread of their own and handed
    over as a capture device's callback does; the thread ends at `stop`."""
    block = max(1, source.rate * source.block_ms // 1000)
    handoff = BlockHandoff(slots=max(64, round(10 * source.rate / block)),
                           block_frames=2 * block + 64, channels=source.channels,
                           dtype=numpy_dtype(source.format), stats=source.stats,
                           demand=demand, max_hold_frames=source.rate)
    clock = source.clock

    def produce() -> None:
        utc0, mono0, position = clock.utc(), clock.mono(), 0
        try:
            for data in frames:
                offset = position / source.rate
                position += len(data)
                if stop.wait(max(0.0, mono0 + position / source.rate - clock.mono())):
                    return
                step = (clock.utc() - clock.mono()) - (utc0 - mono0)
                handoff.put(data, utc0 + offset + step, mono0 + offset)
            handoff.finish()
        except trio.RunFinishedError:
            return  # the agent has exited

    threading.Thread(target=produce, name="edge-agent-source", daemon=True).start()
    return QueuedBlocks(handoff, lambda: not (handoff.finished and not handoff.queued))
