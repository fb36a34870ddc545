"""edge-agent: an always-on audio agent for Raspberry-Pi-class devices.

Capture goes into a bounded, time-indexed ring; live STT, durable segments, the
uploader and the device API read it. The public surface is what is listed here.

The package root only re-exports; no module of the package imports it.
"""

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
from .wire import agent_version as _agent_version

__version__ = _agent_version()

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
