"""The `AudioRecorder` library API (public facade, top layer).

`facade` holds `AudioRecorder`; `types` the value types its users already know
(`AudioConfig`, `AudioFrame`, `AudioSegment`). It builds an `Agent`, so nothing
below the top layer imports it.
"""

from .facade import (
    PYAUDIO_FORMATS,
    AudioConfig,
    AudioFormat,
    AudioFrame,
    AudioRecorder,
    AudioSegment,
    PcmLayout,
    RecorderStats,
    encode_audio,
    pcm_layout,
)

__all__ = [
    "PYAUDIO_FORMATS",
    "AudioConfig",
    "AudioFormat",
    "AudioFrame",
    "AudioRecorder",
    "AudioSegment",
    "PcmLayout",
    "RecorderStats",
    "encode_audio",
    "pcm_layout",
]
