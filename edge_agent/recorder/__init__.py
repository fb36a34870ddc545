"""The `AudioRecorder` library API (public facade, top layer).

`facade` holds `AudioRecorder`; `types` the value types its users already know
(`AudioConfig`, `AudioFrame`, `AudioSegment`); the formats and encoding helpers
its users reach for come from where they live. It builds an `Agent`, so nothing
below the top layer imports it.
"""

from ..audio.encoders import PcmLayout
from ..recordings import AudioFormat, encode_audio
from .facade import AudioRecorder
from .types import PYAUDIO_FORMATS, AudioConfig, AudioFrame, AudioSegment, RecorderStats, pcm_layout

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
