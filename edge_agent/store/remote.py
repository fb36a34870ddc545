"""`HttpStore`: objects on a server speaking the uploader's idempotent `PUT`.

Imports only the bottom layer and the store's `base`; never a stage or the agent.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import random
import re
from collections.abc import AsyncIterator, Callable, Mapping
from typing import IO, Any
from urllib.parse import quote

import httpx
import trio

from ..blocking import ThreadRunner
from ..clock import Clock, SystemClock
from ..supervisor import Backoff
from ..wire import (
    Verdict,
    idempotent_put_headers,
    judge_response,
    parse_digest_header,
    parse_retry_after,
)
from .base import (
    CHUNK_BYTES,
    MAX_METADATA_HEADER_BYTES,
    METADATA_HEADER,
    Body,
    KeyBuilder,
    StoredObject,
    StoreError,
    StoreStats,
    check_key,
    metadata_json,
)

log = logging.getLogger(__name__)


class HttpStore:
    """Objects behind an HTTP endpoint speaking the uploader's idempotent protocol.

    ``PUT {base_url}/{key}`` with `Content-Digest`, `If-None-Match: *` and the
    metadata as JSON in `Edge-Metadata`; ``GET``/``HEAD``/``DELETE`` on the same
    URL; ``GET {base_url}?prefix=...`` lists keys (a JSON array). Network errors,
    5xx, 408 and 429 are retried `retries` times with full-jitter backoff
    (honouring `Retry-After`); a library call must end, so unlike the agent's
    uploader it gives up then and raises `StoreError`.

    Args:
        base_url: e.g. ``https://backend.example/v1/objects``.
        token: Bearer token sent with every request.
        timeout: Bound on each whole request, in seconds.
        retries: Attempts after the first for a transient failure.
        transport: An httpx transport (tests may pass one).
        rng: Randomness for the backoff jitter.
    """

    def __init__(self, base_url: str, *, token: str | None = None, timeout: float = 60.0,
                 retries: int = 5, backoff_initial: float = 0.5, backoff_max: float = 10.0,
                 transport: httpx.AsyncBaseTransport | None = None,
                 rng: random.Random | None = None, clock: Clock | None = None) -> None:
        if not re.match(r"^https?://[^/\s]+", base_url):
            raise ValueError(f"HttpStore base_url {base_url!r}: expected an http(s):// URL")
        if retries < 0:
            raise ValueError(f"HttpStore retries must be >= 0, got {retries}")
        self.base_url = base_url.rstrip("/")
        self.key_builder = KeyBuilder()
        self.stats = StoreStats()
        # Reads of upload bodies from files (hashing, then streaming), two at a time.
        self._file_io = ThreadRunner(2)
        self.timeout = timeout
        self.retries = retries
        self.backoff = Backoff(initial=backoff_initial, maximum=backoff_max, jitter=1.0,
                               rng=rng or random.Random())
        self.clock: Clock = clock or SystemClock()
        self._headers = {"User-Agent": "edge-agent"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._transport = transport

    def __repr__(self) -> str:
        return f"<HttpStore {self.base_url}>"

    def url(self, key: str) -> str:
        check_key(key)
        return f"{self.base_url}/{quote(key, safe='/')}"

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self._transport, headers=self._headers,
                                 timeout=httpx.Timeout(self.timeout), follow_redirects=False)

    async def _request(self, method: str, url: str, *,
                       body: Callable[[], bytes | AsyncIterator[bytes]] | None = None,
                       headers: Mapping[str, str] | None = None,
                       params: Mapping[str, str] | None = None,
                       judge: Callable[[httpx.Response], Verdict] | None = None
                       ) -> httpx.Response:
        """One logical request with retries; returns the response that ended it.

        Transport errors, timeouts, 5xx, 408 and 429 are retried (or what `judge`
        calls RETRY); `body()` makes a fresh body for each attempt.
        """
        attempt = 0
        async with self._client() as client:
            while True:
                reason: str
                retry_after: float | None = None
                try:
                    with trio.fail_after(self.timeout):
                        response = await client.request(
                            method, url, content=body() if body is not None else None,
                            headers=headers, params=params)
                except trio.TooSlowError:
                    reason = f"no answer within {self.timeout:g} s"
                except httpx.TransportError as exc:
                    reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
                else:
                    status = response.status_code
                    if judge is not None:
                        retry = judge(response) is Verdict.RETRY
                    else:
                        retry = status >= 500 or status in (408, 429)
                    if not retry:
                        return response
                    reason = f"status={status}"
                    retry_after = parse_retry_after(response.headers.get("retry-after"),
                                                    self.clock.utc())
                if attempt >= self.retries:
                    self.stats.failures += 1
                    raise StoreError(f"{method} {url} failed after {attempt + 1} attempt(s): "
                                     f"{reason}")
                delay = self.backoff.delay(attempt)
                if retry_after is not None:
                    delay = max(delay, min(retry_after, self.backoff.maximum))
                attempt += 1
                self.stats.retries += 1
                log.info("store retry method=%s url=%s reason=%r retry_in=%.2fs", method, url,
                         reason, delay)
                await trio.sleep(delay)

    async def upload(self, data: Body, key: str, metadata: Mapping[str, Any] | None = None
                     ) -> str:
        url = self.url(key)
        meta = metadata_json(metadata)
        encoded = json.dumps(meta, separators=(",", ":"), ensure_ascii=True)
        if len(encoded) > MAX_METADATA_HEADER_BYTES:
            raise ValueError(f"store metadata: {len(encoded)} bytes of JSON, at most "
                             f"{MAX_METADATA_HEADER_BYTES} fit in a header")
        # The digest goes in a header, so a file is read twice: once to hash it, then
        # streamed (from the same position) for each attempt; memory stays flat.
        if isinstance(data, bytes | bytearray | memoryview):
            raw = bytes(data)
            size, sha = len(raw), hashlib.sha256(raw).hexdigest()

            def body() -> bytes | AsyncIterator[bytes]:
                return raw
        else:
            stream = data
            origin, size, sha = await self._file_io.run(_hash_from_here, stream)

            def body() -> bytes | AsyncIterator[bytes]:
                return _file_body(self._file_io, stream, origin, size)

        content_type = str(meta.get("content_type") or "application/octet-stream")
        headers = idempotent_put_headers(content_type, size, sha, {METADATA_HEADER: encoded})

        def judge(response: httpx.Response) -> Verdict:
            return judge_response(response.status_code, response.headers,
                                  response.text[:300], sha, self.clock.utc()).verdict

        response = await self._request("PUT", url, body=body, headers=headers, judge=judge)
        decision = judge_response(response.status_code, response.headers,
                                  response.text[:300].strip(), sha, self.clock.utc())
        if decision.verdict is Verdict.ALREADY:
            self.stats.already_present += 1
        elif decision.verdict is not Verdict.SYNCED:
            self.stats.failures += 1
            raise StoreError(f"PUT {url} refused: {decision.reason}")
        self.stats.uploads += 1
        self.stats.bytes_uploaded += size
        log.info("store upload key=%s bytes=%d url=%s already_present=%s", key, size, url,
                 decision.verdict is Verdict.ALREADY)
        return key

    async def download(self, key: str) -> bytes:
        url = self.url(key)
        response = await self._request("GET", url)
        if response.status_code == 404:
            raise KeyError(key)
        if response.status_code != 200:
            raise StoreError(f"GET {url}: status={response.status_code} {response.text[:200]!r}")
        self.stats.downloads += 1
        return response.content

    async def exists(self, key: str) -> bool:
        url = self.url(key)
        response = await self._request("HEAD", url)
        if response.status_code not in (200, 404):
            raise StoreError(f"HEAD {url}: status={response.status_code}")
        return response.status_code == 200

    async def list(self, prefix: str = "") -> builtins.list[str]:
        response = await self._request("GET", self.base_url, params={"prefix": prefix})
        if response.status_code != 200:
            raise StoreError(f"GET {self.base_url}?prefix={prefix}: "
                             f"status={response.status_code} {response.text[:200]!r}")
        keys = response.json()
        if not isinstance(keys, builtins.list) or not all(isinstance(k, str) for k in keys):
            raise StoreError(f"GET {self.base_url}: expected a JSON array of keys")
        return sorted(keys)

    async def delete(self, key: str) -> None:
        url = self.url(key)
        response = await self._request("DELETE", url)
        if response.status_code not in (200, 204, 404):
            raise StoreError(f"DELETE {url}: status={response.status_code}")
        self.stats.deletes += 1

    async def stat(self, key: str) -> StoredObject:
        """Size, digest and metadata of `key` (from a HEAD); KeyError if there is none."""
        url = self.url(key)
        response = await self._request("HEAD", url)
        if response.status_code == 404:
            raise KeyError(key)
        if response.status_code != 200:
            raise StoreError(f"HEAD {url}: status={response.status_code}")
        digest = parse_digest_header(response.headers.get("repr-digest")).get("sha-256", b"")
        try:
            meta = json.loads(response.headers.get(METADATA_HEADER.lower(), "{}"))
        except ValueError:
            meta = {}
        return StoredObject(key=key, bytes=int(response.headers.get("content-length", 0)),
                            sha256=digest.hex(), metadata=meta,
                            stored_utc=response.headers.get("edge-stored-utc", ""))

    async def metadata(self, key: str) -> dict[str, Any]:
        """The metadata stored with `key`; KeyError if there is none."""
        return (await self.stat(key)).metadata


def _hash_from_here(f: IO[bytes]) -> tuple[int, int, str]:
    """(position, bytes to the end, sha256 hex) of a seekable file from where it is."""
    origin = f.tell()
    digest = hashlib.sha256()
    size = 0
    while chunk := f.read(CHUNK_BYTES):
        digest.update(chunk)
        size += len(chunk)
    return origin, size, digest.hexdigest()


async def _file_body(runner: ThreadRunner, f: IO[bytes], origin: int, size: int
                     ) -> AsyncIterator[bytes]:
    """`size` bytes of `f` from `origin`, read in a worker thread chunk by chunk."""
    await runner.run(f.seek, origin)
    sent = 0
    while sent < size:
        chunk: bytes = await runner.run(f.read, min(CHUNK_BYTES, size - sent))
        if not chunk:
            raise OSError(f"upload body shrank at byte {sent} of {size}")
        sent += len(chunk)
        yield chunk
