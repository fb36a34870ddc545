"""The object store over HTTP at the reference backend: any `LocalStore`
served with the idempotent protocol `store.HttpStore` speaks (the backend mounts
it under ``/v1/objects``), so `HttpStore` is tested against a real server.

Imports only the bottom layer (`blocking`, `store`, `wire`); never agent or a stage.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field

import trio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..blocking import ThreadRunner
from ..store import LocalStore, StoredObject, check_key
from ..store.base import METADATA_HEADER
from ..wire import content_digest, parse_digest_header

__all__ = ["store_routes"]


@dataclass
class _ServeState:
    store: LocalStore
    max_bytes: int
    token: str | None
    runner: ThreadRunner
    lock: trio.Lock = field(default_factory=trio.Lock)


def store_routes(store: LocalStore, *, prefix: str = "/v1/objects", token: str | None = None,
                 max_bytes: int = 1 << 30, runner: ThreadRunner | None = None) -> list[Route]:
    """Starlette routes serving `store` with the idempotent protocol `HttpStore` speaks.

    ``PUT`` checks the body against its `Content-Digest` (400 on a mismatch) and,
    with `If-None-Match: *`, never replaces: the same body again is 412, another
    body 409, both with the stored digest in `Repr-Digest`. One lock makes "is it
    there? then store it" atomic. `runner` does the blocking work (4 at a time).
    """
    state = _ServeState(store, max_bytes, token, runner or ThreadRunner(4))

    def denied(request: Request) -> Response | None:
        if state.token is None:
            return None
        if request.headers.get("authorization", "") != f"Bearer {state.token}":
            return PlainTextResponse("missing or wrong bearer token\n", status_code=401)
        return None

    def key_of(request: Request) -> str | Response:
        key = str(request.path_params["key"])
        try:
            check_key(key)
        except ValueError as exc:
            return PlainTextResponse(f"{exc}\n", status_code=400)
        return key

    def digest_headers(obj: StoredObject) -> dict[str, str]:
        return {"Repr-Digest": content_digest(obj.sha256), "ETag": f'"{obj.sha256}"'}

    async def put(request: Request) -> Response:
        if (refused := denied(request)) is not None:
            return refused
        key = key_of(request)
        if isinstance(key, Response):
            return key
        claimed = parse_digest_header(request.headers.get("content-digest")).get("sha-256")
        if claimed is None or len(claimed) != 32:
            return PlainTextResponse("Content-Digest: expected sha-256=:<base64 of 32 bytes>:\n",
                                     status_code=400)
        try:
            meta = json.loads(request.headers.get(METADATA_HEADER.lower(), "{}"))
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            return PlainTextResponse(f"{METADATA_HEADER}: expected a JSON object ({exc})\n",
                                     status_code=400)
        meta.setdefault("content_type", request.headers.get("content-type",
                                                            "application/octet-stream"))
        # Received into an anonymous temp file (bounded), then stored atomically.
        spooled = tempfile.SpooledTemporaryFile(max_size=8 << 20)  # noqa: SIM115
        try:
            hasher = hashlib.sha256()
            size = 0
            try:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > state.max_bytes:
                        return PlainTextResponse(f"body larger than {state.max_bytes} bytes\n",
                                                 status_code=413)
                    hasher.update(chunk)
                    await state.runner.run(spooled.write, chunk)
            except ClientDisconnect:
                return PlainTextResponse("incomplete body\n", status_code=400)
            body_sha = hasher.hexdigest()
            if body_sha != claimed.hex():
                return PlainTextResponse(f"Content-Digest mismatch: body sha256={body_sha}\n",
                                         status_code=400)
            async with state.lock:
                held = await state.runner.run(state.store.stat_sync, key)
                if held is not None and request.headers.get("if-none-match") == "*":
                    status = 412 if held.sha256 == body_sha else 409
                    return PlainTextResponse("already stored\n" if status == 412 else
                                             "a different body is stored under this key\n",
                                             status_code=status, headers=digest_headers(held))
                spooled.seek(0)
                await state.store.upload(spooled, key, meta)
        finally:
            spooled.close()
        return PlainTextResponse("stored\n", status_code=201, headers={
            "Repr-Digest": content_digest(body_sha), "ETag": f'"{body_sha}"'})

    async def get(request: Request) -> Response:
        if (refused := denied(request)) is not None:
            return refused
        key = key_of(request)
        if isinstance(key, Response):
            return key
        obj = await state.runner.run(state.store.stat_sync, key)
        if obj is None:
            return PlainTextResponse("no such object\n", status_code=404)
        headers = {**digest_headers(obj), "Edge-Stored-Utc": obj.stored_utc,
                   METADATA_HEADER: json.dumps(obj.metadata, separators=(",", ":"))}
        media_type = str(obj.metadata.get("content_type", "application/octet-stream"))
        if request.method == "HEAD":
            return Response(None, headers={**headers, "Content-Length": str(obj.bytes)},
                            media_type=media_type)
        data = await state.store.download(key)
        return Response(data, headers=headers, media_type=media_type)

    async def delete(request: Request) -> Response:
        if (refused := denied(request)) is not None:
            return refused
        key = key_of(request)
        if isinstance(key, Response):
            return key
        async with state.lock:
            await state.store.delete(key)
        return Response(None, status_code=204)

    async def listing(request: Request) -> Response:
        if (refused := denied(request)) is not None:
            return refused
        return JSONResponse(await state.store.list(request.query_params.get("prefix", "")))

    base = prefix.rstrip("/")
    return [
        Route(base, listing, methods=["GET"]),
        Route(base + "/{key:path}", put, methods=["PUT"]),
        Route(base + "/{key:path}", get, methods=["GET", "HEAD"]),
        Route(base + "/{key:path}", delete, methods=["DELETE"]),
    ]
