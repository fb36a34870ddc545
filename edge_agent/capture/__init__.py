"""Capture: where audio comes from and the task that writes it into the ring.

Modules: `source` (the `Source` interface, `Block`, `CaptureError`), `synthetic`
(`ToneSource`, `FileSource`), `device` (PortAudio: `SoundDeviceSource`, the
device list, the capture timeline), `levels` (the installer's level meter) and
`task` (`run_capture`, `make_source`). A stage: it imports only the bottom
layer; never agent, another stage, metrics or api.
"""

from .device import (
    CaptureTimeline,
    DeviceInfo,
    SoundDeviceSource,
    list_input_devices,
    resolve_device,
)
from .levels import LevelMeter, LevelReading, LevelSummary, render, run_levels
from .source import Block, BlockStream, CaptureError, Source, SourceStats
from .synthetic import FileSource, ToneSource
from .task import make_source, run_capture

__all__ = [
    "Block",
    "BlockStream",
    "CaptureError",
    "CaptureTimeline",
    "DeviceInfo",
    "FileSource",
    "LevelMeter",
    "LevelReading",
    "LevelSummary",
    "SoundDeviceSource",
    "Source",
    "SourceStats",
    "ToneSource",
    "list_input_devices",
    "make_source",
    "render",
    "resolve_device",
    "run_capture",
    "run_levels",
]
