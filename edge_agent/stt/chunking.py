"""Chunking: a stream of capture frames becomes chunks of 16-bit mono PCM.

Owns `Cut` (one chunk's PCM and where it starts), the `Chunker` protocol with its
two kinds, `FixedChunker` (a chunk every N seconds) and `VadChunker` (chunks cut
at pauses in speech, silence never sent), `make_chunker` (the one `[stt]` asks
for), and `StreamCutter`, which mixes down and resamples one stream of ring
frames to the STT rate before chunking it. All synchronous: values in, values
out, no Trio and no I/O.

Part of the `stt` stage. Imports only the bottom layer (`audio`, `config`) and
its sibling `vad`; never agent, another stage, metrics or api.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from ..audio.pcm import SampleFormat, from_float32, mix_down
from ..audio.resample import StreamResampler
from ..config import SttConfig
from .vad import Vad, make_vad

__all__ = [
    "Chunker",
    "Cut",
    "FixedChunker",
    "StreamCutter",
    "VadChunker",
    "make_chunker",
]


@dataclass(frozen=True, slots=True)
class Cut:
    """One chunk's PCM at the STT rate and where it starts (samples since the
    stream began); `voiced` is how much of it the VAD judged speech."""

    pcm: NDArray[np.int16]
    start: int
    voiced: float


class Chunker(Protocol):
    """Turns a stream of 16-bit mono PCM into chunks."""

    skipped_samples: int  # silence never put into a chunk
    discarded: int  # chunks cut but not worth sending (a click, a cough)

    def feed(self, pcm: NDArray[np.int16]) -> list[Cut]: ...

    def flush(self) -> list[Cut]:
        """End the stream: return what is pending and start again at sample 0."""
        ...

    @property
    def pending_samples(self) -> int: ...


class FixedChunker:
    """A chunk every `seconds` of audio, speech or not."""

    def __init__(self, rate: int, seconds: float) -> None:
        self.rate = rate
        self.size = max(1, round(seconds * rate))
        self.skipped_samples = 0
        self.discarded = 0
        self._parts: list[NDArray[np.int16]] = []
        self._pending = 0
        self._pos = 0  # stream position of the first pending sample

    @property
    def pending_samples(self) -> int:
        return self._pending

    def feed(self, pcm: NDArray[np.int16]) -> list[Cut]:
        if len(pcm):
            self._parts.append(pcm)
            self._pending += len(pcm)
        out: list[Cut] = []
        while self._pending >= self.size:
            data = np.concatenate(self._parts)
            out.append(Cut(data[: self.size].copy(), self._pos, self.size / self.rate))
            rest = data[self.size :]
            self._parts = [rest] if len(rest) else []
            self._pending = len(rest)
            self._pos += self.size
        return out

    def flush(self) -> list[Cut]:
        out: list[Cut] = []
        if self._pending:
            data = np.concatenate(self._parts)
            out.append(Cut(data, self._pos, len(data) / self.rate))
        self._parts, self._pending, self._pos = [], 0, 0
        return out


class VadChunker:
    """Chunks cut at pauses in speech; silence is never sent.

    A chunk starts at the first frame the VAD calls speech, with `preroll`
    seconds of audio before it (word onsets are quiet). It ends once a pause of
    `silence` seconds follows at least `min_chunk` seconds of audio, keeping up
    to `preroll` seconds of the pause. A shorter utterance is joined with what
    follows within `min_chunk` seconds, else sent alone. A chunk reaching
    `max_chunk` seconds is cut there. Chunks with less than `min_voiced` seconds
    of speech (clicks, coughs) are discarded and counted.
    """

    def __init__(
        self, vad: Vad, *, min_chunk: float, max_chunk: float, silence: float,
        preroll: float, min_voiced: float = 0.15,
    ) -> None:
        self.vad = vad
        self.rate = vad.rate
        self.frame = vad.frame_samples
        per_s = self.rate / self.frame
        self._min = max(1, round(min_chunk * per_s))
        self._max = max(1, round(max_chunk * per_s))
        self._silence = max(1, round(silence * per_s))
        self._hold = max(self._silence, self._min)
        self._roll = max(0, round(preroll * per_s))
        self._min_voiced = max(1, round(min_voiced * per_s))
        self.skipped_samples = 0
        self.discarded = 0
        self._carry: NDArray[np.int16] = np.zeros(0, np.int16)
        self._preroll: deque[NDArray[np.int16]] = deque()
        self._chunk: list[NDArray[np.int16]] = []
        self._start = 0
        self._trailing = 0  # silent frames at the end of the chunk
        self._voiced = 0
        self._pos = 0  # stream position of the next frame

    @property
    def pending_samples(self) -> int:
        return len(self._chunk) * self.frame + len(self._carry)

    def feed(self, pcm: NDArray[np.int16]) -> list[Cut]:
        data = np.concatenate([self._carry, pcm]) if len(self._carry) else pcm
        whole = len(data) // self.frame
        out: list[Cut] = []
        for i in range(whole):
            cut = self._frame_in(data[i * self.frame : (i + 1) * self.frame])
            if cut is not None:
                out.append(cut)
        self._carry = data[whole * self.frame :].copy()
        return out

    def flush(self) -> list[Cut]:
        out: list[Cut] = []
        if self._chunk:
            cut = self._emit(len(self._chunk) - self._trailing + min(self._trailing, self._roll))
            if cut is not None:
                out.append(cut)
        self.skipped_samples += sum(len(f) for f in self._preroll) + len(self._carry)
        self._preroll.clear()
        self._carry = np.zeros(0, np.int16)
        self._pos = 0
        return out

    def _frame_in(self, frame: NDArray[np.int16]) -> Cut | None:
        speech = self.vad.is_speech(frame)
        pos = self._pos
        self._pos += self.frame
        if not self._chunk:
            if not speech:
                self._preroll.append(frame)
                if len(self._preroll) > self._roll:
                    self.skipped_samples += len(self._preroll.popleft())
                return None
            self._chunk = [*self._preroll, frame]
            self._start = pos - len(self._preroll) * self.frame
            self._preroll.clear()
            self._trailing, self._voiced = 0, 1
            return None
        self._chunk.append(frame)
        if speech:
            self._trailing = 0
            self._voiced += 1
        else:
            self._trailing += 1
        spoken = len(self._chunk) - self._trailing
        pause = self._trailing >= self._silence
        if pause and (spoken >= self._min or self._trailing >= self._hold):
            return self._emit(spoken + min(self._trailing, self._roll))
        if len(self._chunk) >= self._max:
            return self._emit(len(self._chunk))
        return None

    def _emit(self, keep: int) -> Cut | None:
        """Send the first `keep` frames of the chunk; the rest is silence that may
        become the next chunk's preroll."""
        frames, rest = self._chunk[:keep], self._chunk[keep:]
        start, voiced = self._start, self._voiced
        self._chunk, self._trailing, self._voiced = [], 0, 0
        for f in rest:
            self._preroll.append(f)
            if len(self._preroll) > self._roll:
                self.skipped_samples += len(self._preroll.popleft())
        if voiced < self._min_voiced:
            self.discarded += 1
            self.skipped_samples += sum(len(f) for f in frames)
            return None
        return Cut(np.concatenate(frames), start, voiced * self.frame / self.rate)


def make_chunker(cfg: SttConfig, vad: Vad | None = None) -> Chunker:
    """The chunker `cfg.chunking` asks for (a given `vad` replaces the configured one)."""
    if cfg.chunking == "fixed":
        return FixedChunker(cfg.rate, cfg.chunk_seconds)
    detector = vad or make_vad(cfg.vad, cfg.rate, aggressiveness=cfg.vad_aggressiveness)
    return VadChunker(detector, min_chunk=cfg.min_chunk_seconds,
                      max_chunk=cfg.max_chunk_seconds, silence=cfg.vad_silence_seconds,
                      preroll=cfg.vad_preroll_seconds)


class StreamCutter:
    """One stream of ring frames turned into cuts: mixed down to mono, resampled
    from `in_rate` (the ring's) to `out_rate` (the STT rate) and chunked.

    A stream opens at the first frames fed and ends with `end`, which returns
    what is pending; a stream never spans a capture gap or an overrun (the
    caller ends it there and starts a new cutter).
    """

    def __init__(self, chunker: Chunker, in_rate: int, out_rate: int) -> None:
        self.chunker = chunker
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._resampler = StreamResampler(in_rate, out_rate, 1)
        self.base = 0  # ring index of the stream's first sample
        self.open = False
        self._skipped_seen = 0
        self._discarded_seen = 0

    @property
    def pending_samples(self) -> int:
        return self.chunker.pending_samples

    def feed(self, frames: NDArray[Any], start: int) -> list[Cut]:
        """Frames read from the ring at index `start`; returns the cuts completed."""
        if not len(frames):
            return []
        if not self.open:
            self.base, self.open = start, True
        mono = mix_down(frames, 1)
        pcm = from_float32(self._resampler.process(mono)[:, 0], SampleFormat.INT16)
        return self.chunker.feed(pcm)

    def end(self) -> list[Cut]:
        """Flush the resampler and the chunker: what the stream still holds."""
        if not self.open:
            return []
        tail = self._resampler.flush()
        cuts = self.chunker.feed(from_float32(tail[:, 0], SampleFormat.INT16))
        return cuts + self.chunker.flush()

    def ring_index(self, cut: Cut) -> int:
        """The ring index of a cut's first sample."""
        return self.base + round(cut.start * self.in_rate / self.out_rate)

    def take_counts(self) -> tuple[int, int]:
        """(samples skipped, chunks discarded) by the chunker since the last call."""
        ch = self.chunker
        skipped = ch.skipped_samples - self._skipped_seen
        discarded = ch.discarded - self._discarded_seen
        self._skipped_seen, self._discarded_seen = ch.skipped_samples, ch.discarded
        return skipped, discarded
