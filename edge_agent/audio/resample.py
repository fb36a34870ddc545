"""Band-limited sample-rate conversion through libsoxr (``soxr``), SoX's resampler.

The STT service wants 16 kHz while microphones deliver 44.1/48 kHz. Linear
interpolation folds everything above the new Nyquist back into the speech band
(it rejects a 10 kHz tone by ~0 dB going 48k -> 16k), so the agent always uses
soxr's band-limited converters. :func:`linear_interpolation` exists only as
the naive comparison point for tests and benchmarks.

Measured on this code (10 kHz full-scale tone, 48 kHz -> 16 kHz, see
:func:`alias_rejection_db`; CPU for mono in 0.5 s blocks): VHQ 165 dB and
0.8 CPU s per audio hour, HQ 137 dB and 0.5 s, MQ 119 dB and 0.5 s, linear
interpolation ~0 dB. libsamplerate's sinc_fastest, the default before, gave
101 dB for about 10 CPU s per audio hour. VHQ is the default: its cost is
within a CPU second per audio hour of the others', and over 12 slightly shifted
copies of the STT test's speech pocketsphinx understood it best (mean word
accuracy 0.81, against 0.77 for HQ and 0.75 for sinc_fastest).

The price is latency: soxr filters in blocks, so a stream's output lags its
input by about 80 ms at 16 kHz (VHQ; 155 ms at 8 kHz), where libsamplerate's
lagged by 1-2 ms.

Part of ``audio/``: no Trio; imports only ``audio.pcm``.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Final

import numpy as np
import soxr
from numpy.typing import NDArray

from .pcm import to_float32

__all__ = [
    "CONVERTERS",
    "DEFAULT_CONVERTER",
    "StreamResampler",
    "alias_rejection_db",
    "linear_interpolation",
    "resample",
]

logger = logging.getLogger(__name__)

#: soxr's qualities, best (slowest) first. "LQ" and "QQ" are deliberately absent.
CONVERTERS: Final = ("VHQ", "HQ", "MQ")
#: The best of them for about the others' CPU (see the module docstring).
DEFAULT_CONVERTER: Final = "VHQ"

# soxr takes any ratio, but the time to design its filter grows with it (about
# a second at 65536:1). The agent converts between 8 and 192 kHz at most.
_MAX_RATIO = 256


def _as_frames(x: NDArray[Any], channels: int) -> NDArray[np.float32]:
    """Convert a block to float32 ``(frames, channels)``, validating its shape."""
    f = to_float32(x)
    if f.ndim == 1:
        if channels != 1:
            raise ValueError(f"got a 1-D block but the resampler has {channels} channels")
        return f.reshape(-1, 1)
    if f.ndim != 2 or f.shape[1] != channels:
        raise ValueError(f"expected a (frames, {channels}) block, got shape {x.shape}")
    return f


@functools.lru_cache(maxsize=64)
def _lag(in_rate: int, out_rate: int, converter: str) -> int:
    """Output frames a stream holds back so that its output keeps pace with its input.

    soxr filters in blocks: a call returns nothing, or a block's worth at once
    (48 kHz -> 16 kHz at HQ, fed 20 ms blocks: 0 or ~490 frames where 320 are
    due). Holding back as much as soxr ever does makes every block's output the
    block's length at the new rate. A second of zeros streamed through a probe in
    small steps finds about that much; one step's worth covers what falls
    between steps.
    """
    probe = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality=converter)
    step = 64
    zeros = np.zeros(step, np.float32)
    fed = produced = 0
    worst = 0.0
    while fed < in_rate:
        produced += probe.resample_chunk(zeros).shape[0]
        fed += step
        worst = max(worst, fed * out_rate / in_rate - produced)
    return math.ceil(worst + step * out_rate / in_rate)


class StreamResampler:
    """Resample a stream block by block, keeping filter state between blocks.

    Feeding a signal in many small blocks and then calling :meth:`flush`
    yields the same samples (to float rounding) as one call on the whole
    signal, and ``floor(n_in * out_rate / in_rate)`` frames in total. The
    output lags the input by a fixed number of frames; once that lag is filled,
    each block's output is the block's length at the new rate (to a frame).
    When the rates are equal it only converts to float32 (and may then return
    the caller's own float32 array).

    Not thread-safe; use one instance per stream.

    Args:
        in_rate: input sample rate in Hz.
        out_rate: output sample rate in Hz.
        channels: channels per frame.
        converter: one of :data:`CONVERTERS`.

    Raises:
        ValueError: a rate <= 0, rates more than 256x apart, channels < 1, or an
            unknown converter.
    """

    def __init__(
        self, in_rate: int, out_rate: int, channels: int, converter: str = DEFAULT_CONVERTER
    ) -> None:
        if in_rate <= 0:
            raise ValueError(f"in_rate must be > 0, got {in_rate}")
        if out_rate <= 0:
            raise ValueError(f"out_rate must be > 0, got {out_rate}")
        if max(in_rate, out_rate) > _MAX_RATIO * min(in_rate, out_rate):
            raise ValueError(f"cannot convert {in_rate} Hz to {out_rate} Hz (ratio beyond 256)")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if converter not in CONVERTERS:
            raise ValueError(f"converter must be one of {CONVERTERS}, got {converter!r}")
        self.in_rate: Final = in_rate
        self.out_rate: Final = out_rate
        self.channels: Final = channels
        self.converter: Final = converter
        self._soxr: Any = None
        self._lag = 0
        if in_rate != out_rate:
            self._soxr = soxr.ResampleStream(in_rate, out_rate, channels, dtype="float32",
                                             quality=converter)
            self._lag = _lag(in_rate, out_rate, converter)
        self._held = np.zeros((0, channels), np.float32)
        self._frames_in = 0
        self._frames_out = 0

    @property
    def lag_frames(self) -> int:
        """Output frames the stream holds back: a stream's first output is this much
        shorter than its input at the new rate (0 when the rates are equal)."""
        return self._lag

    def process(self, x: NDArray[Any]) -> NDArray[np.float32]:
        """Resample the next block; returns float32 ``(frames_out, channels)``.

        The output lags the input by a fixed number of frames (the filter's
        delay and soxr's block); :meth:`flush` returns the rest.
        """
        f = _as_frames(x, self.channels)
        self._frames_in += f.shape[0]
        if self._soxr is None:
            self._frames_out += f.shape[0]
            return f
        new: NDArray[np.float32] = self._soxr.resample_chunk(np.ascontiguousarray(f))
        ready = np.concatenate([self._held, new]) if self._held.shape[0] else new
        due = self._owed() - self._lag
        # Should soxr ever hold back more than the probe found, what is missing
        # comes with a later block.
        due = min(max(due, 0), ready.shape[0])
        out, self._held = ready[:due], ready[due:]
        self._frames_out += due
        return out

    def flush(self) -> NDArray[np.float32]:
        """End the stream: return the remaining output and reset for a new stream."""
        try:
            if self._soxr is None:
                return np.zeros((0, self.channels), np.float32)
            end = np.zeros((0, self.channels), np.float32)
            tail = np.concatenate([self._held, self._soxr.resample_chunk(end, last=True)])
            # soxr ends the stream at round(n_in * ratio) frames: one more than
            # the floor we promise when the fraction is >= 1/2, so cut it. Pad
            # with silence should a release ever end short.
            pending = max(self._owed(), 0)
            if tail.shape[0] >= pending:
                return tail[:pending]
            return np.concatenate([tail, np.zeros((pending - tail.shape[0], self.channels),
                                                  np.float32)])
        finally:
            self.reset()

    def _owed(self) -> int:
        """Output frames the input so far makes (the floor) that were not yet returned."""
        return self._frames_in * self.out_rate // self.in_rate - self._frames_out

    def reset(self) -> None:
        """Forget all state, as if freshly constructed."""
        if self._soxr is not None:
            self._soxr.clear()
        self._held = np.zeros((0, self.channels), np.float32)
        self._frames_in = 0
        self._frames_out = 0


def resample(
    x: NDArray[Any], in_rate: int, out_rate: int, converter: str = DEFAULT_CONVERTER
) -> NDArray[np.float32]:
    """Resample a whole signal at once; 1-D input gives 1-D output."""
    channels = 1 if x.ndim == 1 else int(x.shape[1])
    rs = StreamResampler(in_rate, out_rate, channels, converter)
    head = rs.process(x)
    out = np.concatenate([head, rs.flush()])
    return out.reshape(-1) if x.ndim == 1 else out


def linear_interpolation(x: NDArray[Any], in_rate: int, out_rate: int) -> NDArray[np.float32]:
    """Naive linear-interpolation resampling, for comparison only.

    Never use this in the pipeline: it has no anti-aliasing filter. It exists
    so tests and benchmarks can show what the sinc converters buy.
    """
    f = _as_frames(x, 1 if x.ndim == 1 else int(x.shape[1]))
    n_out = f.shape[0] * out_rate // in_rate
    t_out = np.arange(n_out, dtype=np.float64) * (in_rate / out_rate)
    t_in = np.arange(f.shape[0], dtype=np.float64)
    cols = [np.interp(t_out, t_in, f[:, c]) for c in range(f.shape[1])]
    out = np.stack(cols, axis=1).astype(np.float32) if cols else np.zeros((n_out, 0), np.float32)
    return out.reshape(-1) if x.ndim == 1 else out


def alias_rejection_db(
    converter: str,
    in_rate: int = 48000,
    out_rate: int = 16000,
    tone_hz: float = 10000.0,
    seconds: float = 1.0,
) -> float:
    """Measure how far a converter suppresses a tone above the output Nyquist.

    Resamples a full-scale sine at ``tone_hz`` and returns
    ``20*log10(input RMS / output RMS)`` over the middle half of the output,
    away from the filter's start-up and tail. ``converter`` may also be
    ``"linear"`` to measure :func:`linear_interpolation`.
    """
    if tone_hz <= out_rate / 2:
        raise ValueError(f"tone_hz must be above the output Nyquist {out_rate / 2} Hz")
    t = np.arange(round(seconds * in_rate), dtype=np.float64) / in_rate
    tone = np.sin(2 * np.pi * tone_hz * t).astype(np.float32)
    if converter == "linear":
        out = linear_interpolation(tone, in_rate, out_rate)
    else:
        out = resample(tone, in_rate, out_rate, converter)
    mid = out[out.size // 4 : 3 * out.size // 4].astype(np.float64)
    in_rms = float(np.sqrt(np.mean(np.square(tone, dtype=np.float64))))
    out_rms = float(np.sqrt(np.mean(np.square(mid))))
    # A perfect converter can output exact zeros; report a finite 300 dB then.
    return 20.0 * math.log10(in_rms / max(out_rms, in_rms * 1e-15))
