"""The value types of the `AudioRecorder` reference API, and the agent config
an `AudioConfig` means.

Owns `AudioConfig`, `AudioFrame`, `AudioSegment`, `PYAUDIO_FORMATS`, `pcm_layout`
and `RecorderStats` (all re-exported by `edge_agent.recorder`, the public facade)
and `agent_config`, the synchronous check and translation of an `AudioConfig`.

A private helper of the facade: imports only the bottom layer (``audio``,
``config``); never agent, recorder or a stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final, NamedTuple

from ..audio.encoders import PcmLayout
from ..audio.pcm import SampleFormat
from ..config import AgentConfig, ConfigError, validate

__all__ = [
    "PYAUDIO_FORMATS",
    "AudioConfig",
    "AudioFrame",
    "AudioSegment",
    "RecorderStats",
    "agent_config",
    "pcm_layout",
]

#: PyAudio's sample-format constants, accepted in `AudioConfig.format` so ported
#: code keeps working: paFloat32, paInt32, paInt24, paInt16.
PYAUDIO_FORMATS: Final[Mapping[int, str]] = {1: "float32", 2: "int32", 4: "int24", 8: "int16"}


class AudioConfig(NamedTuple):
    """Audio recording configuration (the reference's fields and defaults).

    Attributes:
        format: Sample format: ``"int16"``, ``"int24"``, ``"int32"``, ``"float32"``
            (or a `SampleFormat`), or a PyAudio constant (paInt16=8, paInt24=4,
            paInt32=2, paFloat32=1).
        channels: Channels captured (1 = mono, 2 = stereo).
        rate: Sample rate in Hz (8000 to 384000).
        chunk: Frames per buffer: PortAudio delivers blocks of about this many
            frames (rounded to whole milliseconds), and it is the default
            `stream` chunk size.
        input_device_index: Input device: an index, a name substring (USB mics
            change index on re-plug), or None for the default device.
    """

    format: int | str = 8
    channels: int = 1
    rate: int = 16000
    chunk: int = 1024
    input_device_index: int | str | None = None


class AudioFrame:
    """One captured block with its capture time (slots keep it small)."""

    __slots__ = ("data", "timestamp")

    def __init__(self, timestamp: datetime, data: bytes) -> None:
        self.timestamp = timestamp
        self.data = data

    def __repr__(self) -> str:
        return f"AudioFrame(timestamp={self.timestamp!r}, data=<{len(self.data)} bytes>)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AudioFrame):
            return NotImplemented
        return self.timestamp == other.timestamp and self.data == other.data

    __hash__ = None  # type: ignore[assignment]


class AudioSegment(NamedTuple):
    """A finished recording, as `AudioRecorder.stop` returns it.

    Attributes:
        key: Storage key the audio was uploaded under.
        duration_ms: Audio held, in milliseconds (frames / rate; capture gaps
            are not counted).
        started_at: Capture time (UTC) of the first frame.
        ended_at: Capture time (UTC) just after the last frame.
        frames: The raw PCM of the whole recording when the ring still held it
            at `stop`, else ``b""`` (the full audio is in the store).
    """

    key: str
    duration_ms: int
    started_at: datetime
    ended_at: datetime
    frames: bytes


def pcm_layout(fmt: int | str) -> PcmLayout:
    """The layout of an `AudioConfig.format` value; ValueError names what is accepted."""
    if isinstance(fmt, bool):
        fmt = repr(fmt)
    if isinstance(fmt, int):
        if fmt not in PYAUDIO_FORMATS:
            raise ValueError(
                f"AudioConfig.format {fmt!r}: expected a PyAudio constant "
                "(paInt16=8, paInt24=4, paInt32=2, paFloat32=1) or a name "
                "(int16, int24, int32, float32)"
            )
        fmt = PYAUDIO_FORMATS[fmt]
    name = str(fmt).lower()
    if name == "int24":
        return PcmLayout(SampleFormat.INT32, packed24=True)
    try:
        return PcmLayout(SampleFormat(name))
    except ValueError:
        raise ValueError(
            f"AudioConfig.format {fmt!r}: expected int16, int24, int32 or float32 "
            "(or a PyAudio constant: paInt16=8, paInt24=4, paInt32=2, paFloat32=1)"
        ) from None


@dataclass
class RecorderStats:
    """Counters of one `AudioRecorder`."""

    recordings: int = 0
    failures: int = 0  # encoding or disk errors while recording
    uploads: int = 0
    upload_failures: int = 0
    bytes_uploaded: int = 0
    recorded_frames: int = 0
    # Frames a recording lost because its writer fell more than the ring behind.
    lost_frames: int = 0
    streams: int = 0
    stream_chunks: int = 0
    # Frames a stream skipped because its consumer fell more than the ring behind.
    stream_lost_frames: int = 0
    segments: int = 0


def agent_config(cfg: AudioConfig, layout: PcmLayout, ring_seconds: float,
                 work_dir: Path) -> AgentConfig:
    """The capture-only `AgentConfig` an `AudioConfig` asks for; ValueError names
    the `AudioConfig` field (or ``ring_seconds``) that is wrong."""
    for name in ("channels", "rate", "chunk"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"AudioConfig.{name}: expected a positive integer, "
                             f"got {value!r}")
    device = cfg.input_device_index
    if device is None:
        device = "default"
    elif isinstance(device, bool) or not isinstance(device, int | str):
        raise ValueError(f"AudioConfig.input_device_index: expected an index, a name "
                         f"substring or None, got {device!r}")
    if not (isinstance(ring_seconds, int | float) and ring_seconds > 0):
        raise ValueError(f"ring_seconds: expected a positive number, got "
                         f"{ring_seconds!r}")
    block_ms = min(1000, max(5, round(cfg.chunk * 1000 / cfg.rate)))
    raw = {
        "device": {"id": "recorder", "data_dir": str(work_dir)},
        "capture": {"source": "sounddevice", "device": device, "rate": cfg.rate,
                    "channels": cfg.channels, "format": layout.sample_format.value,
                    "block_ms": block_ms},
        "ring": {"seconds": max(1.0, float(ring_seconds))},
        "segments": {"enabled": False},
    }
    try:
        return validate(raw)
    except ConfigError as exc:
        problems = "; ".join(p.replace("capture.", "AudioConfig.", 1)
                             for p in exc.problems)
        raise ValueError(problems) from None
