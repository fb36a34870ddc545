"""Band-limited sample-rate conversion through libsamplerate (``samplerate``).

The STT service wants 16 kHz while microphones deliver 44.1/48 kHz. Linear
interpolation folds everything above the new Nyquist back into the speech band
(it rejects a 10 kHz tone by ~0 dB going 48k -> 16k), so the agent always uses
libsamplerate's windowed-sinc converters. :func:`linear_interpolation` exists
only as the naive comparison point for tests and benchmarks.

Measured on this code (10 kHz full-scale tone, 48 kHz -> 16 kHz, see
:func:`alias_rejection_db`): sinc_best 152 dB, sinc_medium 122 dB,
sinc_fastest 101 dB, linear interpolation ~0 dB. sinc_fastest clears the
90 dB bar and costs about 1/7 of sinc_best's CPU, so it is the default.

Part of ``audio/``: no Trio; imports only ``audio.pcm``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Final

import numpy as np
import samplerate
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

#: libsamplerate's sinc converters, best (slowest) first. Linear and
#: zero-order-hold are deliberately absent.
CONVERTERS: Final = ("sinc_best", "sinc_medium", "sinc_fastest")
#: The cheapest converter that rejects aliases by >= 90 dB (measured: 101 dB).
DEFAULT_CONVERTER: Final = "sinc_fastest"

# libsamplerate accepts conversion ratios in [1/256, 256].
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


class StreamResampler:
    """Resample a stream block by block, keeping filter state between blocks.

    Feeding a signal in many small blocks and then calling :meth:`flush`
    yields the same samples (to float rounding) as one call on the whole
    signal, and ``floor(n_in * out_rate / in_rate)`` frames in total. When the
    rates are equal it only converts to float32 (and may then return the
    caller's own float32 array).

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
        self._ratio = out_rate / in_rate
        self._passthrough = in_rate == out_rate
        self._src: Any = None if self._passthrough else samplerate.Resampler(converter, channels)
        self._frames_in = 0
        self._frames_out = 0

    def process(self, x: NDArray[Any]) -> NDArray[np.float32]:
        """Resample the next block; returns float32 ``(frames_out, channels)``.

        The output lags the input by the filter delay; :meth:`flush` returns
        the rest.
        """
        f = _as_frames(x, self.channels)
        self._frames_in += f.shape[0]
        if self._passthrough or f.shape[0] == 0:
            out = f if self._passthrough else np.zeros((0, self.channels), np.float32)
            self._frames_out += out.shape[0]
            return out
        out = self._run(np.ascontiguousarray(f))
        self._frames_out += out.shape[0]
        return out

    def flush(self) -> NDArray[np.float32]:
        """End the stream: return the remaining output and reset for a new stream."""
        try:
            if self._passthrough:
                return np.zeros((0, self.channels), np.float32)
            return self._drain()
        finally:
            self.reset()

    def reset(self) -> None:
        """Forget all state, as if freshly constructed."""
        if self._src is not None:
            self._src.reset()
        self._frames_in = 0
        self._frames_out = 0

    def _run(self, f: NDArray[np.float32]) -> NDArray[np.float32]:
        out = self._src.process(f, self._ratio, False)
        return np.asarray(out, dtype=np.float32).reshape(-1, self.channels)

    def _drain(self) -> NDArray[np.float32]:
        # The binding sizes its output buffer as ceil(input_frames * ratio), so
        # an empty end_of_input call returns nothing. Push zeros instead (what
        # libsamplerate pads with at end of input) until the tail is out, then
        # cut at the exact expected length.
        pending = self._frames_in * self.out_rate // self.in_rate - self._frames_out
        parts: list[NDArray[np.float32]] = []
        got = 0
        for _ in range(64):
            if got >= pending:
                break
            zeros = math.ceil((pending - got) / self._ratio) + 64
            block = self._run(np.zeros((zeros, self.channels), np.float32))
            parts.append(block)
            got += block.shape[0]
        else:
            raise RuntimeError(f"libsamplerate did not drain: {got} of {pending} frames")
        if not parts:
            return np.zeros((0, self.channels), np.float32)
        return np.concatenate(parts)[: max(pending, 0)]


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
