"""The output formats of recordings, streams and cuts, and how each is encoded.

Owns `AudioFormat` (re-exported by the public `recorder` facade), its file
extensions and Content-Types, the lossy bitrates (`EncodeOptions`) and the one
way a recording gets its encoder: `new_encoder`, a thin call of
`audio.encoders.make_encoder` (no encoder is set up anywhere else).

Imports only the bottom layer (``audio``); never agent, recorder or another stage.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from numpy.typing import NDArray

from ..audio.encoders import PcmLayout, StreamEncoder, encode_whole, make_encoder

__all__ = [
    "FORMAT_INFO",
    "AudioFormat",
    "EncodeOptions",
    "audio_format",
    "encode_audio",
    "new_encoder",
    "pcm_bytes",
]


class AudioFormat(enum.StrEnum):
    """Output formats of `stream`, `segment` and uploaded recordings."""

    PCM = "pcm"  # raw little-endian interleaved samples in the config's sample format
    WAV = "wav"
    MP3 = "mp3"
    OPUS = "opus"  # Ogg Opus
    FLAC = "flac"  # Ogg FLAC (as the spool writes it)


#: File extension and Content-Type of each format.
FORMAT_INFO: Final[Mapping[AudioFormat, tuple[str, str]]] = {
    AudioFormat.PCM: ("pcm", "application/octet-stream"),
    AudioFormat.WAV: ("wav", "audio/wav"),
    AudioFormat.MP3: ("mp3", "audio/mpeg"),
    AudioFormat.OPUS: ("opus", "audio/ogg; codecs=opus"),
    AudioFormat.FLAC: ("oga", "audio/ogg; codecs=flac"),
}


@dataclass(frozen=True)
class EncodeOptions:
    """Bitrates of the lossy formats."""

    opus_bitrate: int = 32000
    mp3_kbps: int | None = None  # None: `audio.encoders.mp3_default_kbps`


def audio_format(fmt: AudioFormat | str) -> AudioFormat:
    """``fmt`` as an `AudioFormat`; ValueError names the formats accepted."""
    try:
        return AudioFormat(fmt)
    except ValueError:
        raise ValueError(
            f"format {fmt!r}: expected one of {', '.join(f.value for f in AudioFormat)}"
        ) from None


def new_encoder(fmt: AudioFormat, rate: int, channels: int, layout: PcmLayout,
                options: EncodeOptions) -> StreamEncoder:
    """A streaming encoder of ``fmt``: Opus as application "audio" tagged
    ``ENCODER=edge-agent``, WAV with its sizes patched at `finish`."""
    return make_encoder(fmt.value, rate, channels, layout, bitrate=options.opus_bitrate,
                        mp3_kbps=options.mp3_kbps)


def pcm_bytes(x: NDArray[Any], layout: PcmLayout) -> bytes:
    """Samples as raw little-endian PCM of ``layout`` (24-bit packed for int24)."""
    channels = 1 if x.ndim == 1 else int(x.shape[1])
    return encode_whole(make_encoder("pcm", 1, channels, layout), x)


def encode_audio(pcm: NDArray[Any], fmt: AudioFormat | str, rate: int, layout: PcmLayout,
                 options: EncodeOptions | None = None) -> bytes:
    """Encode a whole ``(frames, channels)`` block as one complete file of `fmt`."""
    channels = 1 if pcm.ndim == 1 else int(pcm.shape[1])
    enc = new_encoder(audio_format(fmt), rate, channels, layout, options or EncodeOptions())
    return encode_whole(enc, pcm)
