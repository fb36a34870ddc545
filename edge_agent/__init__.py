"""edge-agent: an always-on audio agent for Raspberry-Pi-class devices.

Capture goes into a bounded, time-indexed ring; live STT, durable segments, the
uploader and the device API read it. The public surface is what is listed here.
"""

import importlib.metadata as _metadata

from .agent import Agent
from .audio.pcm import SampleFormat
from .audio.sources import Block, CaptureError, FileSource, SoundDeviceSource, ToneSource
from .clock import Clock, ManualClock, SystemClock
from .config import AgentConfig, ConfigError, load_config
from .ring import AudioRing, EvictedError, RingReader
from .supervisor import Backoff, Supervisor

try:
    __version__ = _metadata.version("edge-agent")
except _metadata.PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"

__all__ = [
    "Agent",
    "AgentConfig",
    "AudioRing",
    "Backoff",
    "Block",
    "CaptureError",
    "Clock",
    "ConfigError",
    "EvictedError",
    "FileSource",
    "ManualClock",
    "RingReader",
    "SampleFormat",
    "SoundDeviceSource",
    "Supervisor",
    "SystemClock",
    "ToneSource",
    "__version__",
    "load_config",
]
