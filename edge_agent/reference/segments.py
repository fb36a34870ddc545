"""Durable segment uploads at the reference backend: an idempotent ``PUT`` per
segment, ``GET``/``HEAD`` of one, and the list of a device's segments.

Layout: ``data_dir/segments/<device>/<id>.json`` (metadata, written first) and
``<id>.<ext>`` (the audio, renamed into place last: its rename is the commit).
A body is received into a private temp file while hashing it; nothing is
visible until the digest matched and both files are durable. One lock makes
"is it there? then store it" atomic, so concurrent PUTs of one id yield one
object, and a different body under a stored id is refused (409), never written
over. Faults (see `reference.hooks`): the common ones plus ``wrong_status``.

Imports only the bottom layer (`blocking`, `clock`, `fs`, `wire`); never agent or a stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..blocking import ThreadRunner
from ..clock import iso_utc
from ..fs import FileOps, sync_file, write_atomic
from ..wire import DEVICE_ID_PATTERN, SEGMENT_ID_PATTERN, content_digest, parse_digest_header
from .hooks import FaultSource, common_faults

__all__ = [
    "MAX_SEGMENT_BYTES",
    "SegmentStoreStats",
    "StoredSegment",
    "list_stored_segments",
    "read_stored_segment",
    "segment_routes",
]

log = logging.getLogger(__name__)

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


def _commit(part: Path, final: Path, meta_path: Path, meta: dict[str, Any]) -> None:
    """Make a received body visible: metadata first, then the audio (the commit)."""
    write_atomic(meta_path, json.dumps(meta, indent=1).encode())
    FileOps().replace(part, final)


def _digest_headers(sha256_hex: str) -> dict[str, str]:
    return {"Repr-Digest": content_digest(sha256_hex), "ETag": f'"{sha256_hex}"'}


def segment_routes(data_dir: Path, stats: SegmentStoreStats, faults: FaultSource, *,
                   runner: ThreadRunner | None = None) -> list[Route]:
    """The segment routes storing under `data_dir`, counting into `stats`;
    `faults()` is read per request. `runner` does the disk work (4 at a time)."""
    commit_lock = trio.Lock()
    io = runner or ThreadRunner(4)

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
        f = await io.run(part.open, "wb")
        try:
            async for chunk in request.stream():
                hasher.update(chunk)
                size += len(chunk)
                if size > MAX_SEGMENT_BYTES:
                    return None
                if chunk:
                    await io.run(f.write, chunk)
            await io.run(sync_file, f)
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
        hook = faults()
        if (fault := await common_faults(hook)) is not None:
            return fault
        if hook is not None and hook.take("wrong_status"):
            return PlainTextResponse("wrong status (injected)\n",
                                     status_code=hook.wrong_status_code)
        claimed = parse_digest_header(request.headers.get("content-digest")).get("sha-256")
        if claimed is None or len(claimed) != 32:
            return reject(400, "Content-Digest: expected sha-256=:<base64 of 32 bytes>:")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_SEGMENT_BYTES):
            return reject(413, f"Content-Length: expected at most {MAX_SEGMENT_BYTES} bytes")
        folder = _segment_dir(data_dir, device)
        await io.run(partial(folder.mkdir, parents=True, exist_ok=True))
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
                held = await io.run(read_stored_segment, data_dir, device, segment_id)
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
                await io.run(_commit, part, folder / (segment_id + ext),
                             folder / f"{segment_id}.json", meta)
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
        held = await io.run(read_stored_segment, data_dir, *names)
        if held is None:
            return PlainTextResponse("no such segment\n", status_code=404)
        return FileResponse(held.path, media_type=held.content_type,
                            headers=_digest_headers(held.sha256))

    async def list_segments(request: Request) -> Response:
        device = request.path_params["device"]
        if not re.fullmatch(DEVICE_ID_PATTERN, device):
            return reject(400, f"device {device!r}: expected letters, digits, '.', '_' or '-'")
        held = await io.run(list_stored_segments, data_dir, device)
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
