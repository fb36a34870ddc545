"""Voice activity detection: is this short frame of audio speech?

The STT streamer asks one question per frame, through the small `Vad` protocol,
so the detector is a clean swap: `WebRtcVad` (Google's WebRTC GMM detector, a
small C library with arm64 wheels) is the default, `EnergyVad` is a plain level
threshold for quiet rooms and tests. Both are synchronous and cheap (microseconds
per frame), so they run inline on the Trio thread.

Part of the `stt` stage. Imports only the bottom layer (`config`); never agent,
another stage, metrics or api.
"""

from __future__ import annotations

import math
from typing import Any, Final, Protocol

import numpy as np
from numpy.typing import NDArray

from ..config import VAD_RATES

__all__ = ["VAD_FRAME_MS", "VAD_RATES", "EnergyVad", "Vad", "WebRtcVad", "make_vad"]

# VAD_RATES (from config): sample rates the WebRTC detector accepts.
#: Frame lengths (ms) the WebRTC detector accepts.
VAD_FRAME_MS: Final = (10, 20, 30)


class Vad(Protocol):
    """A frame-by-frame speech detector for 16-bit mono PCM at `rate`."""

    @property
    def rate(self) -> int: ...

    @property
    def frame_samples(self) -> int:
        """Samples per frame `is_speech` expects."""
        ...

    def is_speech(self, frame: NDArray[np.int16]) -> bool: ...


class _Framed:
    """What every detector shares: a checked rate and fixed-length frames."""

    def __init__(self, rate: int, frame_ms: int) -> None:
        if rate not in VAD_RATES:
            raise ValueError(f"VAD rate must be one of {VAD_RATES} Hz, got {rate}")
        if frame_ms not in VAD_FRAME_MS:
            raise ValueError(f"VAD frame must be one of {VAD_FRAME_MS} ms, got {frame_ms}")
        self._rate = rate
        self._frame = rate * frame_ms // 1000

    @property
    def rate(self) -> int:
        return self._rate

    @property
    def frame_samples(self) -> int:
        return self._frame

    def _check_frame(self, frame: NDArray[np.int16]) -> None:
        if frame.shape[0] != self._frame:
            raise ValueError(f"VAD frame must be {self._frame} samples, got {frame.shape[0]}")


class WebRtcVad(_Framed):
    """The WebRTC detector (`webrtcvad`); aggressiveness 0 (lenient) to 3 (strict)."""

    def __init__(self, rate: int = 16000, *, aggressiveness: int = 2, frame_ms: int = 30) -> None:
        super().__init__(rate, frame_ms)
        if aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"VAD aggressiveness must be 0..3, got {aggressiveness}")
        import webrtcvad  # a C extension: imported only where a detector is made

        self._vad: Any = webrtcvad.Vad(aggressiveness)

    def is_speech(self, frame: NDArray[np.int16]) -> bool:
        self._check_frame(frame)
        data = np.ascontiguousarray(frame, dtype="<i2").tobytes()
        return bool(self._vad.is_speech(data, self._rate))


class EnergyVad(_Framed):
    """Speech is any frame whose RMS level is above `threshold_dbfs`.

    Good enough where the only sound is speech (and for tests with synthetic
    audio); noisy rooms want `WebRtcVad`.
    """

    def __init__(self, rate: int = 16000, *, threshold_dbfs: float = -45.0,
                 frame_ms: int = 30) -> None:
        super().__init__(rate, frame_ms)
        # Compare mean squares to avoid a sqrt and log per frame.
        self._threshold_ms = (32768.0 * 10 ** (threshold_dbfs / 20)) ** 2

    def is_speech(self, frame: NDArray[np.int16]) -> bool:
        self._check_frame(frame)
        mean_square = float(np.mean(np.square(frame, dtype=np.float64)))
        return math.isfinite(mean_square) and mean_square > self._threshold_ms


def make_vad(kind: str, rate: int, *, aggressiveness: int = 2, frame_ms: int = 30) -> Vad:
    """The detector named `kind` ("webrtc" or "energy")."""
    if kind == "webrtc":
        return WebRtcVad(rate, aggressiveness=aggressiveness, frame_ms=frame_ms)
    if kind == "energy":
        return EnergyVad(rate, frame_ms=frame_ms)
    raise ValueError(f'VAD must be "webrtc" or "energy", got {kind!r}')
