"""Test signals: pure tones as float32 arrays."""

from __future__ import annotations

import numpy as np


def sine(rate: int, seconds: float, freq: float, amp: float = 1.0) -> np.ndarray:
    """``seconds`` of a ``freq`` Hz sine at ``rate``, peak ``amp`` (float32)."""
    t = np.arange(round(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
