"""The live transcription stage: the thin Trio shell around the synchronous parts.

One supervised Trio task reads the ring from its own cursor and cuts chunks
(`chunking`); each chunk is encoded off the event loop as a complete,
independently decodable Ogg Opus file and POSTed with one long-lived
`httpx.AsyncClient` in one of three wire protocols (`protocols`).

Live transcription is best effort. Chunks wait in a backlog bounded by seconds
of audio and by bytes (`backlog`); past either the oldest are dropped and
counted. A failed chunk (network error, timeout, 5xx, 408, 429) is retried with
capped full-jitter backoff, honouring `Retry-After`, while it is younger than
`max_age_seconds`; other 4xx and malformed answers drop it at once. Sending
never blocks reading: a reader overrun (the ring evicted audio not yet read) is
counted and logged with the seconds lost, and the stream starts afresh. Every
transcript is appended to a JSONL file per UTC day (`transcripts`).

Retries are a small loop on the supervisor's `Backoff` rather than a retry
library, for the reasons given in the uploader (full jitter, injectable RNG,
Trio time only) and because a chunk's freshness, not an attempt count, ends its
retries.

Owns `SttStreamer` and `SttStats`. Part of the `stt` stage: imports only the
bottom layer and its siblings; never agent, another stage or api. (The latency
`Histogram` import below is the one exception, pending its move out of metrics.)
"""

from __future__ import annotations

import logging
import random
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import trio
from numpy.typing import NDArray

from ..blocking import ThreadRunner
from ..clock import Clock, iso_utc
from ..config import ConfigError, SttConfig, check_stt_config, read_secret
from ..ring import AudioRing, RingReader
from ..stats import Histogram
from ..supervisor import Backoff, TaskStatus
from .backlog import Backlog, Chunk
from .chunking import Cut, StreamCutter, make_chunker
from .protocols import Malformed, Rejected, RetryLater, Wire, encode_chunk
from .transcripts import Transcript, TranscriptLog
from .vad import Vad

__all__ = ["SttStats", "SttStreamer"]

log = logging.getLogger(__name__)

#: Chunks refused in a row (4xx, malformed answers) before health says degraded.
REFUSALS_DEGRADE = 3

# Reads from the ring are capped so one step never holds much audio.
_MAX_READ_SECONDS: Final = 1.0
# Audio gathered before the streamer runs (a wake-up of the Trio thread): half a
# second adds that much to a transcript's latency (seconds, with VAD chunks) and
# saves 24 wake-ups a second against 20 ms capture blocks.
_READ_BATCH_SECONDS: Final = 0.5


@dataclass
class SttStats:
    """Counters for metrics and the device API; times are Trio times.

    Every chunk cut ends up in exactly one of: `chunks_sent`, `dropped_overflow`,
    `dropped_stale`, `dropped_rejected`, `bad_responses`, or still in the backlog.
    """

    chunks_cut: int = 0
    seconds_cut: float = 0.0
    chunks_sent: int = 0  # answered with a transcript (possibly empty)
    chunks_empty: int = 0  # of those, no speech recognised
    bytes_sent: int = 0
    requests: int = 0
    retries: int = 0  # failed attempts followed by another
    consecutive_failures: int = 0
    consecutive_refusals: int = 0  # chunks rejected or answered malformed, in a row
    dropped_overflow: int = 0  # pushed out of the full backlog
    dropped_stale: int = 0  # older than max_age_seconds before it got through
    dropped_rejected: int = 0  # a 4xx that retrying cannot fix
    bad_responses: int = 0  # malformed answers (the chunk is not sent again)
    seconds_dropped: float = 0.0
    overruns: int = 0  # the ring evicted audio before the streamer read it
    seconds_lost: float = 0.0
    seconds_skipped: float = 0.0  # silence never sent (VAD)
    discarded: int = 0  # too little speech to be worth a request
    backlog_chunks: int = 0
    backlog_seconds: float = 0.0
    backlog_bytes: int = 0
    backlog_peak_seconds: float = 0.0
    backlog_peak_bytes: int = 0
    last_latency_seconds: float | None = None
    # Round trips of successful requests, for the metrics histogram.
    latency: Histogram = field(default_factory=Histogram)
    last_error: str | None = None
    last_success_at: float | None = None

    @property
    def dropped(self) -> int:
        return (self.dropped_overflow + self.dropped_stale + self.dropped_rejected
                + self.bad_responses)


class SttStreamer:
    """The live transcription stage: reads `ring`, posts chunks to `config.url`.

    Register `run` with the supervisor. Configuration problems (including a
    missing token file) raise `ConfigError` here, at construction, not in the task.

    Args:
        config: the `[stt]` section.
        ring: the capture ring.
        device_id: sent with `raw` chunks and written with transcripts.
        data_dir: transcripts go to `data_dir/transcripts`.
        clock: wall-clock UTC (Retry-After dates).
        transport: an httpx transport (tests: `httpx.MockTransport`).
        rng: randomness for the backoff jitter (inject for exact tests).
        vad: replaces the configured detector.
        idle_flush_seconds: with no new audio for this long (capture ended or
            stalled) the pending chunk is sent as it is.
        runner: runs the blocking work (encoding chunks, writing transcripts),
            both kinds when given; default: a one-thread `ThreadRunner` for each
            kind. MockClock tests pass `InlineRunner()`, since autojump counts a
            thread as idle.
    """

    def __init__(
        self, config: SttConfig, ring: AudioRing, *, device_id: str, data_dir: Path,
        clock: Clock, transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None, vad: Vad | None = None,
        idle_flush_seconds: float = 1.0,
        runner: ThreadRunner | None = None,
    ) -> None:
        problems = check_stt_config(config)
        if problems:
            raise ConfigError(problems)
        self.config = config
        self.ring = ring
        self.device_id = device_id
        self.clock = clock
        self.stream_id = uuid.uuid4().hex
        self.stats = SttStats()
        self.transcripts = TranscriptLog(Path(data_dir) / "transcripts", config.transcript_days)
        self.recent: deque[Transcript] = deque(maxlen=100)
        self._token = (read_secret(config.token_file, "stt.token_file")
                       if config.token_file else None)
        self._wire = Wire(config, self._token, device_id, self.stream_id)
        self._transport = transport
        self._vad = vad
        self._idle_flush = idle_flush_seconds
        self.backoff = Backoff(initial=config.backoff_initial_seconds,
                               maximum=config.backoff_max_seconds, jitter=1.0,
                               rng=rng or random.Random())
        self._backlog = Backlog(config.backlog_seconds, config.backlog_bytes)
        # One chunk encoded and one transcript written at a time, each on its own.
        self._encode_runner = runner or ThreadRunner(1)
        self._io_runner = runner or ThreadRunner(1)
        self._lot = trio.lowlevel.ParkingLot()  # woken on every state change
        self._chunks = trio.lowlevel.ParkingLot()  # the send loop: woken when a chunk is queued
        # One cursor for the agent's life, from the first frame captured after this:
        # a restarted task resumes where it was.
        self._reader = ring.open_reader("stt")
        self._seq = 0
        self._inflight_scope: trio.CancelScope | None = None
        self._run_scope: trio.CancelScope | None = None
        self._next_config: tuple[SttConfig, str | None] | None = None
        self._reset_stream()

    # -- public ---------------------------------------------------------------

    def statistics(self) -> SttStats:
        """The counters, with the backlog's current size filled in."""
        s, b = self.stats, self._backlog
        s.backlog_chunks, s.backlog_seconds, s.backlog_bytes = len(b), b.seconds, b.bytes
        s.backlog_peak_seconds, s.backlog_peak_bytes = b.peak_seconds, b.peak_bytes
        return s

    def degraded(self) -> str | None:
        """Why transcription is not getting through right now, or None."""
        if self.stats.consecutive_failures:
            return (f"{self.stats.consecutive_failures} failed STT requests in a row: "
                    f"{self.stats.last_error}")
        if self.stats.consecutive_refusals >= REFUSALS_DEGRADE:
            # One bad chunk is the chunk's fault; several in a row are the setup's
            # (a wrong key, model or URL): every transcript is being lost.
            return (f"{self.stats.consecutive_refusals} STT chunks in a row refused or "
                    f"answered malformed: {self.stats.last_error}")
        return None

    @property
    def idle(self) -> bool:
        """Everything captured so far was read, cut, and sent or given up."""
        return (self._reader.lag <= 0 and self._cutter.pending_samples == 0
                and not self._cutter.open and len(self._backlog) == 0)

    async def wait_idle(self) -> None:
        """Wait until `idle` (bound it with a timeout)."""
        while not self.idle:
            await self._lot.park()

    def reconfigure(self, config: SttConfig) -> None:
        """Apply a changed `[stt]` section (SIGHUP): the stream restarts with it.
        Raises `ConfigError` (and keeps the running config) if it is unusable."""
        problems = check_stt_config(config)
        if problems:
            raise ConfigError(problems)
        token = read_secret(config.token_file, "stt.token_file") if config.token_file else None
        self._next_config = (config, token)
        if self._run_scope is not None:
            self._run_scope.cancel()  # `run` ends the stream and applies it
        else:
            self._apply_config()

    def _apply_config(self) -> None:
        if self._next_config is None:
            return
        (config, token), self._next_config = self._next_config, None
        self.config, self._token = config, token
        self._wire = Wire(config, token, self.device_id, self.stream_id)
        self.backoff.initial = config.backoff_initial_seconds
        self.backoff.maximum = config.backoff_max_seconds
        self._backlog.max_seconds = config.backlog_seconds
        self._backlog.max_bytes = config.backlog_bytes
        self.transcripts.days = config.transcript_days
        self._reset_stream()
        log.info("stt reconfigured protocol=%s url=%s chunking=%s", config.protocol,
                 config.url, config.chunking)

    async def run(self, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Stream until cancelled; ready once the HTTP client is open."""
        if self._cutter.open:
            # Restarted after a failure mid-stream: the half-cut chunk is not trusted.
            log.warning("stt restarted mid-stream; the pending chunk is dropped")
            self._reset_stream()
        while True:
            with trio.CancelScope() as self._run_scope:
                await self._run_once(task_status)
            self._run_scope = None
            task_status = trio.TASK_STATUS_IGNORED
            await self._end_stream("reconfigured")
            self._apply_config()

    # -- the two loops ----------------------------------------------------------

    async def _run_once(self, task_status: TaskStatus) -> None:
        cfg = self.config
        timeout = httpx.Timeout(cfg.timeout_seconds)
        client = httpx.AsyncClient(transport=self._transport, timeout=timeout,
                                   headers={"User-Agent": "edge-agent"}, follow_redirects=False)
        async with client, trio.open_nursery() as nursery:
            nursery.start_soon(self._send_loop, client)
            log.info("stt ready protocol=%s url=%s chunking=%s stream=%s", cfg.protocol,
                     cfg.url, cfg.chunking, self.stream_id)
            task_status.started()
            await self._read_loop(self._reader)

    async def _read_loop(self, reader: RingReader) -> None:
        ring = self.ring
        max_read = max(1, int(ring.rate * _MAX_READ_SECONDS))
        # Never longer than a chunk (fixed) or the pause that ends one (VAD): the
        # streamer still runs at least once per chunk.
        cfg = self.config
        step = cfg.chunk_seconds if cfg.chunking == "fixed" else cfg.vad_silence_seconds
        batch = max(1, round(ring.rate * min(_READ_BATCH_SECONDS, step)))
        while True:
            # One wake-up per batch, not per capture block.
            with trio.move_on_after(self._idle_flush) as waited:
                await reader.wait(batch)
            if waited.cancelled_caught and reader.lag <= 0:
                if self._cutter.open:
                    await self._end_stream("idle")
                self._lot.unpark_all()
                continue
            got = reader.read(max_read)
            if got.lost:
                await self._overrun(got.lost)
            start, frames = got.start, got.frames
            # A capture gap inside what was read ends the stream there: a chunk
            # must not span a hole in time.
            for gap in ring.gaps(start - 1, start + len(frames) - 1):
                split = gap.index - start
                await self._process(frames[:split], start)
                await self._end_stream("gap")
                start, frames = gap.index, frames[split:]
            await self._process(frames, start)
            self._lot.unpark_all()

    async def _send_loop(self, client: httpx.AsyncClient) -> None:
        while True:
            chunk = self._backlog.take()
            if chunk is None:
                await self._chunks.park()
                continue
            result, finished = None, False
            try:
                # Cancelled by `_ship` when the backlog overflows into this chunk.
                with trio.CancelScope() as self._inflight_scope:
                    result = await self._deliver(client, chunk)
                finished = True
            finally:
                self._inflight_scope = None
                if not finished:  # a restart or shutdown: it waits for the next run
                    self._backlog.release(chunk)
            self._backlog.done(chunk)
            if result is not None:
                await self._record(chunk, *result)
            self._lot.unpark_all()

    # -- reading and cutting -----------------------------------------------------

    def _reset_stream(self) -> None:
        cfg = self.config
        self._cutter = StreamCutter(make_chunker(cfg, self._vad), self.ring.rate, cfg.rate)

    async def _process(self, frames: NDArray[Any], start: int) -> None:
        cutter = self._cutter
        for cut in cutter.feed(frames, start):
            await self._ship(cut, cutter.ring_index(cut))
        self._count_skipped()

    async def _end_stream(self, why: str) -> None:
        """Flush the resampler and chunker (send what is pending) and start afresh."""
        cutter = self._cutter
        if cutter.open:
            cuts = cutter.end()
            self._count_skipped()
            for cut in cuts:
                await self._ship(cut, cutter.ring_index(cut))
            log.debug("stt stream ended reason=%s", why)
        self._reset_stream()

    def _count_skipped(self) -> None:
        skipped, discarded = self._cutter.take_counts()
        self.stats.seconds_skipped += skipped / self.config.rate
        self.stats.discarded += discarded

    async def _overrun(self, lost: int) -> None:
        seconds = lost / self.ring.rate
        self.stats.overruns += 1
        self.stats.seconds_lost += seconds
        log.warning("stt reader overrun seconds_lost=%.3f overruns=%d (the ring evicted audio "
                    "before it was read; skipping ahead)", seconds, self.stats.overruns)
        await self._end_stream("overrun")

    async def _ship(self, cut: Cut, index: int) -> None:
        """Encode a cut (starting at ring `index`) off the event loop and put it in
        the backlog."""
        cfg, ring = self.config, self.ring
        start_utc = ring.index_to_utc(index)
        synced = ring.anchor_at(index).synced
        duration = len(cut.pcm) / cfg.rate
        with trio.CancelScope(shield=True):  # a cut being encoded is not lost to a restart
            ogg = await self._encode_runner.run(encode_chunk, cut.pcm, cfg.rate, cfg.bitrate,
                                                cfg.complexity)
        chunk = Chunk(self._seq, start_utc, duration, synced, ogg, trio.current_time())
        self._seq += 1
        self.stats.chunks_cut += 1
        self.stats.seconds_cut += duration
        sending = self._backlog.inflight
        for old in self._backlog.push(chunk):
            self.stats.dropped_overflow += 1
            self.stats.seconds_dropped += old.duration
            log.warning("stt chunk dropped reason=backlog_full seq=%d seconds=%.2f "
                        "dropped_overflow=%d", old.seq, old.duration, self.stats.dropped_overflow)
            if old is sending and self._inflight_scope is not None:
                self._inflight_scope.cancel()  # the oldest was the one being sent
        self._chunks.unpark_all()
        self._lot.unpark_all()

    # -- sending -------------------------------------------------------------

    async def _deliver(
        self, client: httpx.AsyncClient, chunk: Chunk
    ) -> tuple[str, float, int] | None:
        """Send one chunk, retrying while it is fresh; (text, latency, attempts) or
        None when it was given up (counted)."""
        cfg, stats = self.config, self.stats
        attempts = 0
        while True:
            attempts += 1
            stats.requests += 1
            began = trio.current_time()
            try:
                req = self._wire.request(chunk)
                with trio.fail_after(cfg.timeout_seconds):
                    resp = await client.post(req.url, content=req.content, data=req.data,
                                             files=req.files, headers=req.headers)
                text = self._wire.text(resp, self.clock.utc())
            except Rejected as exc:
                self._given_up(chunk, "rejected", str(exc))
                stats.dropped_rejected += 1
                stats.consecutive_failures = 0  # the endpoint is up, but refuses
                stats.consecutive_refusals += 1
                return None
            except Malformed as exc:
                self._given_up(chunk, "bad_response", str(exc))
                stats.bad_responses += 1
                stats.consecutive_failures = 0
                stats.consecutive_refusals += 1
                return None
            except (RetryLater, httpx.RequestError, trio.TooSlowError) as exc:
                reason = str(exc) or type(exc).__name__
                if isinstance(exc, trio.TooSlowError):
                    reason = f"no answer within {cfg.timeout_seconds:g} s"
                elif isinstance(exc, httpx.HTTPError):
                    reason = f"{type(exc).__name__}: {reason}"
                stats.consecutive_failures += 1
                stats.last_error = reason
                delay = self.backoff.delay(stats.consecutive_failures - 1)
                if isinstance(exc, RetryLater) and exc.retry_after is not None:
                    delay = min(max(delay, exc.retry_after), cfg.max_age_seconds)
                age = trio.current_time() - chunk.cut_at
                if age + delay > cfg.max_age_seconds:
                    stats.dropped_stale += 1
                    self._given_up(chunk, "stale", f"{reason}; next try would be "
                                   f"{age + delay:.1f} s after the cut")
                    return None
                stats.retries += 1
                log.info("stt retry seq=%d attempt=%d error=%r in=%.2fs", chunk.seq, attempts,
                         reason, delay)
                await trio.sleep(delay)
                continue
            return text, trio.current_time() - began, attempts

    def _given_up(self, chunk: Chunk, why: str, detail: str) -> None:
        self.stats.seconds_dropped += chunk.duration
        self.stats.last_error = detail
        log.warning("stt chunk dropped reason=%s seq=%d seconds=%.2f detail=%r", why,
                    chunk.seq, chunk.duration, detail)

    async def _record(self, chunk: Chunk, text: str, latency: float, attempts: int) -> None:
        stats = self.stats
        stats.chunks_sent += 1
        stats.bytes_sent += len(chunk.ogg)
        stats.consecutive_failures = 0
        stats.consecutive_refusals = 0
        stats.last_latency_seconds = latency
        stats.latency.observe(latency)
        stats.last_success_at = trio.current_time()
        text = text.strip()
        log.info("stt transcript seq=%d start=%s seconds=%.2f latency=%.3f text=%r", chunk.seq,
                 iso_utc(chunk.start_utc), chunk.duration, latency, text)
        if not text:
            stats.chunks_empty += 1
            return
        t = Transcript(
            seq=chunk.seq, stream_id=self.stream_id, device_id=self.device_id,
            start_utc=iso_utc(chunk.start_utc), end_utc=iso_utc(chunk.end_utc),
            duration=round(chunk.duration, 6), text=text, protocol=self.config.protocol,
            latency_seconds=round(latency, 6),
            age_seconds=round(trio.current_time() - chunk.cut_at, 6), attempts=attempts,
            clock_synced=chunk.synced,
        )
        self.recent.append(t)
        try:
            await self._io_runner.run(self.transcripts.append, t)
        except OSError as exc:  # a full disk must not stop transcription
            log.error("stt transcript not written error=%r", str(exc))
