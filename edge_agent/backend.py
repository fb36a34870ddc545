"""The reference backend: a real HTTP server that receives what agents send.

It accepts live STT chunks (the `openai`, `deepgram` and `raw` protocols) and
durable segment uploads (idempotent `PUT`), and can inject faults so tests and
benchmarks exercise the agent against outages, slowness and garbage. Run it
with `edge-agent backend`; `edge-agent demo` starts one on loopback.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import socket
import struct
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import trio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .audio.opus import OpusError, decode_ogg_opus
from .audio.pcm import SampleFormat, from_float32, mix_down
from .audio.resample import StreamResampler
from .clock import iso_utc
from .http import serve
from .store import LocalStore, store_routes
from .supervisor import TaskStatus
from .wire import DEVICE_ID_PATTERN, SEGMENT_ID_PATTERN, content_digest, parse_digest_header

__all__ = [
    "Backend",
    "Faults",
    "SegmentStoreStats",
    "StoredSegment",
    "SttChunkRecord",
    "SttReceiver",
    "build_app",
    "list_stored_segments",
    "read_stored_segment",
    "run_backend",
]

log = logging.getLogger(__name__)


@dataclass
class Faults:
    """Faults to inject, changeable while the server runs (tests flip them).

    Counters ("next N requests") decrease as requests consume them.
    """

    delay_seconds: float = 0.0
    unavailable: int = 0  # answer the next N requests with 503
    retry_after: int | None = 1  # Retry-After seconds sent with those 503s
    # Connection faults, made for real by the TCP front of `run_backend`:
    down: bool = False  # refuse connections (listener closed) while True
    reset_mid_body: int = 0  # reset the next N requests after part of their body
    drop_response: int = 0  # the next N requests are handled, then the connection is
    # reset before the response reaches the client (a lost acknowledgement)
    wrong_status: int = 0  # answer the next N segment PUTs with `wrong_status_code`
    wrong_status_code: int = 500
    extra: dict[str, Any] = field(default_factory=dict)  # per-route faults (see sections)

    def take(self, name: str) -> bool:
        """Consume one unit of a counter fault; True if it applies to this request."""
        value = getattr(self, name, None)
        if value is None:
            value = self.extra.get(name, 0)
        if isinstance(value, int) and value > 0:
            if hasattr(self, name):
                setattr(self, name, value - 1)
            else:
                self.extra[name] = value - 1
            return True
        return False


@dataclass
class Backend:
    """State shared by the routes: where uploads are kept, what was received."""

    data_dir: Path
    faults: Faults = field(default_factory=Faults)
    segment_stats: SegmentStoreStats = field(default_factory=lambda: SegmentStoreStats())
    listening: bool = False  # the public port accepts connections (see Faults.down)
    stt: SttReceiver = field(default_factory=lambda: SttReceiver())


async def _apply_common_faults(backend: Backend) -> Response | None:
    if backend.faults.delay_seconds:
        await trio.sleep(backend.faults.delay_seconds)
    if backend.faults.take("unavailable"):
        headers = {}
        if backend.faults.retry_after is not None:
            headers["Retry-After"] = str(backend.faults.retry_after)
        return Response("unavailable (injected)", status_code=503, headers=headers)
    return None


# ----------------------------------------------------------------------------
# Live STT (openai / deepgram / raw protocols)
#
# Three routes take one chunk each, a complete Ogg Opus file:
#   POST /v1/audio/transcriptions  openai: multipart `file` + `model`, `language`,
#                                  `prompt`, `response_format` (json or text)
#   POST /v1/listen                deepgram: the file as the body (audio/*),
#                                  `Authorization: Token <key>`, `?model=&language=`
#   POST /v1/stt/raw               raw: the file as the body (audio/ogg) with the
#                                  headers of `stt.RAW_HEADERS`; 204 for no speech
# The audio is decoded with libopusfile and, when pocketsphinx is installed (the
# `asr` extra; its wheel ships an English model), recognised in a worker thread;
# without it the answer is the decoded duration. `SttReceiver.records` keeps what
# arrived (bounded) for tests. Faults: the common ones (delay, 503 with
# Retry-After, and the TCP front's down / reset / lost response) plus
# `extra["stt_garbage"]`: the next N answers are 200 with malformed JSON.

MAX_STT_CHUNK_BYTES = 8 << 20
# The recogniser's input format (pocketsphinx's default acoustic model).
_ASR_RATE = 16000


@dataclass(frozen=True)
class SttChunkRecord:
    """One chunk the STT routes received (for tests and the demo)."""

    protocol: str
    headers: dict[str, str]
    fields: dict[str, str]  # multipart fields (openai) or query parameters
    filename: str | None
    content_type: str
    size: int
    seconds: float
    text: str


class SttReceiver:
    """What the STT routes share: the recogniser and a bounded record of chunks.

    Args:
        recognise: use pocketsphinx when it is installed; False answers with the
            decoded duration only (fast, for tests that only look at the wire).
        token: when set, requests must carry it (`Bearer`, or `Token` for deepgram).
        max_records: how many received chunks `records` keeps.
    """

    def __init__(self, *, recognise: bool = True, token: str | None = None,
                 max_records: int = 1000) -> None:
        self.token = token
        self.records: deque[SttChunkRecord] = deque(maxlen=max_records)
        self.received = 0
        self.rejected = 0
        self.recognise = recognise and importlib.util.find_spec("pocketsphinx") is not None
        self._limiter = trio.CapacityLimiter(1)  # one decoder, used by one thread at a time
        self._decoder: Any = None
        self._cmn0 = ""

    def transcribe(self, ogg: bytes) -> tuple[float, str]:
        """(seconds, text) of an Ogg Opus file; blocking. Raises `OpusError`."""
        decoded = decode_ogg_opus(ogg)
        if not self.recognise:
            return decoded.seconds, f"[{decoded.seconds:.2f} s of audio]"
        return decoded.seconds, self.recognise_pcm(decoded.pcm, decoded.rate)

    def recognise_pcm(self, pcm: Any, rate: int) -> str:
        """Words pocketsphinx hears in float or int16 PCM at `rate`; blocking."""
        mono = mix_down(pcm, 1)
        if rate != _ASR_RATE:
            rs = StreamResampler(rate, _ASR_RATE, 1)
            mono = np.concatenate([rs.process(mono), rs.flush()])
        samples = from_float32(mono[:, 0], SampleFormat.INT16)
        if self._decoder is None:
            import pocketsphinx  # the optional `asr` extra

            self._decoder = pocketsphinx.Decoder()  # the bundled en-us model
            self._cmn0 = self._decoder.get_cmn(False)
        dec = self._decoder
        # Each chunk is recognised on its own: reset the cepstral mean the decoder
        # adapts across utterances, so an answer never depends on earlier chunks.
        dec.set_cmn(self._cmn0)
        dec.start_utt()
        dec.process_raw(samples.tobytes(), full_utt=True)
        dec.end_utt()
        hyp = dec.hyp()
        return str(hyp.hypstr) if hyp is not None else ""

    async def run(self, ogg: bytes) -> tuple[float, str]:
        return await trio.to_thread.run_sync(self.transcribe, ogg, limiter=self._limiter)


def _stt_error(status: int, message: str, protocol: str) -> Response:
    if protocol == "openai":  # the shape OpenAI's clients parse
        body: dict[str, Any] = {"error": {"message": message, "type": "invalid_request_error"}}
    else:
        body = {"error": message}
    return JSONResponse(body, status_code=status)


def stt_routes(backend: Backend) -> list[Route]:
    stt = backend.stt

    def check_auth(request: Request, scheme: str) -> bool:
        if stt.token is None:
            return True
        return request.headers.get("authorization", "") == f"{scheme} {stt.token}"

    async def receive(request: Request, protocol: str, scheme: str) -> Response | None:
        """Faults and checks every route shares; a response ends the request."""
        if (fault := await _apply_common_faults(backend)) is not None:
            return fault
        if not check_auth(request, scheme):
            stt.rejected += 1
            return _stt_error(401, f"expected Authorization: {scheme} <token>", protocol)
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_STT_CHUNK_BYTES:
            stt.rejected += 1
            return _stt_error(413, f"chunk larger than {MAX_STT_CHUNK_BYTES} bytes", protocol)
        return None

    async def recognise(
        request: Request, protocol: str, ogg: bytes, fields: dict[str, str],
        filename: str | None, content_type: str,
    ) -> tuple[float, str] | Response:
        try:
            seconds, text = await stt.run(ogg)
        except OpusError as exc:
            stt.rejected += 1
            return _stt_error(400, f"not an Ogg Opus file ({exc})", protocol)
        stt.received += 1
        headers = {k.lower(): v for k, v in request.headers.items()}
        stt.records.append(SttChunkRecord(protocol, headers, fields, filename, content_type,
                                          len(ogg), seconds, text))
        log.info("stt chunk protocol=%s bytes=%d seconds=%.2f text=%r", protocol, len(ogg),
                 seconds, text)
        if backend.faults.take("stt_garbage"):
            return Response(b'{"text": "unterminated', media_type="application/json")
        return seconds, text

    async def openai(request: Request) -> Response:
        if (early := await receive(request, "openai", "Bearer")) is not None:
            return early
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            stt.rejected += 1
            return _stt_error(400, "expected a multipart/form-data body", "openai")
        async with request.form(max_files=1, max_fields=16,
                                 max_part_size=MAX_STT_CHUNK_BYTES) as form:
            upload = form.get("file")
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            if upload is None or isinstance(upload, str):
                stt.rejected += 1
                return _stt_error(400, "expected a 'file' field with the audio", "openai")
            filename = upload.filename or ""
            if not filename.lower().endswith((".ogg", ".oga", ".webm", ".wav", ".mp3")):
                stt.rejected += 1  # hosted APIs pick the decoder by extension: .opus fails
                return _stt_error(400, f"unsupported file name {filename!r}: "
                                  "expected .ogg for Ogg Opus", "openai")
            ogg = await upload.read()
            content_type = upload.content_type or ""
        fmt = fields.get("response_format", "json")
        if fmt not in ("json", "text"):
            stt.rejected += 1
            return _stt_error(400, f"response_format {fmt!r}: expected json or text", "openai")
        result = await recognise(request, "openai", ogg, fields, filename, content_type)
        if isinstance(result, Response):
            return result
        _, text = result
        if fmt == "text":
            return PlainTextResponse(text)
        return JSONResponse({"text": text})

    async def deepgram(request: Request) -> Response:
        if (early := await receive(request, "deepgram", "Token")) is not None:
            return early
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("audio/"):
            stt.rejected += 1
            return _stt_error(415, f"expected an audio/* body, got {content_type!r}",
                              "deepgram")
        ogg = await request.body()
        fields = dict(request.query_params)
        result = await recognise(request, "deepgram", ogg, fields, None, content_type)
        if isinstance(result, Response):
            return result
        seconds, text = result
        return JSONResponse({
            "metadata": {"request_id": str(uuid.uuid4()), "duration": seconds, "channels": 1,
                         "models": [fields.get("model", "reference")]},
            "results": {"channels": [{"alternatives": [
                {"transcript": text, "confidence": 1.0 if text else 0.0, "words": []}]}]},
        })

    async def raw(request: Request) -> Response:
        if (early := await receive(request, "raw", "Bearer")) is not None:
            return early
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("audio/ogg"):
            stt.rejected += 1
            return _stt_error(415, f"expected audio/ogg; codecs=opus, got {content_type!r}",
                              "raw")
        problem = _raw_header_problem(request)
        if problem is not None:
            stt.rejected += 1
            return _stt_error(400, problem, "raw")
        ogg = await request.body()
        result = await recognise(request, "raw", ogg, {}, None, content_type)
        if isinstance(result, Response):
            return result
        seconds, text = result
        if not text:
            return Response(status_code=204)
        return JSONResponse({"text": text, "seconds": seconds,
                             "sequence": int(request.headers["x-sequence"])})

    return [
        Route("/v1/audio/transcriptions", openai, methods=["POST"]),
        Route("/v1/listen", deepgram, methods=["POST"]),
        Route("/v1/stt/raw", raw, methods=["POST"]),
    ]


def _raw_header_problem(request: Request) -> str | None:
    """What is wrong with a raw chunk's timeline headers, or None."""
    h = request.headers
    for name in ("X-Device-Id", "X-Stream-Id", "X-Sequence", "X-Chunk-Start",
                 "X-Chunk-Duration"):
        if not h.get(name):
            return f"missing header {name}"
    if not re.fullmatch(DEVICE_ID_PATTERN, h["x-device-id"]):
        return f"X-Device-Id {h['x-device-id']!r}: expected a device id"
    if not h["x-sequence"].isdigit():
        return f"X-Sequence {h['x-sequence']!r}: expected an integer >= 0"
    try:
        datetime.fromisoformat(h["x-chunk-start"].replace("Z", "+00:00"))
    except ValueError:
        return f"X-Chunk-Start {h['x-chunk-start']!r}: expected an ISO 8601 UTC time"
    try:
        duration = float(h["x-chunk-duration"])
    except ValueError:
        duration = -1.0
    if not 0 < duration < 3600:
        return f"X-Chunk-Duration {h['x-chunk-duration']!r}: expected seconds > 0"
    return None


# ----------------------------------------------------------------------------
# Durable segment uploads (idempotent PUT)
#
# Layout: data_dir/segments/<device>/<id>.json (metadata, written first) and
# <id>.<ext> (the audio, renamed into place last: its rename is the commit).
# A body is received into a private temp file while hashing it; nothing is
# visible until the digest matched and both files are durable. One lock makes
# "is it there? then store it" atomic, so concurrent PUTs of one id yield one
# object, and a different body under a stored id is refused (409), never
# written over.

MAX_SEGMENT_BYTES = 1 << 30
_EXTENSIONS = {"audio/ogg; codecs=opus": ".opus", "audio/ogg; codecs=flac": ".oga",
               "audio/ogg": ".ogg", "audio/opus": ".opus", "audio/flac": ".flac",
               "audio/wav": ".wav", "audio/x-wav": ".wav", "audio/wave": ".wav",
               "audio/mpeg": ".mp3"}


def _extension(content_type: str) -> str:
    kind = ";".join(p.strip() for p in content_type.lower().split(";"))
    return _EXTENSIONS.get(kind.replace(";", "; "), _EXTENSIONS.get(kind.split(";")[0], ".bin"))


@dataclass
class SegmentStoreStats:
    """What the segment store saw; `created` counts objects per (device, id)."""

    puts: int = 0
    stored: int = 0
    already_present: int = 0  # same id, same digest: 412 or 200, nothing written
    conflicts: int = 0  # same id, another digest: 409, nothing written
    digest_mismatches: int = 0  # body did not match its Content-Digest: 400
    incomplete: int = 0  # the client went away mid-body: nothing stored
    rejected: int = 0  # other 4xx (bad id, missing digest, too large)
    created: Counter[tuple[str, str]] = field(default_factory=Counter)


@dataclass(frozen=True)
class StoredSegment:
    """One segment the backend holds."""

    device: str
    id: str
    sha256: str
    bytes: int
    content_type: str
    start_utc: str
    end_utc: str
    received_utc: str
    path: Path


def _segment_dir(data_dir: Path, device: str) -> Path:
    return data_dir / "segments" / device


def read_stored_segment(data_dir: Path, device: str, segment_id: str) -> StoredSegment | None:
    """The stored segment `segment_id` of `device`, or None (blocking; small reads)."""
    meta_path = _segment_dir(data_dir, device) / f"{segment_id}.json"
    try:
        meta = json.loads(meta_path.read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    path = meta_path.with_name(segment_id + meta["ext"])
    if not path.exists():  # metadata of a store interrupted before its commit
        return None
    return StoredSegment(device, segment_id, meta["sha256"], meta["bytes"],
                         meta["content_type"], meta["start_utc"], meta["end_utc"],
                         meta["received_utc"], path)


def list_stored_segments(data_dir: Path, device: str) -> list[StoredSegment]:
    """Every committed segment of `device`, by id (ids sort by time)."""
    folder = _segment_dir(data_dir, device)
    if not folder.is_dir():
        return []
    found = (read_stored_segment(data_dir, device, p.stem) for p in sorted(folder.glob("*.json")))
    return [s for s in found if s is not None]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _commit(part: Path, final: Path, meta_path: Path, meta: dict[str, Any]) -> None:
    """Make a received body visible: metadata first, then the audio (the commit)."""
    _write_durably(meta_path, json.dumps(meta, indent=1).encode())
    os.replace(part, final)
    _fsync_dir(final.parent)


def _digest_headers(sha256_hex: str) -> dict[str, str]:
    return {"Repr-Digest": content_digest(sha256_hex), "ETag": f'"{sha256_hex}"'}


def segment_routes(backend: Backend) -> list[Route]:
    stats = backend.segment_stats
    commit_lock = trio.Lock()
    io_limiter = trio.CapacityLimiter(4)

    def reject(status: int, message: str) -> Response:
        stats.rejected += 1
        return PlainTextResponse(message + "\n", status_code=status)

    def check_names(request: Request) -> tuple[str, str] | Response:
        device = request.path_params["device"]
        segment_id = request.path_params["segment_id"]
        if not re.fullmatch(DEVICE_ID_PATTERN, device):
            return reject(400, f"device {device!r}: expected letters, digits, '.', '_' or '-'")
        if not re.fullmatch(SEGMENT_ID_PATTERN, segment_id):
            return reject(400, f"segment id {segment_id!r}: expected {SEGMENT_ID_PATTERN}")
        return device, segment_id

    async def receive(request: Request, part: Path) -> str | None:
        """Stream the body into `part`; its sha256 (hex), or None if the client left
        or sent more than `MAX_SEGMENT_BYTES`."""
        hasher = hashlib.sha256()
        size = 0
        f = await trio.to_thread.run_sync(part.open, "wb", limiter=io_limiter)
        try:
            async for chunk in request.stream():
                hasher.update(chunk)
                size += len(chunk)
                if size > MAX_SEGMENT_BYTES:
                    return None
                if chunk:
                    await trio.to_thread.run_sync(f.write, chunk, limiter=io_limiter)
            await trio.to_thread.run_sync(_flush_and_sync, f, limiter=io_limiter)
        except ClientDisconnect:
            return None
        finally:
            f.close()
        return hasher.hexdigest()

    async def put_segment(request: Request) -> Response:
        stats.puts += 1
        names = check_names(request)
        if isinstance(names, Response):
            return names
        device, segment_id = names
        if (fault := await _apply_common_faults(backend)) is not None:
            return fault
        if backend.faults.take("wrong_status"):
            return PlainTextResponse("wrong status (injected)\n",
                                     status_code=backend.faults.wrong_status_code)
        claimed = parse_digest_header(request.headers.get("content-digest")).get("sha-256")
        if claimed is None or len(claimed) != 32:
            return reject(400, "Content-Digest: expected sha-256=:<base64 of 32 bytes>:")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_SEGMENT_BYTES):
            return reject(413, f"Content-Length: expected at most {MAX_SEGMENT_BYTES} bytes")
        folder = _segment_dir(backend.data_dir, device)
        await trio.to_thread.run_sync(partial(folder.mkdir, parents=True, exist_ok=True))
        part = folder / f".{segment_id}.{uuid.uuid4().hex}.part"
        try:
            body_sha = await receive(request, part)
            if body_sha is None:
                stats.incomplete += 1
                log.info("segment upload incomplete device=%s id=%s", device, segment_id)
                return PlainTextResponse("incomplete body\n", status_code=400)
            if body_sha != claimed.hex():
                stats.digest_mismatches += 1
                log.warning("segment digest mismatch device=%s id=%s", device, segment_id)
                return PlainTextResponse(
                    f"Content-Digest mismatch: body sha256={body_sha}, "
                    f"header sha256={claimed.hex()}\n", status_code=400)
            async with commit_lock:
                held = await trio.to_thread.run_sync(
                    read_stored_segment, backend.data_dir, device, segment_id)
                if held is not None and held.sha256 == body_sha:
                    stats.already_present += 1
                    status = 412 if request.headers.get("if-none-match") == "*" else 200
                    return PlainTextResponse("already stored\n", status_code=status,
                                             headers=_digest_headers(held.sha256))
                if held is not None:
                    stats.conflicts += 1
                    log.warning("segment conflict device=%s id=%s", device, segment_id)
                    return PlainTextResponse("a different body is stored under this id\n",
                                             status_code=409,
                                             headers=_digest_headers(held.sha256))
                content_type = request.headers.get("content-type", "application/octet-stream")
                ext = _extension(content_type)
                meta = {
                    "sha256": body_sha, "bytes": part.stat().st_size, "ext": ext,
                    "content_type": content_type,
                    "start_utc": request.headers.get("edge-segment-start", ""),
                    "end_utc": request.headers.get("edge-segment-end", ""),
                    "received_utc": iso_utc(time.time()),
                }
                await trio.to_thread.run_sync(
                    _commit, part, folder / (segment_id + ext), folder / f"{segment_id}.json",
                    meta, limiter=io_limiter)
                stats.stored += 1
                stats.created[(device, segment_id)] += 1
            log.info("segment stored device=%s id=%s bytes=%d", device, segment_id,
                     meta["bytes"])
            return PlainTextResponse("stored\n", status_code=201, headers={
                **_digest_headers(body_sha), "Location": str(request.url.path)})
        finally:
            part.unlink(missing_ok=True)

    async def get_segment(request: Request) -> Response:
        names = check_names(request)
        if isinstance(names, Response):
            return names
        held = await trio.to_thread.run_sync(read_stored_segment, backend.data_dir, *names)
        if held is None:
            return PlainTextResponse("no such segment\n", status_code=404)
        return FileResponse(held.path, media_type=held.content_type,
                            headers=_digest_headers(held.sha256))

    async def list_segments(request: Request) -> Response:
        device = request.path_params["device"]
        if not re.fullmatch(DEVICE_ID_PATTERN, device):
            return reject(400, f"device {device!r}: expected letters, digits, '.', '_' or '-'")
        held = await trio.to_thread.run_sync(list_stored_segments, backend.data_dir, device)
        return JSONResponse([
            {"id": s.id, "sha256": s.sha256, "bytes": s.bytes, "content_type": s.content_type,
             "start_utc": s.start_utc, "end_utc": s.end_utc, "received_utc": s.received_utc}
            for s in held
        ])

    return [
        Route("/v1/devices/{device}/segments", list_segments, methods=["GET"]),
        Route("/v1/devices/{device}/segments/{segment_id}", put_segment, methods=["PUT"]),
        Route("/v1/devices/{device}/segments/{segment_id}", get_segment, methods=["GET", "HEAD"]),
    ]


def _flush_and_sync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


# ----------------------------------------------------------------------------
# Connection faults: a TCP front that makes "down", "reset" and "lost response"
# real. An ASGI app cannot refuse a connection or reset it, so `run_backend`
# serves the app on a private loopback port and puts this byte forwarder on the
# public one. It assumes one request at a time per connection (HTTP/1.1 without
# pipelining, which is what httpx sends).

# How often the front looks at `Faults.down`; it only matters in tests that flip it.
_DOWN_POLL_SECONDS = 0.01
RESET_AFTER_BODY_BYTES = 4096


class _Conn:
    def __init__(self, client: trio.SocketStream, upstream: trio.SocketStream) -> None:
        self.client = client
        self.upstream = upstream
        self.new_request = True
        self.responded = False
        self.reset_at: int | None = None  # request bytes to forward before a reset
        self.head = b""
        self.forwarded = 0
        self.reset = False


async def _close(stream: trio.SocketStream, *, reset: bool) -> None:
    if reset:  # SO_LINGER 0: close() sends RST instead of FIN
        with contextlib.suppress(OSError):
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
    await trio.aclose_forcefully(stream)


class _FaultFront:
    """Forwards bytes between clients and the app; breaks them as `faults` says."""

    def __init__(self, backend: Backend, upstream_port: int) -> None:
        self.backend = backend
        self.faults = backend.faults
        self.upstream_port = upstream_port

    async def run(self, host: str, port: int,
                  task_status: TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        reported = False
        while True:
            # Faults.down is a plain attribute tests flip, so it is polled.
            while self.faults.down:  # noqa: ASYNC110
                await trio.sleep(_DOWN_POLL_SECONDS)
            listeners = await trio.open_tcp_listeners(port, host=host)
            port = listeners[0].socket.getsockname()[1]
            self.backend.listening = True
            if not reported:
                task_status.started(f"http://[{host}]:{port}" if ":" in host
                                    else f"http://{host}:{port}")
                reported = True
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.serve_listeners, self._handle, listeners)
                while not self.faults.down:  # noqa: ASYNC110
                    await trio.sleep(_DOWN_POLL_SECONDS)
                log.info("backend down (injected) port=%d", port)
                nursery.cancel_scope.cancel()
            self.backend.listening = False

    async def _handle(self, client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        except OSError:
            await _close(client, reset=True)
            return
        conn = _Conn(client, upstream)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._requests, conn, nursery.cancel_scope)
                nursery.start_soon(self._responses, conn, nursery.cancel_scope)
        finally:
            reset = conn.reset or self.faults.down
            await _close(client, reset=reset)
            await _close(upstream, reset=reset)

    async def _requests(self, conn: _Conn, scope: trio.CancelScope) -> None:
        while True:
            try:
                data = await conn.client.receive_some(65536)
            except trio.BrokenResourceError:
                conn.reset = True
                data = b""
            if not data:
                scope.cancel()
                return
            if conn.new_request:
                conn.new_request, conn.responded = False, False
                conn.head, conn.forwarded, conn.reset_at = b"", 0, None
                if self.faults.take("reset_mid_body"):
                    conn.reset_at = -1  # decided once the head is complete
            if conn.reset_at is not None:
                if conn.reset_at < 0 and len(conn.head) < 65536:
                    conn.head += data
                    end = conn.head.find(b"\r\n\r\n")
                    if end >= 0:
                        m = re.search(rb"(?im)^content-length:\s*(\d+)", conn.head[:end])
                        body = int(m.group(1)) if m else 2 * RESET_AFTER_BODY_BYTES
                        conn.reset_at = end + 4 + min(RESET_AFTER_BODY_BYTES, body // 2)
                if conn.reset_at >= 0 and conn.forwarded + len(data) > conn.reset_at:
                    await conn.upstream.send_all(data[: conn.reset_at - conn.forwarded])
                    log.info("connection reset mid-body (injected)")
                    conn.reset = True
                    scope.cancel()
                    return
            conn.forwarded += len(data)
            try:
                await conn.upstream.send_all(data)
            except trio.BrokenResourceError:
                scope.cancel()
                return

    async def _responses(self, conn: _Conn, scope: trio.CancelScope) -> None:
        while True:
            try:
                data = await conn.upstream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                scope.cancel()
                return
            if not conn.responded:
                conn.responded = True
                if self.faults.take("drop_response"):
                    log.info("response dropped, connection reset (injected)")
                    conn.reset = True
                    scope.cancel()
                    return
            conn.new_request = True
            try:
                await conn.client.send_all(data)
            except trio.BrokenResourceError:
                conn.reset = True
                scope.cancel()
                return


# ----------------------------------------------------------------------------


def build_app(backend: Backend) -> Starlette:
    async def health(request: Request) -> Response:
        return Response("ok\n")

    routes = [Route("/healthz", health), *stt_routes(backend), *segment_routes(backend),
              # Recordings uploaded by recorder.AudioRecorder through store.HttpStore.
              *store_routes(LocalStore(backend.data_dir / "objects"), prefix="/v1/objects")]
    return Starlette(routes=routes)


async def run_backend(
    backend: Backend, bind: str = "127.0.0.1:0", *,
    task_status: TaskStatus = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the reference backend until cancelled; reports its base URL.

    The app listens on a private loopback port behind a TCP front on `bind`,
    which injects the connection faults of `Faults` (down, resets, lost responses).
    """
    backend.data_dir.mkdir(parents=True, exist_ok=True)
    host, _, port = bind.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"listen address {bind!r}: expected HOST:PORT")
    async with trio.open_nursery() as nursery:
        # Hypercorn's "Running on <private port>" would mislead: only its warnings.
        quiet = logging.getLogger("edge_agent.backend.app")
        quiet.setLevel(logging.WARNING)
        inner: str = await nursery.start(
            partial(serve, build_app(backend), "127.0.0.1:0", errorlog=quiet))
        front = _FaultFront(backend, int(inner.rpartition(":")[2]))
        url: str = await nursery.start(front.run, host.strip("[]"), int(port))
        log.info("backend serving url=%s data_dir=%s", url, backend.data_dir)
        task_status.started(url)
