"""edge-agent: an always-on audio agent for Raspberry-Pi-class devices.

Capture goes into a bounded, time-indexed ring; live STT, durable segments, the
uploader and the device API read it. The public surface is what is listed here.

The package root only re-exports, lazily; no module of the package imports it.
"""

import importlib as _importlib
import typing as _typing

if _typing.TYPE_CHECKING:
    from .agent import Agent
    from .audio.pcm import SampleFormat
    from .capture import Block, CaptureError, FileSource, SoundDeviceSource, ToneSource
    from .clock import Clock, ManualClock, SystemClock
    from .config import AgentConfig, ConfigError, load_config
    from .recorder import AudioConfig, AudioFormat, AudioFrame, AudioRecorder, AudioSegment
    from .ring import AudioRing, EvictedError, RingReader
    from .store import HttpStore, KeyBuilder, LocalStore, Store, StoreError
    from .stt import SttStats, SttStreamer, Transcript, read_transcripts
    from .supervisor import Backoff, Supervisor

# Each public name and the module it lives in. They are imported on first use
# (PEP 562), so `import edge_agent.cli` costs only what a command needs: on a Pi
# Zero, importing the whole agent takes seconds an installer typing `config set`
# should not wait for.
_HOMES = {
    "Agent": "agent", "SampleFormat": "audio.pcm", "Block": "capture",
    "CaptureError": "capture", "FileSource": "capture", "SoundDeviceSource": "capture",
    "ToneSource": "capture", "Clock": "clock", "ManualClock": "clock", "SystemClock": "clock",
    "AgentConfig": "config", "ConfigError": "config", "load_config": "config",
    "AudioConfig": "recorder", "AudioFormat": "recorder", "AudioFrame": "recorder",
    "AudioRecorder": "recorder", "AudioSegment": "recorder", "AudioRing": "ring",
    "EvictedError": "ring", "RingReader": "ring", "HttpStore": "store",
    "KeyBuilder": "store", "LocalStore": "store", "Store": "store", "StoreError": "store",
    "SttStats": "stt", "SttStreamer": "stt", "Transcript": "stt",
    "read_transcripts": "stt", "Backoff": "supervisor", "Supervisor": "supervisor",
}


def __getattr__(name: str) -> _typing.Any:
    if name == "__version__":
        from .wire import agent_version
        return agent_version()
    if name not in _HOMES:
        raise AttributeError(f"module 'edge_agent' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "Agent",
    "AgentConfig",
    "AudioConfig",
    "AudioFormat",
    "AudioFrame",
    "AudioRecorder",
    "AudioRing",
    "AudioSegment",
    "Backoff",
    "Block",
    "CaptureError",
    "Clock",
    "ConfigError",
    "EvictedError",
    "FileSource",
    "HttpStore",
    "KeyBuilder",
    "LocalStore",
    "ManualClock",
    "RingReader",
    "SampleFormat",
    "SoundDeviceSource",
    "Store",
    "StoreError",
    "SttStats",
    "SttStreamer",
    "Supervisor",
    "SystemClock",
    "ToneSource",
    "Transcript",
    "__version__",
    "load_config",
    "read_transcripts",
]
