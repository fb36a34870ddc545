"""The device HTTP API: the one door into the device, for the backend and for installers.

An ASGI app (Starlette routes inside a small ASGI wrapper) served by Hypercorn's
Trio worker as a supervised stage of the agent. It reads the agent's ring, spool,
transcript log and health directly: no second process, no copy of the ring.
README.md ("HTTP API") lists every route, parameter, status and header.

Decisions worth knowing:

* **Auth.** Every route but ``/healthz`` wants ``Authorization: Bearer <token>``,
  compared with `hmac.compare_digest`. The media routes (``/v1/audio``,
  ``/v1/live``) also take ``?access_token=`` because an ``<audio>`` element cannot
  send headers. The token comes from ``api.token_file``; without one (allowed on
  loopback only) a random token is kept in ``<data_dir>/api-token`` (mode 0600).
  Unauthenticated requests to unknown paths get 401 too, so routes are not probed.
* **Bad input** is a 4xx with a JSON body ``{"error": ..., "parameter": ...}``
  naming what is wrong and what was expected. Unknown query parameters are
  errors (a typo must not silently change a request). No request may carry a body.
* **Segment ids** are matched against `SEGMENT_ID_PATTERN` (whole string) before
  the spool is asked; the file is then opened component by component below the
  spool root with ``O_NOFOLLOW`` (`open_under`), so neither ``..`` nor a symlink
  anywhere below the root can lead outside it.
* **/v1/audio** plans the whole response from metadata before the first byte
  (`plan_audio`): ring where held, spooled segments where older, gaps between
  them. So the gaps go into a header, and WAV/PCM bodies have an exact
  ``Content-Length``. The body is then produced block by block in worker threads
  (at most one decoded segment in memory) under a concurrency cap. If audio
  planned from the ring is evicted before it is sent (a very long request on a
  slow device), or a segment cannot be decoded, the response is cut off: the
  client sees an incomplete body, never silently wrong audio.
* **Gaps header.** ``X-Audio-Gaps: <utc>/<seconds>@<offset>, ...``: each hole
  starts at ``<utc>`` (ISO 8601), lasts ``<seconds>``, and sits ``<offset>``
  seconds into the returned audio (where silence starts with ``fill=silence``).
  Holes shorter than the ring's gap tolerance (jitter) are not holes.
* **Stalled clients** never hold a scarce slot: the body is produced in its own
  task and a client that takes nothing for ``request_timeout_seconds`` is dropped,
  releasing the slot even while the server's write to the socket is still stuck;
  the kernel then closes that connection (`edge_agent.http`, TCP_USER_TIMEOUT).
"""

from __future__ import annotations

import dataclasses
import hmac
import importlib.metadata
import logging
import math
import os
import re
import secrets
import stat
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Final
from urllib.parse import urlsplit, urlunsplit

import msgspec
import numpy as np
import trio
from numpy.typing import NDArray
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from .audio.flac import FlacError, OggFlacEncoder, decode_ogg_flac
from .audio.opus import DECODE_RATE, OggOpusEncoder, OpusError, decode_ogg_opus
from .audio.pcm import (
    SampleFormat,
    from_float32,
    levels,
    mix_down,
    read_wav,
    to_bytes_le,
    wav_header,
)
from .audio.resample import StreamResampler
from .clock import iso_utc
from .config import ApiConfig, ConfigError, check_api_config, is_loopback, read_secret
from .fs import write_atomic
from .http import serve
from .metrics import component_health, disk_free_bytes, make_registry, overall_status
from .recordings import recording_routes
from .ring import AudioRing, EvictedError
from .spool import Spool
from .stt import read_transcripts
from .supervisor import TaskStatus
from .wire import SegmentMeta, SegmentState, is_segment_id

if TYPE_CHECKING:
    from .agent import Agent

__all__ = [
    "AUDIO_FORMATS",
    "GAPS_HEADER",
    "ApiError",
    "ApiStats",
    "AudioGap",
    "AudioPlan",
    "DeviceApi",
    "RingPiece",
    "SegmentPiece",
    "Silence",
    "load_token",
    "open_under",
    "parse_utc",
    "plan_audio",
]

log = logging.getLogger(__name__)

#: Response header listing the holes in a /v1/audio response (see the module doc).
GAPS_HEADER: Final = "X-Audio-Gaps"
#: /v1/audio output formats and their content types. pcm is raw s16le, interleaved.
AUDIO_FORMATS: Final = {
    "opus": "audio/ogg; codecs=opus",
    "wav": "audio/wav",
    "flac": "audio/ogg; codecs=flac",
    "pcm": "application/octet-stream",
}
_EXTENSIONS: Final = {"opus": "opus", "wav": "wav", "flac": "oga", "pcm": "raw"}
_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9._~+/=-]{16,512}")
_TOKEN_EXPECTED: Final = "one token of 16 to 512 letters, digits or ._~+/=- on one line"
TOKEN_FILE_NAME: Final = "api-token"
_AUTH_REALM: Final = 'Bearer realm="edge-agent"'
_MEDIA_PATHS: Final = frozenset({"/v1/audio", "/v1/live"})

_MIN_RATE, _MAX_RATE = 8000, 192000
_MAX_CHANNELS = 8
_OPUS_BITRATE = 64000
_BLOCK_SECONDS = 1.0  # audio converted per trip to a worker thread
_FILE_CHUNK = 64 * 1024
_SEGMENT_WINDOW_SECONDS = 30.0  # of a spooled segment decoded at a time
# Opus decoded from this many 48 kHz frames (200 ms) before the range: after a
# seek the decoder, and then the resampler, need that long to settle.
_OPUS_LEAD_IN = DECODE_RATE // 5
_CAPTURE_WAIT = 2.0  # how long /v1/audio waits for capture to reach `end`
_FUTURE_SLACK = 1.0  # an `end` this far past the device's clock is still "now"
_MAX_GAPS_LISTED = 64  # keeps the header well under client header limits
_LIVE_FLUSH = 0.25  # seconds between Ogg pages forced out to a live listener
_MAX_PARAM_SHOWN = 60


def _version() -> str:
    try:
        return importlib.metadata.version("edge-agent")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


# ----------------------------------------------------------------------------
# Config and token


def load_token(cfg: ApiConfig, data_dir: Path) -> str:
    """The bearer token clients must send.

    From ``api.token_file`` when set; otherwise (loopback only) from
    ``<data_dir>/api-token``, created with a random token, mode 0600, if missing.

    Raises:
        ConfigError: the file cannot be read or holds no usable token.
    """
    if cfg.token_file:
        return read_secret(cfg.token_file, "api.token_file", pattern=_TOKEN_RE,
                           expected=_TOKEN_EXPECTED)
    if not is_loopback(cfg.listen):
        raise ConfigError(check_api_config(cfg))
    path = Path(data_dir) / TOKEN_FILE_NAME
    if not path.exists():
        try:
            write_atomic(path, secrets.token_urlsafe(32) + "\n", mode=0o600)
        except OSError as exc:
            raise ConfigError([f"api: cannot create the token file {path} "
                               f"({exc.strerror})"]) from None
        log.info("api token created path=%s", path)
    return read_secret(path, "", pattern=_TOKEN_RE, expected=_TOKEN_EXPECTED)


# ----------------------------------------------------------------------------
# Errors and parameters


class ApiError(Exception):
    """A request that cannot be served: becomes a JSON error response."""

    def __init__(self, status: int, message: str, parameter: str | None = None, *,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.parameter = parameter
        self.headers = headers or {}
        self.extra = extra

    def response(self) -> Response:
        body: dict[str, Any] = {"error": self.message, "status": self.status}
        if self.parameter is not None:
            body["parameter"] = self.parameter
        body.update(self.extra)
        return _json(body, self.status, self.headers)


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # msgspec: dataclasses as they are, and NaN/inf as null instead of an exception.
    return Response(msgspec.json.encode(obj), status_code=status, headers=headers,
                    media_type="application/json")


def _show(text: str) -> str:
    shown = text if len(text) <= _MAX_PARAM_SHOWN else text[:_MAX_PARAM_SHOWN] + "..."
    return repr(shown)


def _params(request: Request, allowed: Iterable[str]) -> dict[str, str]:
    """The query parameters, each at most once and all of them known."""
    known = set(allowed)
    if request.url.path in _MEDIA_PATHS:
        known.add("access_token")
    out: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        if key not in known:
            raise ApiError(400, f"{_show(key)}: unknown parameter; expected "
                                f"{', '.join(sorted(known - {'access_token'}))}", key[:60])
        if key in out:
            raise ApiError(400, f"{key}: given more than once", key)
        out[key] = value
    out.pop("access_token", None)
    return out


_TZ_SPACE = re.compile(r" (\d\d(:?\d\d)?)$")


def parse_utc(name: str, text: str) -> float:
    """An ISO 8601 time with a timezone, as seconds since the epoch.

    A ``+`` before the offset arrives as a space when the client did not
    percent-encode it; that space is read as ``+``.

    Raises:
        ApiError: 400 naming ``name``.
    """
    example = "such as 2026-11-24T05:30:00Z"
    s = text.strip()
    if len(s) > 40:
        raise ApiError(400, f"{name}: expected an ISO 8601 time, {example}, got {_show(text)}",
                       name)
    s = _TZ_SPACE.sub(r"+\1", s) if "T" in s else s
    try:
        when = datetime.fromisoformat(s)
    except ValueError:
        raise ApiError(400, f"{name}: expected an ISO 8601 time with a timezone, {example}, "
                            f"got {_show(text)}", name) from None
    if when.tzinfo is None:
        raise ApiError(400, f"{name}: expected a timezone (Z or +HH:MM) in {_show(text)}; a "
                            "time without one is ambiguous", name)
    try:
        return when.timestamp()
    except (OverflowError, OSError, ValueError):
        raise ApiError(400, f"{name}: time out of range, got {_show(text)}", name) from None


def _time_param(params: dict[str, str], name: str, *, required: bool) -> float | None:
    text = params.get(name)
    if text is None:
        if required:
            raise ApiError(400, f"{name}: required, an ISO 8601 time such as "
                                "2026-11-24T05:30:00Z", name)
        return None
    return parse_utc(name, text)


def _int_param(params: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    text = params.get(name)
    if text is None:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", text) or not lo <= int(text) <= hi:
        raise ApiError(400, f"{name}: expected a whole number from {lo} to {hi}, "
                            f"got {_show(text)}", name)
    return int(text)


def _choice(params: dict[str, str], name: str, default: str, choices: Iterable[str]) -> str:
    options = list(choices)
    value = params.get(name, default)
    if value not in options:
        raise ApiError(400, f"{name}: expected one of {', '.join(options)}, got {_show(value)}",
                       name)
    return value


def _segment_id(request: Request) -> str:
    seg_id = str(request.path_params.get("segment_id", ""))
    if not is_segment_id(seg_id):
        raise ApiError(400, f"id: expected a segment id such as 20261124T053000.000Z-3f9a1c2b, "
                            f"got {_show(seg_id)}", "id")
    return seg_id


# ----------------------------------------------------------------------------
# Files under the spool


class _Unsafe(Exception):
    """A path below the spool root that is not a plain directory/file chain."""


def open_under(root: Path, relative: Sequence[str]) -> int:
    """Open ``root/relative...`` read-only, refusing anything but real directories
    and a regular file below ``root``.

    Every component is opened relative to the previous one with ``O_NOFOLLOW``,
    so a symlink (or ``..``) anywhere below ``root`` is refused rather than
    followed, and nothing outside ``root`` can be reached.

    Returns:
        An open file descriptor (the caller closes it).

    Raises:
        FileNotFoundError: a component does not exist.
        _Unsafe: a component is a symlink, not a directory/regular file, or a
            name that is not a plain file name.
    """
    if not relative:
        raise _Unsafe("empty path")
    for part in relative:
        if part in ("", ".", "..") or "/" in part or "\0" in part:
            raise _Unsafe(f"not a plain file name: {part!r}")
    nofollow = os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in relative[:-1]:
            try:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | nofollow, dir_fd=fd)
            except NotADirectoryError:
                raise _Unsafe(f"{part} is not a directory") from None
            except OSError as exc:
                if exc.errno == 40:  # ELOOP: a symlink
                    raise _Unsafe(f"{part} is a symlink") from None
                raise
            os.close(fd)
            fd = nxt
        try:
            # O_NONBLOCK: a FIFO planted here must not hang the open.
            out = os.open(relative[-1], os.O_RDONLY | os.O_NONBLOCK | nofollow, dir_fd=fd)
        except OSError as exc:
            if exc.errno == 40:
                raise _Unsafe(f"{relative[-1]} is a symlink") from None
            raise
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(out).st_mode):
        os.close(out)
        raise _Unsafe(f"{relative[-1]} is not a regular file")
    return out


def _open_segment(spool: Spool, seg_id: str) -> tuple[int, int]:
    """(fd, size) of a segment's audio file; retried once if it moved meanwhile
    (a state change renames its directory)."""
    for attempt in range(2):
        try:
            path = spool.audio_path(seg_id)
        except KeyError:
            raise FileNotFoundError(seg_id) from None
        try:
            fd = open_under(spool.root, path.relative_to(spool.root).parts)
        except FileNotFoundError:
            if attempt:
                raise
            continue
        return fd, os.fstat(fd).st_size
    raise FileNotFoundError(seg_id)


# ----------------------------------------------------------------------------
# Decoding spooled segments


class SegmentUnreadable(Exception):
    """A spooled segment's audio cannot be decoded."""


def _fit(pcm: NDArray[Any], frames: int) -> NDArray[Any]:
    """Exactly ``frames`` frames: cut, or padded with silence."""
    if len(pcm) >= frames:
        return pcm[:frames]
    pad = np.zeros((frames - len(pcm), pcm.shape[1]), dtype=pcm.dtype)
    return np.concatenate([pcm, pad])


def _resample_exact(pcm: NDArray[Any], in_rate: int, out_rate: int,
                    frames: int) -> NDArray[Any]:
    if in_rate == out_rate:
        return _fit(pcm, frames)
    rs = StreamResampler(in_rate, out_rate, int(pcm.shape[1]))
    out = np.concatenate([rs.process(pcm), rs.flush()])
    return _fit(out, frames)


def decode_segment(fd: int, meta: SegmentMeta, first: int = 0,
                   last: int | None = None) -> NDArray[Any]:
    """Frames ``[first, last)`` of a segment file (open as `fd`) at ``meta.rate``,
    as ``(frames, meta.channels)``; by default the whole segment.

    Only that part is decoded and held: WAV is read from `first` on, FLAC and
    Opus seek to it (reading the file as the decoder asks: a storage error is
    a SegmentUnreadable, never a crash). WAV and FLAC keep the
    capture's integers exactly (int16, or int32); Opus is float32, decoded at
    48 kHz from a little before `first` (so the decoder and the resampler have
    settled) and brought back to the segment's rate.

    Raises:
        SegmentUnreadable: the file cannot be decoded.
    """
    last = meta.frames if last is None else last
    frames = last - first
    try:
        with open(fd, "rb", closefd=False) as f:
            f.seek(0)
            if meta.format == "wav":
                pcm, _rate = read_wav(f, start=first, frames=frames)
            elif meta.format == "flac":
                pcm = decode_ogg_flac(f, meta.sample_format, first=first, last=last)
            elif meta.format == "opus":
                pcm = _decode_opus_part(f, meta.rate, first, last)
            else:
                raise SegmentUnreadable(f"unknown segment format {meta.format!r}")
    except (OpusError, FlacError, ValueError, OSError) as exc:
        raise SegmentUnreadable(str(exc)) from exc
    if len(pcm) == 0:  # nothing there (a salvaged file ends earlier): silence
        pcm = np.zeros((0, meta.channels), dtype=pcm.dtype)
    if pcm.ndim != 2 or pcm.shape[1] != meta.channels:
        raise SegmentUnreadable(f"decoded shape {pcm.shape} does not match "
                                f"{meta.channels} channel(s)")
    return _fit(pcm, frames)


def _decode_opus_part(f: BinaryIO, rate: int, first: int, last: int) -> NDArray[Any]:
    """Frames ``[first, last)`` at `rate` of an Ogg Opus segment captured at `rate`.

    Decoding (always at 48 kHz) starts `_OPUS_LEAD_IN` early, so the decoder
    and the resampler have settled by `first`, and on a 48 kHz frame that falls
    exactly on a frame at `rate`, so the part lines up with a whole decode to
    the sample (a 44.1 kHz frame meets a 48 kHz one every 160 of the latter).
    """
    step = DECODE_RATE // math.gcd(DECODE_RATE, rate)
    start = max(0, (first * DECODE_RATE // rate - _OPUS_LEAD_IN) // step * step)
    stop = -(-last * DECODE_RATE // rate) + _OPUS_LEAD_IN
    pcm = decode_ogg_opus(f, start=start, frames=stop - start).pcm
    if rate != DECODE_RATE:
        rs = StreamResampler(DECODE_RATE, rate, int(pcm.shape[1]))
        pcm = np.concatenate([rs.process(pcm), rs.flush()])
    skip = first - start * rate // DECODE_RATE
    return pcm[skip : skip + last - first]


# ----------------------------------------------------------------------------
# Planning a /v1/audio response


@dataclass(frozen=True)
class RingPiece:
    """Ring frames ``[start, stop)``; the first was captured at ``utc``."""

    start: int
    stop: int
    utc: float
    rate: int

    @property
    def frames(self) -> int:
        return self.stop - self.start

    @property
    def end_utc(self) -> float:
        return self.utc + self.frames / self.rate


@dataclass(frozen=True)
class SegmentPiece:
    """Frames ``[first, last)`` of a spooled segment; ``frames`` on the output timeline."""

    meta: SegmentMeta
    first: int
    last: int
    utc: float
    frames: int

    @property
    def end_utc(self) -> float:
        return self.utc + (self.last - self.first) / self.meta.rate


def _windows(piece: SegmentPiece, rate: int) -> Iterator[SegmentPiece]:
    """The piece in parts of `_SEGMENT_WINDOW_SECONDS`, decoded one at a time so a
    long segment is never in memory whole. A segment at another rate than the
    ring's is converted in one go (its resampler runs across the whole piece)."""
    step = round(_SEGMENT_WINDOW_SECONDS * piece.meta.rate)
    if piece.meta.rate != rate or piece.last - piece.first <= step:
        yield piece
        return
    for a in range(piece.first, piece.last, step):
        b = min(a + step, piece.last)
        yield dataclasses.replace(piece, first=a, last=b, frames=b - a,
                                  utc=piece.utc + (a - piece.first) / piece.meta.rate)


@dataclass(frozen=True)
class Silence:
    """Zeros standing in for a hole (``fill=silence``)."""

    frames: int


@dataclass(frozen=True)
class AudioGap:
    """A hole: no audio from ``utc`` for ``seconds``; ``at`` seconds into the response."""

    utc: float
    seconds: float
    at: float


@dataclass
class AudioPlan:
    """Everything a /v1/audio response will hold, in order, at ``rate``."""

    start: float
    end: float
    rate: int
    items: list[RingPiece | SegmentPiece | Silence] = field(default_factory=list)
    gaps: list[AudioGap] = field(default_factory=list)
    frames: int = 0
    first_utc: float | None = None
    last_utc: float | None = None

    @property
    def audio_frames(self) -> int:
        return sum(i.frames for i in self.items if not isinstance(i, Silence))

    @property
    def sources(self) -> list[str]:
        kinds = []
        for item in self.items:
            kind = ("ring" if isinstance(item, RingPiece)
                    else "spool" if isinstance(item, SegmentPiece) else "")
            if kind and kind not in kinds:
                kinds.append(kind)
        return kinds

    def gaps_header(self) -> str:
        return ", ".join(f"{iso_utc(g.utc)}/{g.seconds:.6f}@{g.at:.6f}"
                         for g in self.gaps[:_MAX_GAPS_LISTED])


def _count_before(seconds: float, rate: int) -> int:
    """Frames of a run at ``rate`` captured less than ``seconds`` after its first one.

    A frame within a millionth of a second (or a quarter frame) of the limit counts
    as at it, as `AudioRing.utc_to_index` does, so ISO round trips land exactly.
    """
    eps = min(1e-6 * rate, 0.25)
    return max(0, math.ceil(seconds * rate - eps))


def _segment_runs(meta: SegmentMeta) -> list[tuple[int, int, float]]:
    """(first frame, end frame, utc of the first) of each stretch of a segment
    without a hole in it."""
    holes: dict[int, float] = {}
    for g in meta.gaps:
        if 0 < g.frame < meta.frames:
            holes[g.frame] = holes.get(g.frame, 0.0) + g.seconds
    runs = []
    first, skipped = 0, 0.0
    for cut in [*sorted(holes), meta.frames]:
        if cut > first:
            runs.append((first, cut, meta.start_ts + first / meta.rate + skipped))
        skipped += holes.get(cut, 0.0)
        first = cut
    return runs


def _segment_pieces(meta: SegmentMeta, lo: float, hi: float,
                    rate: int) -> list[SegmentPiece]:
    out = []
    for first, last, t in _segment_runs(meta):
        a = first + min(last - first, _count_before(lo - t, meta.rate))
        b = first + min(last - first, _count_before(hi - t, meta.rate))
        if b > a:
            frames = b - a if meta.rate == rate else round((b - a) * rate / meta.rate)
            out.append(SegmentPiece(meta, a, b, t + (a - first) / meta.rate, frames))
    return out


def _ring_pieces(ring: AudioRing, lo: float, hi: float) -> list[RingPiece]:
    if ring.head <= ring.tail:
        return []
    a = max(ring.tail, ring.utc_to_index(lo))
    b = min(ring.head, ring.utc_to_index(hi))
    if b <= a:
        return []
    cuts = [g.index for g in ring.gaps(a, b - 1)]
    out = []
    for s, e in zip([a, *cuts], [*cuts, b], strict=True):
        if e > s:
            out.append(RingPiece(s, e, ring.index_to_utc(s), ring.rate))
    return out


def _trim(piece: RingPiece | SegmentPiece, ring: AudioRing, cursor: float,
          rate: int) -> RingPiece | SegmentPiece | None:
    """The part of ``piece`` at or after ``cursor`` (an overlap with what came before)."""
    if isinstance(piece, RingPiece):
        # Half a frame early: the frame meant to follow the cursor, despite jitter.
        start = max(piece.start, ring.utc_to_index(cursor - 0.5 / piece.rate))
        if start >= piece.stop:
            return None
        return RingPiece(start, piece.stop, ring.index_to_utc(start), piece.rate)
    m = piece.meta
    first = piece.first + min(piece.last - piece.first,
                              max(0, round((cursor - piece.utc) * m.rate)))
    if first >= piece.last:
        return None
    frames = piece.last - first if m.rate == rate else round((piece.last - first) * rate / m.rate)
    return SegmentPiece(m, first, piece.last, piece.utc + (first - piece.first) / m.rate, frames)


def plan_audio(ring: AudioRing, segments: Sequence[SegmentMeta], start: float, end: float,
               *, fill: bool = False, guard: float = 30.0) -> AudioPlan:
    """Plan the audio of ``[start, end)`` (UTC seconds) at the ring's rate.

    The ring serves what it holds from ``guard`` seconds after its oldest frame
    on (older frames may be overwritten before the response gets to them);
    ``segments`` serve what is older, each one whole where it starts before
    that point. Where both hold the same stretch the earlier piece wins and the
    later one is trimmed to follow it. Holes longer than the ring's gap
    tolerance become gaps, filled with silence when ``fill``.
    """
    rate = ring.rate
    tol = ring.gap_tolerance
    plan = AudioPlan(start, end, rate)
    held = ring.head > ring.tail
    ring_from = ring.index_to_utc(ring.tail) + guard if held else math.inf
    pieces: list[RingPiece | SegmentPiece] = []
    for meta in sorted(segments, key=lambda m: (m.start_ts, m.id)):
        if meta.start_ts < ring_from and meta.end_ts > start and meta.start_ts < end:
            pieces.extend(_segment_pieces(meta, start, end, rate))
    if held:
        pieces.extend(_ring_pieces(ring, start, end))
    # Segments before the ring where both start together: the ring is the fallback.
    pieces.sort(key=lambda p: (p.utc, isinstance(p, RingPiece)))

    cursor = start
    for piece in pieces:
        trimmed = _trim(piece, ring, cursor, rate) if piece.utc < cursor - tol else piece
        if trimmed is None:
            continue
        if trimmed.utc > cursor + tol:
            _add_gap(plan, cursor, trimmed.utc - cursor, fill)
        plan.items.append(trimmed)
        plan.frames += trimmed.frames
        if plan.first_utc is None:
            plan.first_utc = trimmed.utc
        cursor = trimmed.end_utc
        plan.last_utc = cursor
    if plan.first_utc is not None and end - cursor > tol:
        _add_gap(plan, cursor, end - cursor, fill)
    if plan.first_utc is not None and fill:
        plan.first_utc = min(plan.first_utc, start)
        plan.last_utc = max(cursor, end)
    return plan


def _add_gap(plan: AudioPlan, utc: float, seconds: float, fill: bool) -> None:
    plan.gaps.append(AudioGap(utc, seconds, plan.frames / plan.rate))
    if fill:
        frames = round(seconds * plan.rate)
        if frames:
            plan.items.append(Silence(frames))
            plan.frames += frames


# ----------------------------------------------------------------------------
# Rendering: PCM blocks in, encoded bytes out (runs in worker threads)


class _Renderer:
    """Converts the planned timeline to the requested format, rate and channels.

    Emits exactly ``frames_out`` frames for every format (what the headers
    promised), trimming the resampler's rounding or padding the end with silence.
    Not thread-safe: one request feeds it from one worker thread at a time.
    """

    def __init__(self, fmt: str, in_rate: int, out_rate: int, channels: int, bitrate: int,
                 frames_out: int, comments: dict[str, str]) -> None:
        self.fmt = fmt
        self.channels = channels
        self.frames_out = frames_out
        self._left = frames_out
        self._resampler = (StreamResampler(in_rate, out_rate, channels)
                           if in_rate != out_rate else None)
        self._opus: OggOpusEncoder | None = None
        self._flac: OggFlacEncoder | None = None
        if fmt == "opus":
            self._opus = OggOpusEncoder(out_rate, channels, bitrate=bitrate,
                                        application="audio", comments=comments)
        elif fmt == "flac":
            self._flac = OggFlacEncoder(out_rate, channels, SampleFormat.INT16)
        self._out_rate = out_rate

    @property
    def content_length(self) -> int | None:
        data = self.frames_out * self.channels * 2
        return {"pcm": data, "wav": 44 + data}.get(self.fmt)

    def start(self) -> bytes:
        if self.fmt == "wav":
            return wav_header(self._out_rate, self.channels, 2, self.frames_out * self.channels * 2)
        if self._flac is not None:
            return self._flac.start()
        return b""

    def feed(self, block: NDArray[Any]) -> bytes:
        x = mix_down(block, self.channels)
        if self._resampler is not None:
            x = self._resampler.process(x)
        return self._emit(x)

    def _emit(self, x: NDArray[np.float32]) -> bytes:
        x = x[: self._left]
        self._left -= len(x)
        if not len(x):
            return b""
        if self._opus is not None:
            return self._opus.write(x)
        s16 = from_float32(x, SampleFormat.INT16)
        if self._flac is not None:
            return self._flac.write(s16)
        return to_bytes_le(s16)

    def finish(self) -> bytes:
        out = b""
        if self._resampler is not None:
            out += self._emit(self._resampler.flush())
        if self._left > 0:
            out += self._emit(np.zeros((self._left, self.channels), dtype=np.float32))
        if self._opus is not None:
            out += self._opus.finish()
        if self._flac is not None:
            data, _patches = self._flac.finish()  # patches are for files on disk only
            out += data
        self.close()
        return out

    def close(self) -> None:
        if self._opus is not None:
            self._opus.close()
        if self._flac is not None:
            self._flac.close()


# ----------------------------------------------------------------------------
# Streaming responses


class _Abort(Exception):
    """The body cannot be completed; the response is cut off (logged)."""


class _Sink:
    """Where a producer puts body chunks; a client that takes nothing for
    ``stall`` seconds ends the producer (`trio.TooSlowError`)."""

    def __init__(self, channel: trio.MemorySendChannel[bytes], stall: float) -> None:
        self._channel = channel
        self._stall = stall

    async def send(self, data: bytes) -> None:
        if data:
            with trio.fail_after(self._stall):
                await self._channel.send(data)


Producer = Callable[[_Sink], Awaitable[None]]


class _StreamResponse:
    """An ASGI response whose body a producer makes in a task of its own.

    The producer may hold a scarce resource (an encode slot, a file): `release`
    runs as soon as it is done, even if the client is gone or stalled and the
    server's write to the socket has not returned.
    """

    def __init__(self, status: int, headers: dict[str, str], producer: Producer | None, *,
                 stall: float, what: str, release: Callable[[], None] | None = None,
                 on_abort: Callable[[], None] | None = None) -> None:
        self.status = status
        self.headers = headers
        self.producer = producer
        self.stall = stall
        self.what = what
        self._release = release
        self._on_abort = on_abort
        self._complete = False

    def release(self) -> None:
        """Run the producer's `release` once, however the response ends."""
        release, self._release = self._release, None
        if release is not None:
            release()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start: Message = {
            "type": "http.response.start", "status": self.status,
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1"))
                        for k, v in self.headers.items()],
        }
        try:
            if scope.get("method") == "HEAD" or self.producer is None:
                self.release()
                await send(start)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            send_ch, recv_ch = trio.open_memory_channel[bytes](1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._produce, send_ch)
                nursery.start_soon(self._watch_disconnect, receive, nursery.cancel_scope)
                await send(start)
                async with recv_ch:
                    async for chunk in recv_ch:
                        await send({"type": "http.response.body", "body": chunk,
                                    "more_body": True})
                nursery.cancel_scope.cancel()
            if self._complete:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            # Otherwise the server closes the connection with the body incomplete.
        finally:
            self.release()

    async def _produce(self, channel: trio.MemorySendChannel[bytes]) -> None:
        assert self.producer is not None
        try:
            async with channel:
                await self.producer(_Sink(channel, self.stall))
                # Complete before the channel closes: the consumer cancels this task as
                # soon as it sees the end, which may be at the close's checkpoint.
                self._complete = True
        except trio.TooSlowError:
            log.warning("api client took no data for %g s, dropped what=%s", self.stall,
                        self.what)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except _Abort as exc:
            log.warning("api response cut off what=%s reason=%r", self.what, str(exc))
        except Exception:
            log.exception("api response failed what=%s", self.what)
        finally:
            if not self._complete and self._on_abort is not None:
                self._on_abort()
            self.release()

    @staticmethod
    async def _watch_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                scope.cancel()
                return


# ----------------------------------------------------------------------------
# The app


@dataclass
class ApiStats:
    """Counters of the device API (exposed in /metrics and /v1/status)."""

    requests: int = 0
    responses: dict[int, int] = field(default_factory=dict)  # by status code
    unauthorized: int = 0
    bodies_refused: int = 0
    timeouts: int = 0
    errors: int = 0  # 500: bugs
    audio_requests: int = 0
    audio_busy: int = 0  # 503: no encode slot within the queue time
    audio_active: int = 0
    audio_aborted: int = 0  # bodies cut off (client gone or stalled, audio lost)
    audio_seconds: float = 0.0  # audio planned into responses
    downloads: int = 0
    downloads_busy: int = 0
    downloads_active: int = 0
    live_sessions: int = 0
    live_listeners: int = 0
    live_rejected: int = 0
    live_overruns: int = 0
    live_lost_seconds: float = 0.0
    bytes_sent: int = 0


class _ApiCollector:
    """The API's own counters, for the agent's metrics registry."""

    def __init__(self, stats: ApiStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        codes = CounterMetricFamily("edge_agent_api_responses", "API responses by status code.",
                                    labels=["code"])
        for code, n in sorted(s.responses.items()):
            codes.add_metric([str(code)], n)
        yield codes
        for name, doc, value in (
            ("requests", "API requests.", s.requests),
            ("unauthorized", "Requests without a valid token.", s.unauthorized),
            ("timeouts", "Requests that did not start a response in time.", s.timeouts),
            ("audio_busy", "/v1/audio requests turned away (503).", s.audio_busy),
            ("audio_aborted", "Audio responses cut off.", s.audio_aborted),
            ("audio_seconds", "Seconds of audio planned into responses.", s.audio_seconds),
            ("downloads", "Segment downloads started.", s.downloads),
            ("live_overruns", "Live listeners that fell off the ring.", s.live_overruns),
            ("bytes", "Response body bytes.", s.bytes_sent),
        ):
            family = CounterMetricFamily(f"edge_agent_api_{name}", doc)
            family.add_metric([], value)
            yield family
        for name, doc, value in (
            ("audio_active", "/v1/audio responses being produced.", s.audio_active),
            ("downloads_active", "Segment downloads in progress.", s.downloads_active),
            ("live_listeners", "/v1/live listeners now.", s.live_listeners),
        ):
            gauge = GaugeMetricFamily(f"edge_agent_api_{name}", doc)
            gauge.add_metric([], value)
            yield gauge


def _sanitize_url(url: str) -> str:
    """A URL without credentials or query (they may hold keys)."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))
    except ValueError:
        return "<unparsable>"


class DeviceApi:
    """The device API of one agent: an ASGI app plus its serving task.

    Register `run` as a supervised task; `url` is the bound base URL once it
    serves (``listen`` may ask for port 0).

    Raises:
        ConfigError: the token file is unusable (at construction, not in the task).
    """

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.config = agent.config.api
        self.stats = ApiStats()
        self.url: str | None = None
        self.serving = trio.Event()
        self._token = load_token(self.config, agent.data_dir)
        self._audio_slots = trio.CapacityLimiter(self.config.max_audio_encodes)
        self._encode_threads = trio.CapacityLimiter(self.config.max_audio_encodes)
        self._io_threads = trio.CapacityLimiter(4)
        self._started_at: float | None = None
        self.registry = make_registry(agent, [_ApiCollector(self.stats)])
        self.app = Starlette(
            routes=[
                Route("/healthz", self._healthz, methods=["GET"]),
                Route("/metrics", self._metrics, methods=["GET"]),
                Route("/v1/status", self._status, methods=["GET"]),
                Route("/v1/segments", self._segments, methods=["GET"]),
                Route("/v1/segments/{segment_id}", self._segment_file, methods=["GET"]),
                Route("/v1/segments/{segment_id}/meta", self._segment_meta, methods=["GET"]),
                Route("/v1/audio", self._audio, methods=["GET"]),
                Route("/v1/transcripts", self._transcripts, methods=["GET"]),
                Route("/v1/live", self._live, methods=["GET"]),
                *recording_routes(lambda: agent.recordings),  # recorder.py owns these
            ],
            exception_handlers={
                ApiError: self._api_error,
                HTTPException: self._http_error,
                Exception: self._internal_error,
            },
        )
        agent.on_reload(self._reload)

    # -- serving -------------------------------------------------------------

    async def run(self, task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; reports the bound base URL."""
        self._started_at = trio.current_time()
        # Request headers are small here: 16 KiB bounds what a client can make us buffer.
        async with trio.open_nursery() as nursery:
            url: str = await nursery.start(partial(
                serve, self, self.config.listen, h11_max_incomplete_size=16 * 1024,
                keep_alive_timeout=self.config.request_timeout_seconds,
                write_timeout=self.config.request_timeout_seconds))
            self.url = url
            self.serving.set()
            log.info("device api serving url=%s auth=bearer", url)
            task_status.started(url)

    def _reload(self, old: Any, new: Any) -> None:
        if old.api == new.api:
            return
        if old.api.listen != new.api.listen or old.api.enabled != new.api.enabled:
            log.warning("config reload api.listen/api.enabled changed: restart the agent "
                        "to apply it")
        try:
            token = load_token(new.api, self.agent.data_dir)
        except ConfigError as exc:
            log.error("config reload api token kept problem=%r", exc.problems[0])
        else:
            self._token = token
        # The socket stays bound where it is: report the listen address in use.
        self.config = msgspec.structs.replace(new.api, listen=old.api.listen)
        self._audio_slots.total_tokens = new.api.max_audio_encodes
        self._encode_threads.total_tokens = new.api.max_audio_encodes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI entry: refuse bodies, check the token, bound the time to respond."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # lifespan; websockets are refused
            return
        st = self.stats
        st.requests += 1
        started = False
        deadline = trio.CancelScope()

        async def counted_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                code = int(message["status"])
                st.responses[code] = st.responses.get(code, 0) + 1
                deadline.deadline = math.inf  # a body may take as long as it needs
            elif message["type"] == "http.response.body":
                st.bytes_sent += len(message.get("body", b""))
            await send(message)

        refusal = self._refuse(scope)
        if refusal is not None:
            await refusal(scope, receive, counted_send)
            return
        timeout = self.config.request_timeout_seconds
        deadline.deadline = trio.current_time() + timeout
        with deadline:
            try:
                await self.app(scope, receive, counted_send)
            except Exception:  # the app's handler already answered 500 if it could
                if not started:
                    error = ApiError(500, "internal error (logged on the device)")
                    await error.response()(scope, receive, counted_send)
        if deadline.cancelled_caught and not started:
            st.timeouts += 1
            log.warning("api request timed out path=%s timeout=%gs", scope.get("path"),
                        timeout)
            await ApiError(503, f"the request took longer than {timeout:g} s "
                                "(api.request_timeout_seconds)",
                           headers={"Retry-After": "5"}).response()(scope, receive,
                                                                     counted_send)

    def _refuse(self, scope: Scope) -> Response | None:
        headers = Headers(scope=scope)
        if headers.get("transfer-encoding") or headers.get("content-length", "0") != "0":
            self.stats.bodies_refused += 1
            return ApiError(413, "request bodies are not accepted", "body").response()
        if scope["path"] == "/healthz":
            return None
        token: str | None = None
        auth = headers.get("authorization")
        if auth is not None:
            scheme, _, credentials = auth.partition(" ")
            if scheme.lower() == "bearer":
                token = credentials.strip()
        elif scope["path"] in _MEDIA_PATHS:
            query = Request(scope).query_params.getlist("access_token")
            token = query[0] if len(query) == 1 else None
        if token is not None and hmac.compare_digest(
                token.encode("utf-8", "replace"), self._token.encode("utf-8")):
            return None
        self.stats.unauthorized += 1
        if token is None:
            return ApiError(401, "missing bearer token (Authorization: Bearer <token>)",
                            "Authorization", headers={"WWW-Authenticate": _AUTH_REALM}
                            ).response()
        return ApiError(401, "invalid bearer token", "Authorization", headers={
            "WWW-Authenticate": f'{_AUTH_REALM}, error="invalid_token"'}).response()

    async def _api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        allowed = dict(exc.headers or {}).get("Allow", "GET, HEAD")
        message = {404: f"no route {_show(request.url.path)}",
                   405: f"method {request.method} not allowed here; use {allowed}"}.get(
                       exc.status_code, str(exc.detail))
        return ApiError(exc.status_code, message, "path" if exc.status_code == 404 else "method",
                        headers=dict(exc.headers or {})).response()

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        self.stats.errors += 1
        log.error("api request failed path=%s", request.url.path, exc_info=exc)
        return ApiError(500, "internal error (logged on the device)").response()

    # -- health, metrics, status -------------------------------------------------

    async def _healthz(self, request: Request) -> Response:
        _params(request, ())
        health = component_health(self.agent)
        return _json({
            "status": overall_status(health),
            "components": {name: {"status": h.status, "detail": h.detail}
                           for name, h in health.items()},
        })

    async def _metrics(self, request: Request) -> Response:
        _params(request, ())
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def _status(self, request: Request) -> Response:
        _params(request, ())
        agent = self.agent
        ring = agent.ring
        health = component_health(agent)
        rs = ring.statistics()
        rate = ring.rate
        last = ring.read(max(ring.tail, ring.head - rate), ring.head)
        lv = levels(last)
        free = disk_free_bytes(agent.data_dir)
        uptime = trio.current_time() - self._started_at if self._started_at is not None else 0.0
        body: dict[str, Any] = {
            "device": agent.config.device.id,
            "version": _version(),
            "time": iso_utc(agent.clock.utc()),
            "clock_synced": agent.clock.synced(),
            "uptime_seconds": round(uptime, 3),
            "status": overall_status(health),
            "components": {n: {"status": h.status, "detail": h.detail}
                           for n, h in health.items()},
            "config": self._config_summary(),
            "input": {"seconds": len(last) / rate, "rms_dbfs": round(lv.rms_dbfs, 2),
                      "peak_dbfs": round(lv.peak_dbfs, 2), "clipped": lv.clipped},
            "ring": {
                "oldest_utc": iso_utc(rs.oldest_utc) if rs.oldest_utc is not None else None,
                "newest_utc": iso_utc(rs.newest_utc) if rs.newest_utc is not None else None,
                "held_seconds": rs.held_frames / rate,
                "capacity_seconds": rs.capacity_frames / rate,
                "fill": rs.held_frames / rs.capacity_frames,
                "evicted_seconds": rs.evicted_frames / rate,
                "gaps": rs.gaps, "clock_steps": rs.clock_steps,
                "readers": [{"name": r.name, "lag_seconds": r.lag / rate,
                             "overruns": r.overruns, "lost_seconds": r.lost_frames / rate}
                            for r in ring.readers()],
            },
            "capture": {"seconds": ring.head / rate, **dataclasses.asdict(agent.source.stats)},
            "tasks": {n: {"state": t.state, "starts": t.starts, "failures": t.failures,
                          "last_error": t.last_error}
                      for n, t in agent.supervisor.tasks.items()},
            "stt": agent.stt.statistics() if agent.stt is not None else None,
            "spool": agent.spool.stats if agent.spool is not None else None,
            "segmenter": agent.segmenter.stats if agent.segmenter is not None else None,
            "upload": agent.uploader.stats if agent.uploader is not None else None,
            "disk": {"free_bytes": free},
            "api": self.stats,
        }
        return _json(body)

    def _config_summary(self) -> dict[str, Any]:
        c = self.agent.config
        cap, seg = c.capture, c.segments
        return {
            "capture": {"source": cap.source, "device": cap.device, "rate": cap.rate,
                        "channels": cap.channels, "format": cap.format,
                        "block_ms": cap.block_ms},
            "ring": {"seconds": c.ring.seconds},
            "stt": {"enabled": c.stt.enabled, "protocol": c.stt.protocol,
                    "url": _sanitize_url(c.stt.url), "rate": c.stt.rate,
                    "chunking": c.stt.chunking, "token": bool(c.stt.token_file)},
            "segments": {"enabled": seg.enabled, "seconds": seg.seconds, "format": seg.format,
                         "bitrate": seg.bitrate, "max_spool_mb": seg.max_spool_mb,
                         "min_free_mb": seg.min_free_mb},
            "upload": {"enabled": c.upload.enabled, "url": _sanitize_url(c.upload.url),
                       "token": bool(c.upload.token_file)},
            "api": {"listen": self.config.listen,
                    "max_range_seconds": self.config.max_range_seconds,
                    "max_audio_encodes": self.config.max_audio_encodes,
                    "max_live_listeners": self.config.max_live_listeners},
        }

    # -- segments --------------------------------------------------------------

    def _spool(self) -> Spool:
        if self.agent.spool is None:
            raise ApiError(404, "segments are disabled on this device (segments.enabled = "
                                "false)", "id")
        return self.agent.spool

    @staticmethod
    def _segment_json(meta: SegmentMeta, state: SegmentState) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(meta)
        out["state"] = state.value
        out["url"] = f"/v1/segments/{meta.id}"
        return out

    async def _segments(self, request: Request) -> Response:
        p = _params(request, ("since", "until", "state", "limit", "before"))
        since = _time_param(p, "since", required=False)
        until = _time_param(p, "until", required=False)
        if since is not None and until is not None and until <= since:
            raise ApiError(400, "until: expected a time after since", "until")
        state_name = p.get("state")
        state = (SegmentState(_choice(p, "state", "", [s.value for s in SegmentState]))
                 if state_name is not None else None)
        limit = _int_param(p, "limit", 100, 1, 1000)
        before = p.get("before")
        if before is not None and not is_segment_id(before):
            raise ApiError(400, f"before: expected a segment id, got {_show(before)}", "before")
        if self.agent.spool is None:
            return _json({"segments": [], "next_before": None, "enabled": False})
        rows = self.agent.spool.list(since=since, until=until, state=state, newest_first=True)
        if before is not None:
            rows = [r for r in rows if r[0].id < before]
        page = rows[:limit]
        more = len(rows) > limit
        return _json({
            "segments": [self._segment_json(m, s) for m, s in page],
            "next_before": page[-1][0].id if more else None,
            "enabled": True,
        })

    def _lookup(self, request: Request) -> tuple[str, SegmentMeta, SegmentState]:
        seg_id = _segment_id(request)
        found = self._spool().get(seg_id)
        if found is None:
            raise ApiError(404, f"no segment {seg_id} on this device (never recorded, or "
                                "evicted)", "id")
        return seg_id, found[0], found[1]

    async def _segment_meta(self, request: Request) -> Response:
        _params(request, ())
        _seg_id, meta, state = self._lookup(request)
        return _json(self._segment_json(meta, state))

    async def _segment_file(self, request: Request) -> Response | _StreamResponse:
        _params(request, ())
        seg_id, meta, _state = self._lookup(request)
        spool = self._spool()
        st = self.stats
        if st.downloads_active >= self.config.max_downloads:
            st.downloads_busy += 1
            raise ApiError(503, f"busy: {st.downloads_active} downloads in progress "
                                "(api.max_downloads)", headers={"Retry-After": "2"})
        try:
            fd, size = await trio.to_thread.run_sync(_open_segment, spool, seg_id,
                                                     limiter=self._io_threads)
        except FileNotFoundError:
            raise ApiError(404, f"segment {seg_id} was evicted meanwhile", "id") from None
        except _Unsafe as exc:
            log.warning("api refused a segment file id=%s reason=%r", seg_id, str(exc))
            raise ApiError(403, f"segment {seg_id}: its file is not a regular file inside "
                                "the spool", "id") from None
        headers = {"ETag": f'"{meta.sha256}"', "Accept-Ranges": "bytes",
                   "Content-Type": meta.content_type, "Cache-Control": "private, no-transform",
                   "Content-Disposition": f'attachment; filename="{seg_id}.'
                                          f'{_EXTENSIONS.get(meta.format, "bin")}"'}
        try:
            status, first, length = self._conditional(request, meta, size, headers)
        except BaseException:
            os.close(fd)
            raise
        if status != 304:
            headers["Content-Length"] = str(length)
        if status in (304, 416) or length == 0 or request.method == "HEAD":
            os.close(fd)
            return _StreamResponse(status, headers, None, stall=1.0, what=seg_id)
        st.downloads += 1
        st.downloads_active += 1

        def release() -> None:  # _StreamResponse runs it exactly once
            os.close(fd)
            st.downloads_active -= 1

        async def produce(sink: _Sink) -> None:
            pos, left = first, length
            while left > 0:
                chunk = await trio.to_thread.run_sync(os.pread, fd, min(_FILE_CHUNK, left), pos,
                                                      limiter=self._io_threads)
                if not chunk:
                    raise _Abort(f"{seg_id}: file shorter than {size} bytes")
                await sink.send(chunk)
                pos += len(chunk)
                left -= len(chunk)

        return _StreamResponse(status, headers, produce, stall=self.config.request_timeout_seconds,
                               what=f"segment {seg_id}", release=release)

    @staticmethod
    def _conditional(request: Request, meta: SegmentMeta, size: int,
                     headers: dict[str, str]) -> tuple[int, int, int]:
        """(status, first byte, length) per If-None-Match, If-Range and Range."""
        etag = headers["ETag"]
        inm = request.headers.get("if-none-match")
        if inm is not None and (inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")]):
            return 304, 0, 0
        rng = request.headers.get("range")
        if_range = request.headers.get("if-range")
        if rng is None or (if_range is not None and if_range.strip() != etag):
            return 200, 0, size
        m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", rng)
        if m is None or (not m.group(1) and not m.group(2)):
            # Several ranges, or not a byte range: the whole file (RFC 9110 allows
            # ignoring Range); only single ranges are served as 206.
            return 200, 0, size
        a, b = m.group(1), m.group(2)
        if not a:  # the last N bytes
            n = min(int(b), size)
            first, last = size - n, size - 1
            if n == 0:
                headers["Content-Range"] = f"bytes */{size}"
                return 416, 0, 0
        else:
            first = int(a)
            last = min(int(b), size - 1) if b else size - 1
            if first >= size or (b and int(b) < first):
                headers["Content-Range"] = f"bytes */{size}"
                return 416, 0, 0
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        return 206, first, last - first + 1

    # -- transcripts -------------------------------------------------------------

    async def _transcripts(self, request: Request) -> Response:
        p = _params(request, ("since", "until", "limit"))
        since = _time_param(p, "since", required=False)
        until = _time_param(p, "until", required=False)
        if since is not None and until is not None and until <= since:
            raise ApiError(400, "until: expected a time after since", "until")
        limit = _int_param(p, "limit", 1000, 1, 10000)
        rows = await trio.to_thread.run_sync(
            partial(read_transcripts, self.agent.data_dir, since, until, limit=limit),
            limiter=self._io_threads)
        return _json({"transcripts": rows, "count": len(rows), "truncated": len(rows) >= limit})

    # -- audio -------------------------------------------------------------------

    async def _audio(self, request: Request) -> _StreamResponse:
        ring = self.agent.ring
        cfg = self.config
        p = _params(request, ("start", "end", "format", "rate", "channels", "fill", "bitrate"))
        start = _time_param(p, "start", required=True)
        end = _time_param(p, "end", required=True)
        assert start is not None and end is not None
        if end <= start:
            raise ApiError(400, f"end: expected a time after start ({iso_utc(start)}), got "
                                f"{iso_utc(end)}", "end")
        if end - start > cfg.max_range_seconds:
            raise ApiError(400, f"end: the range is {end - start:g} s long; at most "
                                f"{cfg.max_range_seconds:g} s (api.max_range_seconds)", "end")
        fmt = _choice(p, "format", "opus", AUDIO_FORMATS)
        rate = _int_param(p, "rate", ring.rate, _MIN_RATE, _MAX_RATE)
        channels = _int_param(p, "channels", ring.channels, 1, _MAX_CHANNELS)
        if ring.channels > 1 and channels > ring.channels:
            raise ApiError(400, f"channels: expected at most {ring.channels} (the channels "
                                f"captured), got {channels}", "channels")
        fill = _choice(p, "fill", "none", ("none", "silence")) == "silence"
        if "bitrate" in p and fmt != "opus":
            raise ApiError(400, "bitrate: only for format=opus", "bitrate")
        bitrate = _int_param(p, "bitrate", _OPUS_BITRATE, 6000, 256000)
        now = self.agent.clock.utc()
        if end > now + _FUTURE_SLACK:
            raise ApiError(400, f"end: {iso_utc(end)} is in the future (the device's clock "
                                f"says {iso_utc(now)})", "end")

        head_only = request.method == "HEAD"
        token = None if head_only else await self._acquire_audio_slot()
        try:
            await self._wait_for_capture(end)
            plan = self._plan(start, end, fill)
            frames_out = (plan.frames if rate == ring.rate
                          else plan.frames * rate // ring.rate)
            if fmt == "wav" and 44 + frames_out * channels * 2 > 0xFFFFFFFF:
                raise ApiError(400, "format: this range is too long for a WAV file "
                                    "(4 GiB); ask for flac or pcm", "format")
            comments = {"ENCODER": "edge-agent", "DEVICE": self.agent.config.device.id,
                        "DATE": iso_utc(plan.first_utc or start)}
            renderer = _Renderer(fmt, ring.rate, rate, channels, bitrate, frames_out, comments)
        except BaseException:
            if token is not None:
                self._audio_slots.release_on_behalf_of(token)
            raise
        headers = self._audio_headers(plan, fmt, rate, channels, renderer, start)
        self.stats.audio_requests += 1
        if head_only:
            renderer.close()
            return _StreamResponse(200, headers, None, stall=1.0, what="audio")
        self.stats.audio_active += 1
        self.stats.audio_seconds += plan.frames / ring.rate

        def release() -> None:  # _StreamResponse runs it exactly once
            self.stats.audio_active -= 1
            self._audio_slots.release_on_behalf_of(token)

        def aborted() -> None:
            self.stats.audio_aborted += 1

        what = f"audio {iso_utc(start)}..{iso_utc(end)} {fmt}"
        return _StreamResponse(200, headers, partial(self._produce_audio, plan, renderer),
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
        ring = self.agent.ring
        if self.agent.capture_finished.is_set():
            return
        with trio.move_on_after(_CAPTURE_WAIT):
            while ring.head == 0 or ring.index_to_utc(ring.head) < end:
                await ring.wait_for(ring.head + 1)

    def _plan(self, start: float, end: float, fill: bool) -> AudioPlan:
        ring = self.agent.ring
        segments: list[SegmentMeta] = []
        if self.agent.spool is not None:
            segments = [m for m, s in self.agent.spool.list(since=start, until=end,
                                                            newest_first=False)
                        if s is not SegmentState.QUARANTINED]
        guard = min(30.0, ring.capacity / ring.rate / 4)
        plan = plan_audio(ring, segments, start, end, fill=fill, guard=guard)
        if plan.audio_frames == 0:
            oldest = self._oldest_available()
            where = (f"the oldest audio held starts at {iso_utc(oldest)}" if oldest is not None
                     else "no audio is held")
            raise ApiError(404, f"no audio held between {iso_utc(start)} and {iso_utc(end)}; "
                                f"{where}", "start",
                           oldest=iso_utc(oldest) if oldest is not None else None)
        return plan

    def _oldest_available(self) -> float | None:
        ring = self.agent.ring
        times = [ring.index_to_utc(ring.tail)] if ring.head > ring.tail else []
        if self.agent.spool is not None:
            rows = self.agent.spool.list(newest_first=False)
            times += [m.start_ts for m, s in rows[:50] if s is not SegmentState.QUARANTINED]
        return min(times) if times else None

    def _audio_headers(self, plan: AudioPlan, fmt: str, rate: int, channels: int,
                       renderer: _Renderer, start: float) -> dict[str, str]:
        headers = {
            "Content-Type": AUDIO_FORMATS[fmt],
            "Cache-Control": "no-store",
            "Content-Disposition": (f'inline; filename="{self.agent.config.device.id}_'
                                    f'{iso_utc(plan.first_utc or start).replace(":", "")}'
                                    f'.{_EXTENSIONS[fmt]}"'),
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
            if len(plan.gaps) > _MAX_GAPS_LISTED:
                headers["X-Audio-Gaps-Total"] = str(len(plan.gaps))
        if (length := renderer.content_length) is not None:
            headers["Content-Length"] = str(length)
        return headers

    async def _produce_audio(self, plan: AudioPlan, renderer: _Renderer, sink: _Sink) -> None:
        ring = self.agent.ring
        block = max(1, round(_BLOCK_SECONDS * ring.rate))
        threads = self._encode_threads

        async def render(pcm: NDArray[Any]) -> None:
            await sink.send(await trio.to_thread.run_sync(renderer.feed, pcm, limiter=threads))

        try:
            await sink.send(renderer.start())
            for item in plan.items:
                if isinstance(item, Silence):
                    for n in _blocks(item.frames, block):
                        await render(np.zeros((n, ring.channels), dtype=ring.dtype))
                elif isinstance(item, RingPiece):
                    for a in range(item.start, item.stop, block):
                        try:
                            pcm = ring.read(a, min(item.stop, a + block))
                        except EvictedError as exc:
                            raise _Abort(f"audio from {iso_utc(item.utc)} left the ring before "
                                         f"it was sent: {exc}") from None
                        await render(pcm)
                else:
                    for window in _windows(item, ring.rate):
                        pcm = await trio.to_thread.run_sync(self._segment_pcm, window,
                                                            limiter=self._io_threads)
                        for a in range(0, len(pcm), block):
                            await render(pcm[a : a + block])
                        del pcm
            await sink.send(await trio.to_thread.run_sync(renderer.finish, limiter=threads))
        finally:
            renderer.close()

    def _segment_pcm(self, piece: SegmentPiece) -> NDArray[Any]:
        """The planned frames of one segment, at the ring's rate (worker thread)."""
        meta = piece.meta
        spool = self._spool()
        try:
            fd, _size = _open_segment(spool, meta.id)
        except (FileNotFoundError, _Unsafe) as exc:
            raise _Abort(f"segment {meta.id} is no longer readable: {exc}") from None
        try:
            part = decode_segment(fd, meta, piece.first, piece.last)
        except SegmentUnreadable as exc:
            raise _Abort(f"segment {meta.id} cannot be decoded: {exc}") from None
        finally:
            os.close(fd)
        rate = self.agent.ring.rate
        if meta.rate != rate:
            part = _resample_exact(part, meta.rate, rate, piece.frames)
        return part

    # -- live --------------------------------------------------------------------

    async def _live(self, request: Request) -> _StreamResponse:
        ring = self.agent.ring
        cfg, st = self.config, self.stats
        p = _params(request, ("format", "seconds", "channels", "bitrate"))
        _choice(p, "format", "opus", ("opus",))
        limit = int(cfg.live_max_seconds)
        seconds = _int_param(p, "seconds", limit, 1, max(1, limit))
        channels = _int_param(p, "channels", min(ring.channels, 2), 1, _MAX_CHANNELS)
        if ring.channels > 1 and channels > ring.channels:
            raise ApiError(400, f"channels: expected at most {ring.channels}, got {channels}",
                           "channels")
        bitrate = _int_param(p, "bitrate", _OPUS_BITRATE, 6000, 256000)
        headers = {"Content-Type": AUDIO_FORMATS["opus"], "Cache-Control": "no-store",
                   "X-Audio-Rate": str(ring.rate), "X-Audio-Channels": str(channels)}
        if request.method == "HEAD":
            return _StreamResponse(200, headers, None, stall=1.0, what="live")
        if st.live_listeners >= cfg.max_live_listeners:
            st.live_rejected += 1
            raise ApiError(503, f"busy: {st.live_listeners} live listeners "
                                "(api.max_live_listeners)", headers={"Retry-After": "10"})
        st.live_listeners += 1
        st.live_sessions += 1

        def release() -> None:  # _StreamResponse runs it exactly once
            st.live_listeners -= 1

        return _StreamResponse(200, headers, partial(self._produce_live, seconds, channels,
                                                     bitrate),
                               stall=cfg.request_timeout_seconds, what="live", release=release)

    async def _produce_live(self, seconds: int, channels: int, bitrate: int,
                            sink: _Sink) -> None:
        ring = self.agent.ring
        st = self.stats
        encoder = OggOpusEncoder(ring.rate, channels, bitrate=bitrate, application="audio",
                                 max_page_delay_ms=int(_LIVE_FLUSH * 1000),
                                 comments={"ENCODER": "edge-agent",
                                           "DEVICE": self.agent.config.device.id})
        threads = self._encode_threads
        step = max(1, round(_LIVE_FLUSH * ring.rate))

        def encode(pcm: NDArray[Any]) -> bytes:
            return encoder.write(mix_down(pcm, channels)) + encoder.flush()

        try:
            with ring.open_reader("api-live") as reader:
                await sink.send(await trio.to_thread.run_sync(encoder.flush, limiter=threads))
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
                        await sink.send(await trio.to_thread.run_sync(encode, got.frames,
                                                                      limiter=threads))
                await sink.send(await trio.to_thread.run_sync(encoder.finish, limiter=threads))
        finally:
            encoder.close()


def _blocks(total: int, size: int) -> Iterator[int]:
    while total > 0:
        n = min(size, total)
        yield n
        total -= n

