"""A microphone through PortAudio (sounddevice): `SoundDeviceSource`, the device
list (`list_input_devices`, `resolve_device`) and the capture timeline that
stamps each block (`CaptureTimeline`).

The PortAudio callback runs on PortAudio's real-time thread, so it only copies
the block into a preallocated slot of a `BlockHandoff`, which wakes Trio with
`run_sync_soon` once a reader of the ring has work; it never blocks, logs, or
waits for Trio.

Part of the `capture` stage. Imports only the bottom layer (`audio`, `clock`)
and its sibling `source`; never agent, another stage, metrics or api.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
from numpy.typing import NDArray

from ..audio.pcm import SampleFormat, numpy_dtype
from ..blocking import ThreadRunner
from ..clock import Clock
from .handoff import BlockHandoff, Demand, QueuedBlocks
from .source import Block, CaptureError, SourceStats

__all__ = [
    "CaptureTimeline",
    "DeviceInfo",
    "SoundDeviceSource",
    "list_input_devices",
    "resolve_device",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    channels: int
    default_rate: float
    hostapi: str
    is_default: bool


# PortAudio is not thread-safe and is driven from worker threads (opening an ALSA
# device can take a while, so never on the Trio thread): one call at a time.
# Re-entrant: a stream that fails to start is closed while the lock is held.
_PORTAUDIO_LOCK = threading.RLock()

# PortAudio error codes that mean "the device exists but not with these settings".
_SETTINGS_ERRORS = {-9998, -9997, -9994}  # channel count, sample rate, sample format


def _sd() -> Any:
    """Import sounddevice lazily: it fails at import time without libportaudio,
    and file/tone sources must work without it."""
    try:
        import sounddevice
    except OSError as exc:
        raise CaptureError(f"PortAudio is not available ({exc}); install libportaudio2") from None
    return sounddevice


def list_input_devices(*, refresh: bool = False) -> list[DeviceInfo]:
    """Input devices PortAudio sees now (re-initialised first when `refresh`).

    Blocking (PortAudio opens every device to probe it): call it from a worker
    thread in async code.
    """
    sd = _sd()
    with _PORTAUDIO_LOCK:
        return _list_locked(sd, refresh)


def _list_locked(sd: Any, refresh: bool) -> list[DeviceInfo]:
    if refresh:
        _reinitialise(sd)
    try:
        default_in = sd.default.device[0]
        hostapis = sd.query_hostapis()
        devices = sd.query_devices()
    except sd.PortAudioError as exc:
        raise CaptureError(f"PortAudio cannot list devices: {exc}") from None
    return [
        DeviceInfo(
            index=i,
            name=d["name"],
            channels=d["max_input_channels"],
            default_rate=d["default_samplerate"],
            hostapi=hostapis[d["hostapi"]]["name"],
            is_default=(i == default_in),
        )
        for i, d in enumerate(devices)
        if d["max_input_channels"] > 0
    ]


def _reinitialise(sd: Any) -> None:
    """PortAudio builds its device list once; re-initialise it so a re-plugged or
    late USB mic is seen. Private API, but the documented way to do this."""
    try:
        sd._terminate()
        sd._initialize()
    except sd.PortAudioError as exc:
        raise CaptureError(f"PortAudio cannot be re-initialised: {exc}") from None


def _describe_devices(devices: list[DeviceInfo]) -> str:
    if not devices:
        return "no input devices at all"
    return "; ".join(f"{d.index}: '{d.name}' ({d.channels} ch, {d.default_rate:g} Hz)"
                     for d in devices)


def resolve_device(spec: str | int, devices: list[DeviceInfo]) -> DeviceInfo:
    """Pick an input device by index, case-insensitive name substring, or "default"."""
    if spec == "default":
        for d in devices:
            if d.is_default:
                return d
        if devices:
            return devices[0]
    elif isinstance(spec, int):
        for d in devices:
            if d.index == spec:
                return d
    else:
        matches = [d for d in devices if spec.lower() in d.name.lower()]
        if matches:
            return matches[0]
    raise CaptureError(f"no input device matches {spec!r}; available: {_describe_devices(devices)}")


class CaptureTimeline:
    """Capture times for the blocks of one stream, from the sample count.

    PortAudio's per-callback estimate (now minus the reported input latency) is
    noisy: through PulseAudio it jitters by a block or two and can be off by
    hundreds of milliseconds for the first second. Between overflows the stream
    is contiguous, so the sample count is the truth; the estimate only steers the
    timeline slowly (`gain` of the error per block, at most `max_slew` of the
    block's duration) so clock drift between the sound card and the system is
    followed without jitter and without spurious gaps. After an overflow (audio
    was lost) or an error beyond `resync_seconds` the timeline jumps forward to
    the estimate, and the ring records the gap. It never goes backwards, not
    even across streams: `not_before` is where the previous stream's timeline
    ended.
    """

    def __init__(
        self,
        rate: int,
        *,
        gain: float = 0.02,
        max_slew: float = 0.1,
        resync_seconds: float = 1.0,
        not_before: float | None = None,
    ) -> None:
        self.rate = rate
        self.gain = gain
        self.max_slew = max_slew
        self.resync_seconds = resync_seconds
        self.resyncs = 0
        # The most input latency believed: a stream cannot hold more audio than its
        # buffer, so a larger report is not a delay of the audio (PulseAudio's for a
        # monitor source is half a second too much; a host that does not know the
        # ADC time reports 0 for it). Such a report counts as no latency.
        self.max_latency = 1.0
        self._next: float | None = None  # where the next block starts on the timeline
        self._not_before = not_before

    @property
    def end(self) -> float | None:
        """Where the last stamped block ended (None before the first block)."""
        return self._next

    def latency(self, reported: float) -> float:
        """The input latency to subtract: PortAudio's report when it is believable."""
        return reported if 0.0 <= reported <= self.max_latency else 0.0

    def stamp(self, frames: int, estimate: float, *, overflow: bool = False) -> float:
        """Start time of a block of `frames` whose start the device estimates at `estimate`."""
        duration = frames / self.rate
        expected = self._next
        if expected is None:
            start = estimate if self._not_before is None else max(estimate, self._not_before)
        elif overflow or estimate - expected > self.resync_seconds:
            start = max(estimate, expected)
            self.resyncs += 1
        else:
            limit = self.max_slew * duration
            start = expected + min(limit, max(-limit, self.gain * (estimate - expected)))
        self._next = start + duration
        return start


@dataclass
class SoundDeviceSource:
    """A PortAudio input stream, chosen by name substring, index or "default".

    Every open re-initialises PortAudio first (its device list is built once), so
    a mic that appears late after boot or is re-plugged is found by name; this
    assumes the agent is the only PortAudio user in its process. Opening and
    closing run in worker threads; a close that hangs in the driver is abandoned
    after `close_timeout` so the capture task itself never hangs on it.
    """

    device: str | int
    rate: int
    channels: int
    format: SampleFormat
    clock: Clock
    block_ms: int = 20
    queue_blocks: int = 500
    stall_seconds: float = 5.0
    close_timeout: float = 5.0
    stats: SourceStats = field(default_factory=SourceStats)
    # The ring the blocks go to: Trio is woken when its readers have work.
    demand: Demand | None = None
    device_name: str = ""
    # Where the previous stream's timeline ended: a reopened stream starts after it.
    _timeline_end: float | None = field(default=None, init=False, repr=False)
    # PortAudio's open and close. An abandoned call that hangs in the driver keeps
    # its thread slot until it returns, so there are as many slots as Trio's own
    # default (40): reopening goes on through many hung closes.
    _runner: ThreadRunner = field(default_factory=lambda: ThreadRunner(40), init=False,
                                  repr=False)

    @asynccontextmanager
    async def open(self) -> AsyncIterator[AsyncIterator[Block]]:
        handoff = BlockHandoff(
            slots=self.queue_blocks, block_frames=self._block_frames(), channels=self.channels,
            dtype=numpy_dtype(self.format), stats=self.stats, demand=self.demand,
            max_hold_frames=max(1, round(self.rate * min(1.0, self.stall_seconds / 2))))
        timeline = CaptureTimeline(self.rate, not_before=self._timeline_end)
        # abandon_on_cancel: shutdown must not wait for a driver that hangs in open.
        stream = await self._runner.run_abandonable(self._start, handoff, timeline)
        log.info("capture opened device=%r rate=%d channels=%d format=%s",
                 self.device_name, self.rate, self.channels, self.format)
        try:
            yield self._blocks(handoff, stream)
        finally:
            with trio.move_on_after(self.close_timeout, shield=True) as scope:
                await self._runner.run_abandonable(_close_stream, stream)
            if scope.cancelled_caught:
                log.error("capture close hung device=%r timeout=%gs (abandoned; PortAudio "
                          "calls may now block until the process restarts)",
                          self.device_name, self.close_timeout)
            elif timeline.end is not None:
                self._timeline_end = timeline.end

    def _block_frames(self) -> int:
        return max(1, self.rate * self.block_ms // 1000)

    def _start(self, handoff: BlockHandoff, timeline: CaptureTimeline) -> Any:
        """Find the device, check the settings and start the stream (worker thread)."""
        sd = _sd()
        with _PORTAUDIO_LOCK:
            info = resolve_device(self.device, _list_locked(sd, refresh=True))
            self.device_name = info.name
            dtype = numpy_dtype(self.format)
            try:
                sd.check_input_settings(
                    device=info.index, channels=self.channels, dtype=dtype, samplerate=self.rate
                )
            except sd.PortAudioError as exc:
                if _pa_code(exc) in _SETTINGS_ERRORS:
                    raise CaptureError(
                        f"input device '{info.name}' refuses {self.rate} Hz, {self.channels} "
                        f"channel(s), {self.format}: {exc} (it reports {info.channels} ch, "
                        f"{info.default_rate:g} Hz)"
                    ) from None
                raise CaptureError(f"cannot open input device '{info.name}': {exc}") from None

            def finished() -> None:
                with contextlib.suppress(trio.RunFinishedError):
                    handoff.finish()

            self.stats.opens += 1
            blocksize = self._block_frames()
            try:
                stream = sd.InputStream(
                    device=info.index,
                    channels=self.channels,
                    samplerate=self.rate,
                    dtype=dtype,
                    blocksize=blocksize,
                    callback=self._make_callback(sd, handoff, timeline),
                    finished_callback=finished,
                )
            except sd.PortAudioError as exc:
                raise CaptureError(f"cannot open input device '{info.name}': {exc}") from None
            # Audio waiting in the stream's buffer plus the block being filled.
            timeline.max_latency = float(stream.latency) + blocksize / self.rate
            try:
                stream.start()
            except sd.PortAudioError as exc:
                _close_stream(stream)
                raise CaptureError(f"cannot start input device '{info.name}': {exc}") from None
            return stream

    def _make_callback(
        self, sd: Any, handoff: BlockHandoff, timeline: CaptureTimeline
    ) -> Callable[..., None]:
        clock = self.clock
        stats = self.stats

        def callback(indata: NDArray[Any], frames: int, time: Any, status: Any) -> None:
            overflow = bool(status.input_overflow)
            if overflow:
                stats.input_overflows += 1
            # PortAudio's times share one clock base, whichever it is; only their
            # difference (how long ago the ADC sampled frame 0) is used.
            latency = timeline.latency(time.currentTime - time.inputBufferAdcTime)
            mono_now = clock.mono()
            wall_offset = clock.utc() - mono_now
            mono = timeline.stamp(frames, mono_now - latency, overflow=overflow)
            stats.timeline_resyncs = timeline.resyncs
            try:
                handoff.put(indata, mono + wall_offset, mono)
            except trio.RunFinishedError:
                raise sd.CallbackAbort from None

        return callback

    def _blocks(self, handoff: BlockHandoff, stream: Any) -> QueuedBlocks:
        def check() -> bool:
            if handoff.finished or not stream.active:
                raise CaptureError(f"input device '{self.device_name}' stopped delivering "
                                   "audio (unplugged?)")
            return True

        return QueuedBlocks(handoff, check, self.stall_seconds,
                            f"input device '{self.device_name}' delivered no audio for "
                            f"{self.stall_seconds:g} s")


def _pa_code(exc: Exception) -> int | None:
    """The PortAudio error code of a sounddevice.PortAudioError, if it carries one."""
    code = exc.args[1] if len(exc.args) > 1 else None
    return code if isinstance(code, int) else None


def _close_stream(stream: Any) -> None:
    """Stop and close a stream whose device may be gone (worker thread)."""
    with _PORTAUDIO_LOCK:
        try:
            stream.abort(ignore_errors=True)
            stream.close(ignore_errors=True)
        except Exception:  # a vanished device can fail anything here; nothing to save
            log.debug("closing a lost stream failed", exc_info=True)
