"""The capture task and the choice of source.

Owns `run_capture` (the supervised task that moves blocks from the source into
the ring) and `make_source` (the source `[capture]` asks for).

Part of the `capture` stage. Imports only the bottom layer (`audio`, `clock`,
`config`, `ring`, `supervisor`) and its siblings; never agent, another stage,
metrics or api.
"""

from __future__ import annotations

import logging
from pathlib import Path

import trio

from ..audio.pcm import SampleFormat
from ..clock import Clock
from ..config import CaptureConfig
from ..ring import AudioRing
from ..supervisor import TaskStatus
from .device import SoundDeviceSource
from .handoff import Demand, QueuedBlocks
from .source import Source
from .synthetic import FileSource, ToneSource

__all__ = ["make_source", "run_capture"]

log = logging.getLogger(__name__)


def make_source(cfg: CaptureConfig, clock: Clock, *, demand: Demand | None = None) -> Source:
    """The capture source the config asks for; `demand` is the ring it feeds, whose
    readers' needs decide when the capture thread wakes Trio."""
    fmt = SampleFormat(cfg.format)
    if cfg.source == "file":
        return FileSource(
            Path(cfg.file), cfg.rate, cfg.channels, fmt, clock,
            block_ms=cfg.block_ms, realtime=cfg.realtime, loop=cfg.loop, demand=demand,
        )
    if cfg.source == "tone":
        return ToneSource(
            cfg.rate, cfg.channels, fmt, clock, block_ms=cfg.block_ms, tone_hz=cfg.tone_hz,
            dbfs=cfg.tone_dbfs, seconds=cfg.tone_seconds, realtime=cfg.realtime,
            demand=demand,
        )
    return SoundDeviceSource(
        cfg.device, cfg.rate, cfg.channels, fmt, clock, block_ms=cfg.block_ms,
        queue_blocks=cfg.queue_blocks, stall_seconds=cfg.stall_seconds, demand=demand,
    )


async def run_capture(
    source: Source, ring: AudioRing, clock: Clock, finished: trio.Event,
    task_status: TaskStatus = trio.TASK_STATUS_IGNORED,
) -> None:
    """Move blocks from `source` into `ring` until the source ends, then set
    `finished`; ready once the source is open."""
    async with source.open() as blocks:
        ring.capturing = True
        try:
            task_status.started()
            async for block in blocks:
                ring.write(block.frames, utc=block.utc, mono=block.mono, synced=clock.synced())
        finally:
            # A stop must not lose what the capture thread queued but Trio had no
            # reason to take yet (it wakes once per reader batch).
            if isinstance(blocks, QueuedBlocks):
                for block in blocks.flush():
                    ring.write(block.frames, utc=block.utc, mono=block.mono,
                               synced=clock.synced())
            ring.capturing = False
    finished.set()
    log.info("capture finished frames=%d", ring.head)
