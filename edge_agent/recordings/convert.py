"""Capture frames converted to the channels and rate a listener asked for, and
encoded as one complete file: the synchronous core of `stream` and `segment`.

Owns `Converter` (mixing and streaming resampling, state kept across blocks) and
`encode_block`. Plain functions on values, no Trio: they run in a worker thread.

Imports only the bottom layer (``audio``); never agent, recorder or another stage.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..audio.encoders import PcmLayout, encode_whole
from ..audio.pcm import mix_down, to_float32
from ..audio.resample import StreamResampler
from .formats import AudioFormat, EncodeOptions, new_encoder

__all__ = ["Converter", "encode_block"]


class Converter:
    """Capture frames to the requested channels and rate, keeping resampler state
    across blocks. Frames pass through untouched when nothing changes."""

    def __init__(self, in_rate: int, in_channels: int, out_rate: int, out_channels: int) -> None:
        if out_channels < 1:
            raise ValueError(f"channels must be >= 1, got {out_channels}")
        if out_channels > in_channels > 1:
            raise ValueError(f"cannot make {out_channels} channels from {in_channels}")
        if out_rate <= 0:
            raise ValueError(f"rate must be > 0, got {out_rate}")
        self.out_channels = out_channels
        self.in_channels = in_channels
        self._rs = (StreamResampler(in_rate, out_rate, out_channels)
                    if in_rate != out_rate else None)

    @property
    def identity(self) -> bool:
        return self._rs is None and self.out_channels == self.in_channels

    def process(self, x: NDArray[Any]) -> NDArray[Any]:
        if self.identity:
            return x
        mixed = mix_down(x, self.out_channels)
        return mixed if self._rs is None else self._rs.process(mixed)

    def flush(self) -> NDArray[Any]:
        if self._rs is None:
            return np.zeros((0, self.out_channels), np.float32)
        return self._rs.flush()


def encode_block(converter: Converter, block: NDArray[Any], fmt: AudioFormat, rate: int,
                 channels: int, last: bool, layout: PcmLayout, options: EncodeOptions) -> bytes:
    """``block`` converted, as one complete file of ``fmt``; the `last` block also
    carries what the resampler still holds."""
    pcm = converter.process(block)
    if last:
        tail = converter.flush()
        if len(tail):
            pcm = np.concatenate([to_float32(pcm), tail])
    return encode_whole(new_encoder(fmt, rate, channels, layout, options), pcm)
