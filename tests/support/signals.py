"""Test signals: pure tones as float32 arrays, and whole Ogg Opus files of them."""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_agent.audio.opus import OggOpusEncoder


def sine(rate: int, seconds: float, freq: float, amp: float = 1.0) -> np.ndarray:
    """``seconds`` of a ``freq`` Hz sine at ``rate``, peak ``amp`` (float32)."""
    t = np.arange(round(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode_ogg_opus(pcm: np.ndarray, rate: int, **options: Any) -> bytes:
    """``pcm`` as one complete Ogg Opus file; ``options`` go to `OggOpusEncoder`."""
    channels = 1 if pcm.ndim == 1 else int(pcm.shape[1])
    with OggOpusEncoder(rate, channels, **options) as enc:
        return enc.write(pcm) + enc.finish()
