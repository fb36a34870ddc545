"""Recordings: named stretches of the capture, encoded into files as they arrive.

The stage of the agent's recordings on demand (`AgentRecordings`, sealed into the
spool through the `RecordingSpool` Protocol, and its device API routes
`recording_routes`), and the pieces the public `recorder.AudioRecorder` facade
builds on: `FileRecording`, the output formats and the stream converter.

A stage package: imports only the bottom layer (and ``store`` for keys); never
agent, recorder, api, spool or another stage.
"""

from .convert import Converter, encode_block
from .file import FileRecording, Wakeable, next_block
from .formats import (
    FORMAT_INFO,
    AudioFormat,
    EncodeOptions,
    audio_format,
    encode_audio,
    new_encoder,
    pcm_bytes,
)
from .routes import recording_routes
from .stage import (
    AgentRecordings,
    RecordingConflict,
    RecordingLimit,
    RecordingSpool,
    RecordingsStats,
)

__all__ = [
    "FORMAT_INFO",
    "AgentRecordings",
    "AudioFormat",
    "Converter",
    "EncodeOptions",
    "FileRecording",
    "RecordingConflict",
    "RecordingLimit",
    "RecordingSpool",
    "RecordingsStats",
    "Wakeable",
    "audio_format",
    "encode_audio",
    "encode_block",
    "new_encoder",
    "next_block",
    "pcm_bytes",
    "recording_routes",
]
