"""The `AudioRecorder` library API, Trio-native, on the agent's own pieces.

edge-agent grew from a recorder library whose API people already use
(``AudioRecorder(store, config)`` with ``init``/``start``/``stream``/``segment``/
``stop``/``close``). This module keeps that API, built on what the agent runs:

* capture is an `Agent` configured for capture only (its supervised capture task,
  `make_source` sources, `AudioRing`), running in a nursery the recorder owns;
* a recording is a ring reader whose frames are encoded incrementally into a file
  (`recordings.FileRecording`: memory never grows with its length), uploaded to a
  `store.Store` at `stop`;
* `stream` is another reader per call: constant work per chunk, however long the
  recording; `segment` cuts any range the ring still holds;
* resampling is libsoxr (`StreamResampler`), encoders are the agent's one
  factory (`audio.encoders`): Ogg Opus (libopusenc), Ogg FLAC and WAV as the
  spool writes them, MP3 through `lameenc` (the ``mp3`` extra).

The top layer: it builds an `Agent` and may import anything below it. The
reference's value types are in `recorder.types`; the
agent's recordings on demand live in the `recordings` stage package.
"""

from __future__ import annotations

import builtins
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from ..agent import Agent
from ..audio.encoders import PcmLayout
from ..audio.pcm import SampleFormat
from ..blocking import ThreadRunner
from ..capture import CaptureError, Source, list_input_devices, resolve_device
from ..clock import Clock, SystemClock, iso_utc
from ..recordings import (
    FORMAT_INFO,
    AudioFormat,
    Converter,
    EncodeOptions,
    FileRecording,
    Wakeable,
    audio_format,
    encode_block,
    new_encoder,
    next_block,
    pcm_bytes,
)
from ..ring import AudioRing
from ..store import Store
from ..supervisor import Backoff, TaskStatus
from ..wire import new_segment_id
from .types import (
    AudioConfig,
    AudioSegment,
    RecorderStats,
    agent_config,
    pcm_layout,
)

__all__ = ["AudioRecorder"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------
# AudioRecorder


@dataclass
class _Session:
    key: str
    id: str
    recording: FileRecording
    format: AudioFormat


def _utc_datetime(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=UTC)


def _timestamp(value: datetime, name: str) -> float:
    if not isinstance(value, datetime):
        raise ValueError(f"{name} must be a datetime, got {type(value).__name__}")
    return value.timestamp()  # naive datetimes are local time, as Python defines it


@dataclass
class _Host:
    """What `init` and `close` share with the system task running the agent."""

    started: trio.Event = field(default_factory=trio.Event)
    closing: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    nursery: trio.Nursery | None = None
    error: Exception | None = None


class AudioRecorder:
    """Records the microphone into a bounded ring, uploads recordings to `store`.

    The reference API (see the README section "Coming from AudioRecorder"):
    `init`, `start`, `stream`, `segment`, `stop`, `close`, `clear_frames`,
    `list_input_devices`, `is_recording`, `current_segment_key`. Use it as
    ``async with AudioRecorder(store, config) as rec:``; ``await init()`` ...
    ``await close()`` works too when both are called from the same task (the
    recorder's nursery lives between them).

    Args:
        store: Where `stop` uploads recordings (`LocalStore`, `HttpStore`, ...).
        config: Capture settings; None means `AudioConfig()`.
        source: A capture source to use instead of the input device (a
            `FileSource` or `ToneSource`, for tests and headless use).
        clock: Wall-clock and monotonic time for capture timestamps.
        ring_seconds: Audio held in memory; `segment` reaches back this far and
            memory is this plus a fixed overhead, however long a recording runs.
        upload_format: Format of the uploaded recordings.
        work_dir: Where recordings are encoded before upload; a private temp
            directory (removed by `close`) when None.
        opus_bitrate: Bits per second of Opus output.
        mp3_kbps: Kilobits per second of MP3 output (None: by rate and channels).
        open_timeout: How long `init` waits for the input to open.
    """

    def __init__(self, store: Store, config: AudioConfig | None = None, *,
                 source: Source | None = None, clock: Clock | None = None,
                 ring_seconds: float = 300.0,
                 upload_format: AudioFormat | str = AudioFormat.WAV,
                 work_dir: str | os.PathLike[str] | None = None, opus_bitrate: int = 32000,
                 mp3_kbps: int | None = None, open_timeout: float = 10.0) -> None:
        self.store = store
        self.config = config if config is not None else AudioConfig()
        self.upload_format = audio_format(upload_format)
        self.ring_seconds = ring_seconds
        self.options = EncodeOptions(opus_bitrate=opus_bitrate, mp3_kbps=mp3_kbps)
        self.open_timeout = open_timeout
        self.stats = RecorderStats()
        self._source = source
        self._clock: Clock = clock or SystemClock()
        self._work_dir_arg = Path(work_dir) if work_dir is not None else None
        self._work_dir: Path | None = None
        self._own_work_dir = False
        self._layout = PcmLayout(SampleFormat.INT16)
        self._agent: Agent | None = None
        self._host_state: _Host | None = None
        self._nursery: trio.Nursery | None = None
        self._session: _Session | None = None
        self._cleared_before = 0
        self._wake = Wakeable()
        # Encoding stream chunks and cuts, two at a time; the recording's file and
        # the other disk work (and the device probe), one at a time.
        self._encode_runner = ThreadRunner(2)
        self._io_runner = ThreadRunner(1)

    def __repr__(self) -> str:
        state = ("recording" if self._session else "idle") if self._agent else "closed"
        return f"<AudioRecorder {state} store={self.store!r}>"

    async def __aenter__(self) -> AudioRecorder:
        await self.init()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- properties ----------------------------------------------------------------

    @property
    def is_recording(self) -> bool:
        """Whether a recording is in progress."""
        return self._session is not None

    @property
    def current_segment_key(self) -> str | None:
        """The storage key of the recording in progress, or None."""
        return self._session.key if self._session is not None else None

    @property
    def ring(self) -> AudioRing:
        """The capture ring (RuntimeError before `init`)."""
        return self._require_agent().ring

    @property
    def layout(self) -> PcmLayout:
        """How PCM output is laid out for this config."""
        return self._layout

    def _require_agent(self) -> Agent:
        if self._agent is None:
            raise RuntimeError("audio system not initialised: call init() first")
        return self._agent

    # -- life cycle ----------------------------------------------------------------

    async def init(self) -> None:
        """Open the audio system: validate the config, open the input, start capture.

        Calling it again while initialised does nothing.

        Raises:
            ValueError: A config value is out of range (the message names it).
            CaptureError: The input device is missing or refuses the settings.
        """
        if self._agent is not None:
            return
        layout = pcm_layout(self.config.format)
        if self._work_dir_arg is None:
            work_dir = Path(tempfile.mkdtemp(prefix="edge-agent-recorder-"))
            own = True
        else:
            work_dir = self._work_dir_arg
            await self._io_runner.run(lambda: work_dir.mkdir(parents=True, exist_ok=True))
            own = False
        try:
            cfg = agent_config(self.config, layout, self.ring_seconds, work_dir)
            if self._source is not None:
                src = self._source
                got = (src.rate, src.channels, SampleFormat(src.format))
                want = (cfg.capture.rate, cfg.capture.channels, layout.sample_format)
                if got != want:
                    raise ValueError(
                        f"source delivers {got[0]} Hz x{got[1]} {got[2]}; AudioConfig asks "
                        f"for {want[0]} Hz x{want[1]} {want[2]} (int24 is captured as int32)")
            else:
                # Fail now, with the device list, rather than retrying in the background.
                devices = await self._io_runner.run(lambda: list_input_devices(refresh=True))
                resolve_device(cfg.capture.device, devices)
            agent = Agent(cfg, clock=self._clock, source=self._source,
                          backoff=Backoff(initial=0.5, maximum=5.0))
        except BaseException:
            if own:
                shutil.rmtree(work_dir, ignore_errors=True)
            raise
        # The agent runs in a Trio system task of its own, not in a nursery opened
        # here: `init()` and `close()` are often called from different places (no
        # `async with`, an exception in between, other cancel scopes around either),
        # and a nursery must be closed where it was opened.
        host = _Host()
        trio.lowlevel.spawn_system_task(self._host, agent, host, name="edge-agent recorder")
        await host.started.wait()
        if host.error is not None:
            await host.done.wait()
            if own:
                shutil.rmtree(work_dir, ignore_errors=True)
            raise host.error
        assert host.nursery is not None
        self._agent, self._host_state, self._nursery = agent, host, host.nursery
        self._work_dir, self._own_work_dir, self._layout = work_dir, own, layout
        self._cleared_before = 0
        log.info("recorder ready rate=%d channels=%d format=%s ring_seconds=%g",
                 self.config.rate, self.config.channels, layout.name, self.ring_seconds)

    async def _host(self, agent: Agent, host: _Host) -> None:
        """The system task that runs the agent until `close` (or the end of the run)."""
        try:
            async with trio.open_nursery() as nursery:
                try:
                    with trio.move_on_after(self.open_timeout) as scope:
                        await nursery.start(self._run_agent, agent)
                    health = agent.tasks.get("capture")
                    if scope.cancelled_caught:
                        raise CaptureError(
                            f"the audio input did not open within {self.open_timeout:g} s")
                    if health is not None and health.state == "backoff":
                        raise CaptureError(f"cannot open the audio input: {health.last_error}")
                except Exception as exc:
                    host.error = exc
                    agent.stop()
                    nursery.cancel_scope.cancel()
                    return
                finally:
                    host.nursery = nursery
                    host.started.set()
                nursery.start_soon(self._watch_capture, agent)
                await host.closing.wait()
                agent.stop()
                nursery.cancel_scope.cancel()
        except Exception:  # a system task must not raise: the whole run would end
            log.exception("recorder capture failed")
        finally:
            host.started.set()
            host.done.set()

    async def _run_agent(self, agent: Agent, task_status: TaskStatus) -> None:
        await agent.run(systemd=False, task_status=task_status)

    async def _watch_capture(self, agent: Agent) -> None:
        await agent.capture_finished.wait()
        log.info("recorder capture ended frames=%d", agent.ring.head)
        if self._session is not None:
            self._session.recording.note_capture_over()
        self._wake.wake_all()

    async def close(self) -> None:
        """Stop any recording (uploading it), stop capture and release everything.

        Raises:
            Exception: What `stop` raised for the recording in progress, after
                everything was released.
        """
        if self._agent is None:
            return
        error: Exception | None = None
        try:
            if self._session is not None:
                await self.stop()
        except Exception as exc:
            error = exc
        finally:
            agent, host = self._agent, self._host_state
            self._agent = self._host_state = self._nursery = None
            self._session = None
            agent.stop()
            self._wake.wake_all()
            if host is not None:
                host.closing.set()
                with trio.CancelScope(shield=True):
                    await host.done.wait()
            if self._own_work_dir and self._work_dir is not None:
                work_dir = self._work_dir
                await self._io_runner.run(lambda: shutil.rmtree(work_dir, ignore_errors=True))
            self._work_dir = None
            log.info("recorder closed")
        if error is not None:
            raise error

    # -- recording -------------------------------------------------------------------

    async def start(self, *prefixes: str) -> str:
        """Begin a recording; returns its storage key.

        The key is ``store.key_builder.build(*prefixes, id)`` with a unique,
        time-sortable id. The recording begins with the first frame captured after
        this call.

        Raises:
            RuntimeError: Not initialised, or already recording.
            ValueError: A prefix cannot be part of a key.
        """
        agent = self._require_agent()
        if self._session is not None:
            raise RuntimeError(f"already recording (key {self._session.key!r}); stop() first")
        assert self._nursery is not None and self._work_dir is not None
        ring = agent.ring
        now = ring.index_to_utc(ring.head) if ring.head else self._clock.utc()
        rec_id = new_segment_id(now)
        key = self.store.key_builder.build(*prefixes, rec_id)
        fmt = self.upload_format
        encoder = new_encoder(fmt, ring.rate, ring.channels, self._layout, self.options)
        path = self._work_dir / f"{rec_id}.{FORMAT_INFO[fmt][0]}"
        recording = FileRecording(ring, ring.head, path, encoder, name=f"recording:{rec_id}",
                                  runner=self._io_runner)
        if agent.capture_finished.is_set():
            recording.note_capture_over()
        await self._nursery.start(recording.run)
        self._session = _Session(key, rec_id, recording, fmt)
        self.stats.recordings += 1
        log.info("recording started key=%s format=%s", key, fmt)
        return key

    async def stop(self) -> AudioSegment:
        """End the recording and upload it to the store.

        The upload carries metadata: content_type, format, duration_ms, rate,
        channels, sample_format, started_at, ended_at, frames, lost_frames, gaps.

        Raises:
            RuntimeError: Not initialised, or not recording.
            Exception: What encoding or the store raised; the recorder is then no
                longer recording and the encoded file is kept (its path is logged).
        """
        agent = self._require_agent()
        session = self._session
        if session is None:
            raise RuntimeError("not recording: call start() first")
        ring = agent.ring
        rec = session.recording
        rec.request_stop(ring.head)
        self._session = None
        self._wake.wake_all()
        await rec.done.wait()
        if rec.error is not None:
            self.stats.failures += 1
            raise rec.error
        assert rec.stop_index is not None
        start_utc, _, end_utc, _ = rec.times()
        if ring.head == 0:
            start_utc = end_utc = self._clock.utc()
        self.stats.recorded_frames += rec.frames
        self.stats.lost_frames += rec.lost_frames
        first = rec.first_index if rec.first_index is not None else rec.stop_index
        frames = b""
        if first >= ring.tail:
            frames = pcm_bytes(ring.read(first, rec.stop_index), self._layout)
        else:
            log.info("recording longer than the ring key=%s: AudioSegment.frames is empty, "
                     "the audio is in the store", session.key)
        duration_ms = round(rec.frames * 1000 / ring.rate)
        metadata = {
            "content_type": FORMAT_INFO[session.format][1],
            "format": session.format.value,
            "duration_ms": duration_ms,
            "rate": ring.rate,
            "channels": ring.channels,
            "sample_format": self._layout.name,
            "started_at": iso_utc(start_utc),
            "ended_at": iso_utc(end_utc),
            "frames": rec.frames,
            "lost_frames": rec.lost_frames,
            "gaps": len(rec.gap_notes()),
        }
        try:
            f = await self._io_runner.run(lambda: rec.path.open("rb"))
            try:
                await self.store.upload(f, session.key, metadata)
            finally:
                f.close()
        except Exception:
            self.stats.upload_failures += 1
            log.error("recording upload failed key=%s kept=%s", session.key, rec.path)
            raise
        self.stats.uploads += 1
        self.stats.bytes_uploaded += rec.bytes
        await self._io_runner.run(lambda: rec.path.unlink(missing_ok=True))
        log.info("recording stopped key=%s seconds=%.3f bytes=%d lost_frames=%d", session.key,
                 rec.frames / ring.rate, rec.bytes, rec.lost_frames)
        return AudioSegment(session.key, duration_ms, _utc_datetime(start_utc),
                            _utc_datetime(end_utc), frames)

    # -- streaming and cutting ---------------------------------------------------------

    def _target(self, channels: int | None, rate: int | None) -> tuple[int, int]:
        ring = self._require_agent().ring
        out_channels = ring.channels if channels is None else channels
        out_rate = ring.rate if rate is None else rate
        for name, value in (("channels", out_channels), ("rate", out_rate)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        return out_channels, out_rate

    async def stream(self, chunk_size: int | None = None,
                     format: AudioFormat | str = AudioFormat.PCM,
                     channels: int | None = None, rate: int | None = None
                     ) -> AsyncGenerator[bytes, None]:
        """Yield the audio of the recording in progress as chunks of `format`.

        Independent of the recording: each call reads the ring with its own
        cursor from the moment it starts, and several streams may run at once.
        Every chunk is a complete file of its format (PCM: raw samples) holding
        `chunk_size` frames counted at the capture rate (``config.chunk`` when
        None), converted to `channels` and `rate`. The stream ends when the
        recording stops, after a last, possibly shorter, chunk. A consumer that
        falls more than the ring behind skips ahead (counted in
        `stats.stream_lost_frames`).

        Raises:
            RuntimeError: Not initialised, or not recording.
            ValueError: Bad chunk size, channels, rate or format.
        """
        agent = self._require_agent()
        session = self._session
        if session is None:
            raise RuntimeError("not recording: call start() before stream()")
        ring = agent.ring
        n = self.config.chunk if chunk_size is None else chunk_size
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= ring.capacity:
            raise ValueError(f"chunk_size must be 1..{ring.capacity} frames, got {chunk_size!r}")
        fmt = audio_format(format)
        out_channels, out_rate = self._target(channels, rate)
        converter = Converter(ring.rate, ring.channels, out_rate, out_channels)
        new_encoder(fmt, out_rate, out_channels, self._layout, self.options).close()
        rec = session.recording
        self.stats.streams += 1
        reader = ring.open_reader(f"stream:{session.id}", start=ring.head)
        try:
            while True:
                result = await next_block(reader, n, rec, self._wake)
                if result is None:
                    break
                if result.lost:
                    self.stats.stream_lost_frames += result.lost
                    log.warning("stream fell behind the ring lost_frames=%d", result.lost)
                end = rec.stop_index if rec.stop_index is not None else (
                    ring.head if rec.capture_over else None)
                last = end is not None and reader.cursor >= end
                chunk = await self._encode_runner.run(
                    encode_block, converter, result.frames, fmt, out_rate, out_channels, last,
                    self._layout, self.options)
                self.stats.stream_chunks += 1
                yield chunk
                if last:
                    break
        finally:
            reader.close()

    async def segment(self, started_at: datetime, ended_at: datetime, *,
                      channels: int | None = None, rate: int | None = None,
                      format: AudioFormat | str = AudioFormat.PCM,
                      ) -> bytes:
        """The audio captured between two times, as one file of `format`.

        Any range the ring still holds can be cut, recording or not; a range
        reaching past the newest frame ends there.

        Raises:
            RuntimeError: Not initialised.
            ValueError: An inverted or empty range, audio no longer held (the
                message names the oldest time still available), or bad options.
        """
        ring = self._require_agent().ring
        t0 = _timestamp(started_at, "started_at")
        t1 = _timestamp(ended_at, "ended_at")
        if t1 <= t0:
            raise ValueError(f"invalid time range: ended_at {iso_utc(t1)} is not after "
                             f"started_at {iso_utc(t0)}")
        fmt = audio_format(format)
        out_channels, out_rate = self._target(channels, rate)
        if ring.head == 0:
            raise ValueError("no frames: nothing has been captured yet")
        start, stop = ring.utc_to_index(t0), min(ring.utc_to_index(t1), ring.head)
        tail = ring.tail
        if start < tail:
            raise ValueError(
                f"audio from {iso_utc(t0)} is no longer held; the oldest audio still "
                f"available starts at {iso_utc(ring.index_to_utc(tail))}")
        if start < self._cleared_before:
            raise ValueError(
                f"audio from {iso_utc(t0)} was cleared by clear_frames(); the oldest audio "
                f"still available starts at {iso_utc(ring.index_to_utc(self._cleared_before))}")
        if stop <= start:
            raise ValueError(
                f"no frames between {iso_utc(t0)} and {iso_utc(t1)}; the audio held ends at "
                f"{iso_utc(ring.index_to_utc(ring.head))}")
        pcm = ring.read(start, stop)
        converter = Converter(ring.rate, ring.channels, out_rate, out_channels)
        self.stats.segments += 1
        data: bytes = await self._encode_runner.run(
            encode_block, converter, pcm, fmt, out_rate, out_channels, True, self._layout,
            self.options)
        return data

    def clear_frames(self) -> None:
        """Forget the audio held so far: `segment` no longer reaches before now.

        The ring is preallocated, so no memory is freed (there is none to free);
        a recording in progress keeps its audio (it is already being encoded).

        Raises:
            RuntimeError: Not initialised.
        """
        self._cleared_before = self._require_agent().ring.head

    def list_input_devices(self) -> builtins.list[dict[str, Any]]:
        """Input devices PortAudio sees now: index, name, channels, sample_rate,
        hostapi, is_default. Blocking (PortAudio probes the devices); needs no init.

        Raises:
            CaptureError: PortAudio is not available.
        """
        return [
            {"index": d.index, "name": d.name, "channels": d.channels,
             "sample_rate": int(d.default_rate), "hostapi": d.hostapi,
             "is_default": d.is_default}
            for d in list_input_devices(refresh=True)
        ]
