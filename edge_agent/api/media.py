"""The media routes of the device API: ``/v1/audio`` (a planned stretch of audio
in a chosen format) and ``/v1/live`` (Opus as it is captured).

``/v1/audio`` plans the whole response from metadata before the first byte
(`cut.plan_held`); the body is then produced block by block in worker threads
(`cut.produce`, shared with the fleet's answers and ``fleet get``; at most one
decoded segment in memory) under a concurrency cap: at most
``api.max_audio_encodes`` responses at once, others queue for
``api.audio_queue_seconds`` or get a 503. If audio planned from the ring is
evicted before it is sent, or a segment cannot be decoded, the response is cut
off (`Abort`).

Gaps header: ``X-Audio-Gaps: <utc>/<seconds>@<offset>, ...``: each hole starts
at ``<utc>``, lasts ``<seconds>``, and sits ``<offset>`` seconds into the
returned audio (where silence starts with ``fill=silence``).

Imports only the bottom layer (ring, clock, blocking, audio, wire, config) and
the API's own modules; never agent, another stage, metrics or systemd.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Final

import trio
from numpy.typing import NDArray
from starlette.requests import Request

from ..audio.encoders import make_encoder
from ..audio.pcm import SampleFormat, mix_down
from ..blocking import ThreadRunner
from ..clock import Clock, iso_utc
from ..config import ApiConfig
from ..ring import AudioRing
from .counters import ApiStats
from .cut import (
    AUDIO_FORMATS,
    EXTENSIONS,
    OPUS_BITRATE,
    RangeTooLong,
    oldest_held,
    open_renderer,
    plan_held,
    produce,
    spool_reader,
)
from .params import ApiError, choice, int_param, query_params, time_param
from .plan import MAX_GAPS_LISTED, AudioPlan, SegmentPiece
from .render import Abort, Renderer, Sink, StreamResponse
from .seams import SpoolView

__all__ = ["AUDIO_FORMATS", "EXTENSIONS", "GAPS_HEADER", "MediaRoutes"]

#: Response header listing the holes in a /v1/audio response (see the module doc).
GAPS_HEADER: Final = "X-Audio-Gaps"

_MIN_RATE, _MAX_RATE = 8000, 192000
_MAX_CHANNELS = 8
_CAPTURE_WAIT = 2.0  # how long /v1/audio waits for capture to reach `end`
_FUTURE_SLACK = 1.0  # an `end` this far past the device's clock is still "now"
_LIVE_FLUSH = 0.25  # seconds between Ogg pages forced out to a live listener


class MediaRoutes:
    """The handlers of ``/v1/audio`` and ``/v1/live`` and what they share: the
    encode slots, the worker threads and the API's counters.

    Args:
        config: the API's section (`reconfigure` replaces it on reload).
        device_id: named in file names and Opus comments.
        ring, clock: what audio is held, and the device's time.
        spool: spooled segments, or None when segments are disabled.
        capture_finished: set once the source has ended (nothing more will come).
        stats: the API's counters.
        encode_runner, io_runner: worker threads for encoding and for reading
            segments (default: ``api.max_audio_encodes`` and 4 at a time).
    """

    def __init__(self, config: ApiConfig, *, device_id: str, ring: AudioRing, clock: Clock,
                 spool: SpoolView | None, capture_finished: trio.Event, stats: ApiStats,
                 encode_runner: ThreadRunner | None = None,
                 io_runner: ThreadRunner | None = None) -> None:
        self.config = config
        self.device_id = device_id
        self.ring = ring
        self.clock = clock
        self.spool = spool
        self.capture_finished = capture_finished
        self.stats = stats
        self.encode_runner = encode_runner or ThreadRunner(config.max_audio_encodes)
        self.io_runner = io_runner or ThreadRunner(4)
        self._audio_slots = trio.CapacityLimiter(config.max_audio_encodes)

    def reconfigure(self, config: ApiConfig) -> None:
        """Apply a reloaded ``[api]`` section (limits take effect for new requests)."""
        self.config = config
        self._audio_slots.total_tokens = config.max_audio_encodes
        self.encode_runner.limiter.total_tokens = config.max_audio_encodes

    # -- /v1/audio ----------------------------------------------------------------

    async def audio(self, request: Request) -> StreamResponse:
        ring = self.ring
        cfg = self.config
        p = query_params(request, ("start", "end", "format", "rate", "channels", "fill", "bitrate"))
        start = time_param(p, "start", required=True)
        end = time_param(p, "end", required=True)
        assert start is not None and end is not None
        if end <= start:
            raise ApiError(400, f"end: expected a time after start ({iso_utc(start)}), got "
                                f"{iso_utc(end)}", "end")
        if end - start > cfg.max_range_seconds:
            raise ApiError(400, f"end: the range is {end - start:g} s long; at most "
                                f"{cfg.max_range_seconds:g} s (api.max_range_seconds)", "end")
        fmt = choice(p, "format", "opus", AUDIO_FORMATS)
        rate = int_param(p, "rate", ring.rate, _MIN_RATE, _MAX_RATE)
        channels = int_param(p, "channels", ring.channels, 1, _MAX_CHANNELS)
        if ring.channels > 1 and channels > ring.channels:
            raise ApiError(400, f"channels: expected at most {ring.channels} (the channels "
                                f"captured), got {channels}", "channels")
        fill = choice(p, "fill", "none", ("none", "silence")) == "silence"
        if "bitrate" in p and fmt != "opus":
            raise ApiError(400, "bitrate: only for format=opus", "bitrate")
        bitrate = int_param(p, "bitrate", OPUS_BITRATE, 6000, 256000)
        now = self.clock.utc()
        if end > now + _FUTURE_SLACK:
            raise ApiError(400, f"end: {iso_utc(end)} is in the future (the device's clock "
                                f"says {iso_utc(now)})", "end")

        head_only = request.method == "HEAD"
        token = None if head_only else await self._acquire_audio_slot()
        try:
            await self._wait_for_capture(end)
            plan = self._plan(start, end, fill)
            try:
                renderer = open_renderer(plan, fmt, rate=rate, channels=channels,
                                         device_id=self.device_id, bitrate=bitrate)
            except RangeTooLong as exc:
                raise ApiError(400, f"format: {exc}", "format") from None
        except BaseException:
            if token is not None:
                self._audio_slots.release_on_behalf_of(token)
            raise
        headers = self._audio_headers(plan, fmt, rate, channels, renderer, start)
        self.stats.audio_requests += 1
        if head_only:
            renderer.close()
            return StreamResponse(200, headers, None, stall=1.0, what="audio")
        self.stats.audio_active += 1
        self.stats.audio_seconds += plan.frames / ring.rate

        def release() -> None:  # StreamResponse runs it exactly once
            self.stats.audio_active -= 1
            self._audio_slots.release_on_behalf_of(token)

        def aborted() -> None:
            self.stats.audio_aborted += 1

        what = f"audio {iso_utc(start)}..{iso_utc(end)} {fmt}"
        return StreamResponse(200, headers, partial(self._produce_audio, plan, renderer),
                              stall=cfg.request_timeout_seconds, what=what, release=release,
                              on_abort=aborted)

    async def _acquire_audio_slot(self) -> object:
        cfg, st = self.config, self.stats
        token = object()
        busy = ApiError(503, f"busy: {cfg.max_audio_encodes} audio requests are being served "
                             "(api.max_audio_encodes); retry later",
                        headers={"Retry-After": str(max(1, math.ceil(cfg.audio_queue_seconds)))})
        if (self._audio_slots.available_tokens == 0
                and self._audio_slots.statistics().tasks_waiting >= cfg.max_audio_queue):
            st.audio_busy += 1
            raise busy
        with trio.move_on_after(cfg.audio_queue_seconds):
            await self._audio_slots.acquire_on_behalf_of(token)
            return token
        st.audio_busy += 1
        raise busy

    async def _wait_for_capture(self, end: float) -> None:
        """Give capture a moment to reach ``end`` (a request for "the last N seconds")."""
        ring = self.ring
        if self.capture_finished.is_set():
            return
        with trio.move_on_after(_CAPTURE_WAIT):
            while ring.head == 0 or ring.index_to_utc(ring.head) < end:
                missing = 1 if ring.head == 0 else (end - ring.index_to_utc(ring.head)) * ring.rate
                await ring.wait_for(ring.head + max(1, math.ceil(missing)))

    def _plan(self, start: float, end: float, fill: bool) -> AudioPlan:
        plan = plan_held(self.ring, self.spool, start, end, fill=fill)
        if plan.audio_frames == 0:
            oldest = oldest_held(self.ring, self.spool)
            where = (f"the oldest audio held starts at {iso_utc(oldest)}" if oldest is not None
                     else "no audio is held")
            raise ApiError(404, f"no audio held between {iso_utc(start)} and {iso_utc(end)}; "
                                f"{where}", "start",
                           oldest=iso_utc(oldest) if oldest is not None else None)
        return plan

    def _audio_headers(self, plan: AudioPlan, fmt: str, rate: int, channels: int,
                       renderer: Renderer, start: float) -> dict[str, str]:
        headers = {
            "Content-Type": AUDIO_FORMATS[fmt],
            "Cache-Control": "no-store",
            "Content-Disposition": (f'inline; filename="{self.device_id}_'
                                    f'{iso_utc(plan.first_utc or start).replace(":", "")}'
                                    f'.{EXTENSIONS[fmt]}"'),
            "X-Audio-Start": iso_utc(plan.first_utc if plan.first_utc is not None else start),
            "X-Audio-End": iso_utc(plan.last_utc if plan.last_utc is not None else start),
            "X-Audio-Rate": str(rate),
            "X-Audio-Channels": str(channels),
            "X-Audio-Frames": str(renderer.frames_out),
            "X-Audio-Source": ",".join(plan.sources),
            "X-Audio-Gap-Seconds": f"{sum(g.seconds for g in plan.gaps):.6f}",
        }
        if fmt in ("pcm", "wav"):
            headers["X-Audio-Sample-Format"] = "s16le"
        if plan.gaps:
            headers[GAPS_HEADER] = plan.gaps_header()
            if len(plan.gaps) > MAX_GAPS_LISTED:
                headers["X-Audio-Gaps-Total"] = str(len(plan.gaps))
        if (length := renderer.content_length) is not None:
            headers["Content-Length"] = str(length)
        return headers

    async def _produce_audio(self, plan: AudioPlan, renderer: Renderer, sink: Sink) -> None:
        read = (spool_reader(self.spool, self.ring.rate) if self.spool is not None
                else _no_segments)
        await produce(plan, renderer, sink, ring=self.ring, read_segment=read,
                      encode_runner=self.encode_runner, io_runner=self.io_runner)

    # -- /v1/live -----------------------------------------------------------------

    async def live(self, request: Request) -> StreamResponse:
        ring = self.ring
        cfg, st = self.config, self.stats
        p = query_params(request, ("format", "seconds", "channels", "bitrate"))
        choice(p, "format", "opus", ("opus",))
        limit = int(cfg.live_max_seconds)
        seconds = int_param(p, "seconds", limit, 1, max(1, limit))
        channels = int_param(p, "channels", min(ring.channels, 2), 1, _MAX_CHANNELS)
        if ring.channels > 1 and channels > ring.channels:
            raise ApiError(400, f"channels: expected at most {ring.channels}, got {channels}",
                           "channels")
        bitrate = int_param(p, "bitrate", OPUS_BITRATE, 6000, 256000)
        headers = {"Content-Type": AUDIO_FORMATS["opus"], "Cache-Control": "no-store",
                   "X-Audio-Rate": str(ring.rate), "X-Audio-Channels": str(channels)}
        if request.method == "HEAD":
            return StreamResponse(200, headers, None, stall=1.0, what="live")
        if st.live_listeners >= cfg.max_live_listeners:
            st.live_rejected += 1
            raise ApiError(503, f"busy: {st.live_listeners} live listeners "
                                "(api.max_live_listeners)", headers={"Retry-After": "10"})
        st.live_listeners += 1
        st.live_sessions += 1

        def release() -> None:  # StreamResponse runs it exactly once
            st.live_listeners -= 1

        return StreamResponse(200, headers, partial(self._produce_live, seconds, channels,
                                                    bitrate),
                              stall=cfg.request_timeout_seconds, what="live", release=release)

    async def _produce_live(self, seconds: int, channels: int, bitrate: int,
                            sink: Sink) -> None:
        ring = self.ring
        st = self.stats
        encoder = make_encoder("opus", ring.rate, channels, SampleFormat.FLOAT32,
                               bitrate=bitrate, application="audio",
                               comments={"ENCODER": "edge-agent", "DEVICE": self.device_id},
                               max_page_delay_ms=int(_LIVE_FLUSH * 1000))
        threads = self.encode_runner
        step = max(1, round(_LIVE_FLUSH * ring.rate))

        def encode(pcm: NDArray[Any]) -> bytes:
            # Flushed after every block: the listener hears it now, not a page later.
            return encoder.write(mix_down(pcm, channels)) + encoder.flush()

        def finish() -> bytes:
            return encoder.finish()[0]

        try:
            with ring.open_reader("api-live") as reader:
                await sink.send(await threads.run(encoder.start))
                wanted = seconds * ring.rate
                sent = 0
                # Capture may stall: the stream still ends on time.
                give_up = trio.current_time() + seconds + 5 * _LIVE_FLUSH
                while sent < wanted and trio.current_time() < give_up:
                    with trio.move_on_after(_LIVE_FLUSH * 2):
                        await reader.wait(min(step, wanted - sent))
                    got = reader.read(min(wanted - sent, ring.rate))
                    if got.lost:
                        st.live_overruns += 1
                        st.live_lost_seconds += got.lost / ring.rate
                    if len(got.frames):
                        sent += len(got.frames)
                        await sink.send(await threads.run(encode, got.frames))
                await sink.send(await threads.run(finish))
        finally:
            encoder.close()


def _no_segments(piece: SegmentPiece) -> NDArray[Any]:
    """Never called: without a spool no segment is planned."""
    raise Abort(f"segment {piece.meta.id}: segments are disabled")
