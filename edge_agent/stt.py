"""Live transcription: speech from the ring goes to a remote STT endpoint in chunks.

One supervised Trio task reads the ring from its own cursor, mixes down and
resamples to the STT format (16 kHz mono by default), and cuts chunks: every N
seconds (`fixed`) or at pauses in speech (`vad`, which sends nothing for
silence). Each chunk is encoded off the event loop as a complete, independently
decodable Ogg Opus file and POSTed with one long-lived `httpx.AsyncClient` in one
of three wire protocols:

* `openai`: multipart `file` (chunk.ogg, audio/ogg), `model`, `language`,
  `prompt`, `response_format=json`; reads `{"text": ...}`.
* `deepgram`: the Ogg file as the body, `Authorization: Token <key>`; reads
  `results.channels[0].alternatives[0].transcript`.
* `raw`: the Ogg file as the body (`audio/ogg; codecs=opus`) with the chunk's
  place on the timeline in headers (see `RAW_HEADERS`); reads `{"text": ...}`,
  204 means no speech.

Live transcription is best effort. Chunks wait in a backlog bounded by seconds
of audio and by bytes; past either the oldest are dropped and counted. A failed
chunk (network error, timeout, 5xx, 408, 429) is retried with capped full-jitter
backoff, honouring `Retry-After`, while it is younger than `max_age_seconds`;
other 4xx and malformed answers drop it at once. Sending never blocks reading:
a reader overrun (the ring evicted audio not yet read) is counted and logged
with the seconds lost, and the stream starts afresh. Every transcript is
appended to a JSONL file per UTC day under `data_dir/transcripts`.

Retries are a small loop on the supervisor's `Backoff` rather than `stamina`,
for the reasons given in `uploader.py` (full jitter, injectable RNG, Trio time
only) and because a chunk's freshness, not an attempt count, ends its retries.
"""

from __future__ import annotations

import json
import logging
import os
import random
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Final, Protocol

import httpx
import msgspec
import numpy as np
import trio
from numpy.typing import NDArray

from .audio.opus import encode_ogg_opus
from .audio.pcm import SampleFormat, from_float32, mix_down
from .audio.resample import StreamResampler
from .clock import Clock, iso_utc
from .config import ConfigError, SttConfig, check_stt_config, read_secret
from .ring import AudioRing, RingReader
from .stats import Histogram
from .supervisor import Backoff, TaskStatus
from .vad import Vad, make_vad
from .wire import CHUNK_FILENAME, RAW_CONTENT_TYPE, RAW_HEADERS, parse_retry_after

__all__ = [
    "CHUNK_FILENAME",
    "RAW_CONTENT_TYPE",
    "RAW_HEADERS",
    "Backlog",
    "Chunk",
    "Chunker",
    "Cut",
    "FixedChunker",
    "SttStats",
    "SttStreamer",
    "Transcript",
    "TranscriptLog",
    "VadChunker",
    "read_transcripts",
]

log = logging.getLogger(__name__)

_APPLICATION: Final = "voip"  # libopus tuned for speech intelligibility
_RETRYABLE_STATUS: Final = frozenset({408, 425, 429})
# Reads from the ring are capped so one step never holds much audio.
_MAX_READ_SECONDS: Final = 1.0
# Ogg/Opus overhead on top of the bitrate, for sizing checks (pages, headers).


# ----------------------------------------------------------------------------
# Config checks


# ----------------------------------------------------------------------------
# Chunking (synchronous, no I/O)


@dataclass(frozen=True, slots=True)
class Cut:
    """One chunk's PCM at the STT rate and where it starts (samples since the
    stream began); `voiced` is how much of it the VAD judged speech."""

    pcm: NDArray[np.int16]
    start: int
    voiced: float


class Chunker(Protocol):
    """Turns a stream of 16-bit mono PCM into chunks."""

    skipped_samples: int  # silence never put into a chunk
    discarded: int  # chunks cut but not worth sending (a click, a cough)

    def feed(self, pcm: NDArray[np.int16]) -> list[Cut]: ...

    def flush(self) -> list[Cut]:
        """End the stream: return what is pending and start again at sample 0."""
        ...

    @property
    def pending_samples(self) -> int: ...


class FixedChunker:
    """A chunk every `seconds` of audio, speech or not."""

    def __init__(self, rate: int, seconds: float) -> None:
        self.rate = rate
        self.size = max(1, round(seconds * rate))
        self.skipped_samples = 0
        self.discarded = 0
        self._parts: list[NDArray[np.int16]] = []
        self._pending = 0
        self._pos = 0  # stream position of the first pending sample

    @property
    def pending_samples(self) -> int:
        return self._pending

    def feed(self, pcm: NDArray[np.int16]) -> list[Cut]:
        if len(pcm):
            self._parts.append(pcm)
            self._pending += len(pcm)
        out: list[Cut] = []
        while self._pending >= self.size:
            data = np.concatenate(self._parts)
            out.append(Cut(data[: self.size].copy(), self._pos, self.size / self.rate))
            rest = data[self.size :]
            self._parts = [rest] if len(rest) else []
            self._pending = len(rest)
            self._pos += self.size
        return out

    def flush(self) -> list[Cut]:
        out: list[Cut] = []
        if self._pending:
            data = np.concatenate(self._parts)
            out.append(Cut(data, self._pos, len(data) / self.rate))
        self._parts, self._pending, self._pos = [], 0, 0
        return out


class VadChunker:
    """Chunks cut at pauses in speech; silence is never sent.

    A chunk starts at the first frame the VAD calls speech, with `preroll`
    seconds of audio before it (word onsets are quiet). It ends once a pause of
    `silence` seconds follows at least `min_chunk` seconds of audio, keeping up
    to `preroll` seconds of the pause. A shorter utterance is joined with what
    follows within `min_chunk` seconds, else sent alone. A chunk reaching
    `max_chunk` seconds is cut there. Chunks with less than `min_voiced` seconds
    of speech (clicks, coughs) are discarded and counted.
    """

    def __init__(
        self, vad: Vad, *, min_chunk: float, max_chunk: float, silence: float,
        preroll: float, min_voiced: float = 0.15,
    ) -> None:
        self.vad = vad
        self.rate = vad.rate
        self.frame = vad.frame_samples
        per_s = self.rate / self.frame
        self._min = max(1, round(min_chunk * per_s))
        self._max = max(1, round(max_chunk * per_s))
        self._silence = max(1, round(silence * per_s))
        self._hold = max(self._silence, self._min)
        self._roll = max(0, round(preroll * per_s))
        self._min_voiced = max(1, round(min_voiced * per_s))
        self.skipped_samples = 0
        self.discarded = 0
        self._carry: NDArray[np.int16] = np.zeros(0, np.int16)
        self._preroll: deque[NDArray[np.int16]] = deque()
        self._chunk: list[NDArray[np.int16]] = []
        self._start = 0
        self._trailing = 0  # silent frames at the end of the chunk
        self._voiced = 0
        self._pos = 0  # stream position of the next frame

    @property
    def pending_samples(self) -> int:
        return len(self._chunk) * self.frame + len(self._carry)

    def feed(self, pcm: NDArray[np.int16]) -> list[Cut]:
        data = np.concatenate([self._carry, pcm]) if len(self._carry) else pcm
        whole = len(data) // self.frame
        out: list[Cut] = []
        for i in range(whole):
            cut = self._frame_in(data[i * self.frame : (i + 1) * self.frame])
            if cut is not None:
                out.append(cut)
        self._carry = data[whole * self.frame :].copy()
        return out

    def flush(self) -> list[Cut]:
        out: list[Cut] = []
        if self._chunk:
            cut = self._emit(len(self._chunk) - self._trailing + min(self._trailing, self._roll))
            if cut is not None:
                out.append(cut)
        self.skipped_samples += sum(len(f) for f in self._preroll) + len(self._carry)
        self._preroll.clear()
        self._carry = np.zeros(0, np.int16)
        self._pos = 0
        return out

    def _frame_in(self, frame: NDArray[np.int16]) -> Cut | None:
        speech = self.vad.is_speech(frame)
        pos = self._pos
        self._pos += self.frame
        if not self._chunk:
            if not speech:
                self._preroll.append(frame)
                if len(self._preroll) > self._roll:
                    self.skipped_samples += len(self._preroll.popleft())
                return None
            self._chunk = [*self._preroll, frame]
            self._start = pos - len(self._preroll) * self.frame
            self._preroll.clear()
            self._trailing, self._voiced = 0, 1
            return None
        self._chunk.append(frame)
        if speech:
            self._trailing = 0
            self._voiced += 1
        else:
            self._trailing += 1
        spoken = len(self._chunk) - self._trailing
        pause = self._trailing >= self._silence
        if pause and (spoken >= self._min or self._trailing >= self._hold):
            return self._emit(spoken + min(self._trailing, self._roll))
        if len(self._chunk) >= self._max:
            return self._emit(len(self._chunk))
        return None

    def _emit(self, keep: int) -> Cut | None:
        """Send the first `keep` frames of the chunk; the rest is silence that may
        become the next chunk's preroll."""
        frames, rest = self._chunk[:keep], self._chunk[keep:]
        start, voiced = self._start, self._voiced
        self._chunk, self._trailing, self._voiced = [], 0, 0
        for f in rest:
            self._preroll.append(f)
            if len(self._preroll) > self._roll:
                self.skipped_samples += len(self._preroll.popleft())
        if voiced < self._min_voiced:
            self.discarded += 1
            self.skipped_samples += sum(len(f) for f in frames)
            return None
        return Cut(np.concatenate(frames), start, voiced * self.frame / self.rate)


def make_chunker(cfg: SttConfig, vad: Vad | None = None) -> Chunker:
    """The chunker `cfg.chunking` asks for (a given `vad` replaces the configured one)."""
    if cfg.chunking == "fixed":
        return FixedChunker(cfg.rate, cfg.chunk_seconds)
    detector = vad or make_vad(cfg.vad, cfg.rate, aggressiveness=cfg.vad_aggressiveness)
    return VadChunker(detector, min_chunk=cfg.min_chunk_seconds,
                      max_chunk=cfg.max_chunk_seconds, silence=cfg.vad_silence_seconds,
                      preroll=cfg.vad_preroll_seconds)


# ----------------------------------------------------------------------------
# Chunks and the backlog


@dataclass(frozen=True, slots=True)
class Chunk:
    """One encoded chunk ready to send; `cut_at` is the Trio time it was cut."""

    seq: int
    start_utc: float
    duration: float
    synced: bool
    ogg: bytes
    cut_at: float

    @property
    def end_utc(self) -> float:
        return self.start_utc + self.duration


class Backlog:
    """Chunks waiting to be sent, plus the one in flight, bounded by audio seconds
    and bytes. `push` returns what it had to drop to stay within both, oldest
    first, starting with the chunk in flight (the caller abandons it): when the
    endpoint cannot keep up, the freshest speech is what is worth sending."""

    def __init__(self, max_seconds: float, max_bytes: int) -> None:
        self.max_seconds = max_seconds
        self.max_bytes = max_bytes
        self.queue: deque[Chunk] = deque()
        self.inflight: Chunk | None = None
        self.seconds = 0.0
        self.bytes = 0
        self.peak_seconds = 0.0
        self.peak_bytes = 0

    def __len__(self) -> int:
        return len(self.queue) + (self.inflight is not None)

    def push(self, chunk: Chunk) -> list[Chunk]:
        dropped: list[Chunk] = []
        while self._over(chunk):
            if self.inflight is not None:  # the oldest: it has had its chance
                old, self.inflight = self.inflight, None
            elif self.queue:
                old = self.queue.popleft()
            else:
                break  # a chunk larger than the limits alone is still sent (config forbids it)
            self._account(old, -1)
            dropped.append(old)
        self.queue.append(chunk)
        self._account(chunk, +1)
        self.peak_seconds = max(self.peak_seconds, self.seconds)
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        return dropped

    def take(self) -> Chunk | None:
        """Move the oldest waiting chunk in flight."""
        if self.inflight is not None or not self.queue:
            return None
        self.inflight = self.queue.popleft()
        return self.inflight

    def done(self, chunk: Chunk) -> None:
        """The chunk in flight is finished with (sent or given up)."""
        if self.inflight is chunk:
            self.inflight = None
            self._account(chunk, -1)

    def release(self, chunk: Chunk) -> None:
        """The chunk in flight was interrupted (restart): it is the oldest again."""
        if self.inflight is chunk:
            self.inflight = None
            self.queue.appendleft(chunk)

    def _over(self, new: Chunk) -> bool:
        return (self.seconds + new.duration > self.max_seconds + 1e-9
                or self.bytes + len(new.ogg) > self.max_bytes)

    def _account(self, chunk: Chunk, sign: int) -> None:
        self.seconds = max(0.0, self.seconds + sign * chunk.duration)
        self.bytes += sign * len(chunk.ogg)


# ----------------------------------------------------------------------------
# Transcripts on disk


class Transcript(msgspec.Struct, frozen=True, kw_only=True):
    """One line of the transcript log."""

    seq: int
    stream_id: str
    device_id: str
    start_utc: str
    end_utc: str
    duration: float
    text: str
    protocol: str
    latency_seconds: float  # the successful request's round trip
    age_seconds: float  # from the chunk being cut to its transcript (queueing, retries)
    attempts: int
    clock_synced: bool


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(Transcript)


def _day_of(iso: str) -> str:
    return iso[:10]


class TranscriptLog:
    """Append-only JSONL files, one per UTC day (`YYYY-MM-DD.jsonl`), kept for
    `days` days. Blocking: call it from a worker thread."""

    def __init__(self, directory: Path, days: int) -> None:
        self.directory = Path(directory)
        self.days = days
        self._pruned_for: str | None = None

    def path_for(self, day: str) -> Path:
        return self.directory / f"{day}.jsonl"

    def append(self, t: Transcript) -> None:
        """Add one line and make it durable (a power cut loses at most this line)."""
        day = _day_of(t.start_utc)
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.path_for(day), "ab") as f:
            f.write(_ENCODER.encode(t) + b"\n")
            f.flush()
            os.fdatasync(f.fileno())
        if self._pruned_for != day:
            self.prune(day)
            self._pruned_for = day

    def prune(self, today: str) -> list[Path]:
        """Delete day files older than `days` days before `today`; return them."""
        try:
            first_kept = datetime.strptime(today, "%Y-%m-%d") - timedelta(days=self.days - 1)
        except ValueError:
            return []
        removed = []
        for path in _day_files(self.directory):
            if path.stem < first_kept.strftime("%Y-%m-%d"):
                path.unlink(missing_ok=True)
                removed.append(path)
                log.info("transcripts pruned file=%s keep_days=%d", path.name, self.days)
        return removed


def _day_files(directory: Path) -> list[Path]:
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        stem, _, ext = name.partition(".")
        if ext == "jsonl" and len(stem) == 10 and stem[4] == "-" and stem[7] == "-":
            out.append(directory / name)
    return out


def read_transcripts(
    data_dir: Path, since: float | None = None, until: float | None = None, *,
    limit: int = 1000,
) -> list[Transcript]:
    """Transcripts whose chunk starts in `[since, until)` (UTC seconds), oldest
    first, at most `limit`. Lines that do not parse (a torn last line after a
    power cut) are skipped. Blocking: call it from a worker thread."""
    directory = Path(data_dir) / "transcripts"
    lo = iso_utc(since) if since is not None else None
    hi = iso_utc(until) if until is not None else None
    out: list[Transcript] = []
    for path in _day_files(directory):
        day = path.stem
        if (lo is not None and day < lo[:10]) or (hi is not None and day > hi[:10]):
            continue
        with open(path, "rb") as f:
            for line in f:
                try:
                    t = _DECODER.decode(line)
                except msgspec.DecodeError:
                    continue
                if (lo is None or t.start_utc >= lo) and (hi is None or t.start_utc < hi):
                    out.append(t)
                    if len(out) >= limit:
                        return out
    return out


# ----------------------------------------------------------------------------
# Wire protocols


class _Retry(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class _Rejected(Exception):
    """The endpoint refused the chunk for good (4xx other than 408/425/429)."""


class _Malformed(Exception):
    """A 2xx answer that is not what the protocol promises."""


def _excerpt(resp: httpx.Response) -> str:
    return resp.text[:200].replace("\n", " ")


def _check_status(resp: httpx.Response, now_utc: float) -> None:
    code = resp.status_code
    if 200 <= code < 300:
        return
    if code >= 500 or code in _RETRYABLE_STATUS:
        raise _Retry(f"status={code}", parse_retry_after(resp.headers.get("retry-after"), now_utc))
    raise _Rejected(f"status={code} body={_excerpt(resp)!r}")


def _json_text(resp: httpx.Response, path: Callable[[Any], Any]) -> str:
    try:
        doc = json.loads(resp.content)
        text = path(doc)
    except (ValueError, LookupError, TypeError) as exc:
        raise _Malformed(f"status={resp.status_code} unexpected answer "
                         f"({type(exc).__name__}) body={_excerpt(resp)!r}") from None
    if not isinstance(text, str):
        raise _Malformed(f"status={resp.status_code} transcript is not a string "
                         f"body={_excerpt(resp)!r}")
    return text


class _Wire:
    """How one protocol sends a chunk and reads the answer."""

    def __init__(self, cfg: SttConfig, token: str | None, device_id: str, stream_id: str) -> None:
        self.cfg = cfg
        self.token = token
        self.device_id = device_id
        self.stream_id = stream_id
        self.url = httpx.URL(cfg.url)

    async def post(self, client: httpx.AsyncClient, chunk: Chunk) -> httpx.Response:
        cfg = self.cfg
        headers: dict[str, str] = {}
        if cfg.protocol == "openai":
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            data = {"response_format": "json"}
            for key in ("model", "language", "prompt"):
                if value := getattr(cfg, key):
                    data[key] = value
            files = {"file": (CHUNK_FILENAME, chunk.ogg, "audio/ogg")}
            return await client.post(self.url, data=data, files=files, headers=headers)
        if cfg.protocol == "deepgram":
            headers["Content-Type"] = "audio/ogg"
            headers["Authorization"] = f"Token {self.token}"
            # Merged by hand: httpx's `params=` replaces a query the URL already has.
            params = {k: v for k, v in (("model", cfg.model), ("language", cfg.language))
                      if v and k not in self.url.params}
            return await client.post(self.url.copy_merge_params(params), content=chunk.ogg,
                                     headers=headers)
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        headers.update({
            "Content-Type": RAW_CONTENT_TYPE,
            RAW_HEADERS["device"]: self.device_id,
            RAW_HEADERS["stream"]: self.stream_id,
            RAW_HEADERS["sequence"]: str(chunk.seq),
            RAW_HEADERS["start"]: iso_utc(chunk.start_utc),
            RAW_HEADERS["duration"]: f"{chunk.duration:.6f}",
            RAW_HEADERS["synced"]: "true" if chunk.synced else "false",
        })
        return await client.post(self.url, content=chunk.ogg, headers=headers)

    def text(self, resp: httpx.Response, now_utc: float) -> str:
        """The transcript in a response; raises `_Retry`, `_Rejected` or `_Malformed`."""
        _check_status(resp, now_utc)
        if resp.status_code == 204:
            return ""
        if self.cfg.protocol == "deepgram":
            return _json_text(
                resp, lambda d: d["results"]["channels"][0]["alternatives"][0]["transcript"])
        return _json_text(resp, lambda d: d["text"])


# ----------------------------------------------------------------------------
# The streamer

BlockingRunner = Callable[[Callable[[], Any], trio.CapacityLimiter], Awaitable[Any]]


async def _in_thread(fn: Callable[[], Any], limiter: trio.CapacityLimiter) -> Any:
    return await trio.to_thread.run_sync(fn, limiter=limiter)


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
        run_blocking: runs blocking work (encoding, file writes) given a function
            and a `CapacityLimiter`; default: a worker thread. MockClock tests pass
            an inline runner, since autojump counts a thread as idle.
    """

    def __init__(
        self, config: SttConfig, ring: AudioRing, *, device_id: str, data_dir: Path,
        clock: Clock, transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None, vad: Vad | None = None,
        idle_flush_seconds: float = 1.0,
        run_blocking: BlockingRunner | None = None,
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
        self._wire = _Wire(config, self._token, device_id, self.stream_id)
        self._transport = transport
        self._vad = vad
        self._idle_flush = idle_flush_seconds
        self._run_blocking = run_blocking or _in_thread
        self.backoff = Backoff(initial=config.backoff_initial_seconds,
                               maximum=config.backoff_max_seconds, jitter=1.0,
                               rng=rng or random.Random())
        self._backlog = Backlog(config.backlog_seconds, config.backlog_bytes)
        self._encode_limiter = trio.CapacityLimiter(1)
        self._io_limiter = trio.CapacityLimiter(1)
        self._lot = trio.lowlevel.ParkingLot()  # woken on every state change
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
        return None

    @property
    def idle(self) -> bool:
        """Everything captured so far was read, cut, and sent or given up."""
        return (self._reader.lag <= 0 and self._chunker.pending_samples == 0
                and not self._stream_open and len(self._backlog) == 0)

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
        self._wire = _Wire(config, token, self.device_id, self.stream_id)
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
        if self._stream_open:
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
        while True:
            with trio.move_on_after(self._idle_flush) as waited:
                await reader.wait(1)
            if waited.cancelled_caught:
                if self._stream_open:
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
                await self._lot.park()
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
        self._chunker = make_chunker(cfg, self._vad)
        self._resampler = StreamResampler(self.ring.rate, cfg.rate, 1)
        self._base = 0  # ring index of the stream's first sample
        self._stream_open = False
        self._skipped_seen = 0
        self._discarded_seen = 0

    async def _process(self, frames: NDArray[Any], start: int) -> None:
        if not len(frames):
            return
        if not self._stream_open:
            self._base, self._stream_open = start, True
        mono = mix_down(frames, 1)
        pcm = from_float32(self._resampler.process(mono)[:, 0], SampleFormat.INT16)
        for cut in self._chunker.feed(pcm):
            await self._ship(cut)
        self._count_skipped()

    async def _end_stream(self, why: str) -> None:
        """Flush the resampler and chunker (send what is pending) and start afresh."""
        if self._stream_open:
            tail = self._resampler.flush()
            cuts = self._chunker.feed(from_float32(tail[:, 0], SampleFormat.INT16))
            cuts += self._chunker.flush()
            self._count_skipped()
            for cut in cuts:
                await self._ship(cut)
            log.debug("stt stream ended reason=%s", why)
        self._reset_stream()

    def _count_skipped(self) -> None:
        ch = self._chunker
        self.stats.seconds_skipped += (ch.skipped_samples - self._skipped_seen) / self.config.rate
        self.stats.discarded += ch.discarded - self._discarded_seen
        self._skipped_seen, self._discarded_seen = ch.skipped_samples, ch.discarded

    async def _overrun(self, lost: int) -> None:
        seconds = lost / self.ring.rate
        self.stats.overruns += 1
        self.stats.seconds_lost += seconds
        log.warning("stt reader overrun seconds_lost=%.3f overruns=%d (the ring evicted audio "
                    "before it was read; skipping ahead)", seconds, self.stats.overruns)
        await self._end_stream("overrun")

    async def _ship(self, cut: Cut) -> None:
        """Encode a cut off the event loop and put it in the backlog."""
        cfg, ring = self.config, self.ring
        index = self._base + round(cut.start * ring.rate / cfg.rate)
        start_utc = ring.index_to_utc(index)
        synced = ring.anchor_at(index).synced
        duration = len(cut.pcm) / cfg.rate
        encode = partial(encode_ogg_opus, cut.pcm, cfg.rate, bitrate=cfg.bitrate,
                         application=_APPLICATION)
        with trio.CancelScope(shield=True):  # a cut being encoded is not lost to a restart
            ogg: bytes = await self._run_blocking(encode, self._encode_limiter)
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
                with trio.fail_after(cfg.timeout_seconds):
                    resp = await self._wire.post(client, chunk)
                text = self._wire.text(resp, self.clock.utc())
            except _Rejected as exc:
                self._given_up(chunk, "rejected", str(exc))
                stats.dropped_rejected += 1
                stats.consecutive_failures = 0  # the endpoint is up; this chunk is bad
                return None
            except _Malformed as exc:
                self._given_up(chunk, "bad_response", str(exc))
                stats.bad_responses += 1
                stats.consecutive_failures = 0
                return None
            except (_Retry, httpx.RequestError, trio.TooSlowError) as exc:
                reason = str(exc) or type(exc).__name__
                if isinstance(exc, trio.TooSlowError):
                    reason = f"no answer within {cfg.timeout_seconds:g} s"
                elif isinstance(exc, httpx.HTTPError):
                    reason = f"{type(exc).__name__}: {reason}"
                stats.consecutive_failures += 1
                stats.last_error = reason
                delay = self.backoff.delay(stats.consecutive_failures - 1)
                if isinstance(exc, _Retry) and exc.retry_after is not None:
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
            await self._run_blocking(partial(self.transcripts.append, t), self._io_limiter)
        except OSError as exc:  # a full disk must not stop transcription
            log.error("stt transcript not written error=%r", str(exc))
