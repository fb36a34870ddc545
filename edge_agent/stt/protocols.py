"""The three STT wire protocols: what a chunk's request is, what its answer means.

* `openai`: multipart `file` (chunk.ogg, audio/ogg), `model`, `language`,
  `prompt`, `response_format=json`; reads `{"text": ...}`.
* `deepgram`: the Ogg file as the body, `Authorization: Token <key>`; reads
  `results.channels[0].alternatives[0].transcript`.
* `raw`: the Ogg file as the body (`audio/ogg; codecs=opus`) with the chunk's
  place on the timeline in headers (see `RAW_HEADERS`); reads `{"text": ...}`,
  204 means no speech.

Owns `encode_chunk` (a cut's PCM as one complete Ogg Opus file), `Wire` (builds
an `SttRequest` from a chunk and reads the transcript from a response) and the
three outcomes a response can be besides a transcript: `RetryLater`,
`Rejected`, `Malformed`. Synchronous: no Trio; the streamer sends the request.

Part of the `stt` stage. Imports only the bottom layer (`audio`, `clock`,
`config`, `wire`) and its sibling `backlog`; never agent, another stage,
metrics or api.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import httpx
import numpy as np
from numpy.typing import NDArray

from ..audio.encoders import encode_whole, make_encoder
from ..audio.pcm import SampleFormat
from ..clock import iso_utc
from ..config import SttConfig
from ..wire import CHUNK_FILENAME, RAW_CONTENT_TYPE, RAW_HEADERS, parse_retry_after
from .backlog import Chunk

__all__ = [
    "Malformed",
    "Rejected",
    "RetryLater",
    "SttRequest",
    "Wire",
    "encode_chunk",
]

APPLICATION: Final = "voip"  # libopus tuned for speech intelligibility
_RETRYABLE_STATUS: Final = frozenset({408, 425, 429})


def encode_chunk(pcm: NDArray[np.int16], rate: int, bitrate: int, complexity: int) -> bytes:
    """A cut's 16-bit mono PCM as one complete, independently decodable Ogg Opus
    file (blocking: call it from a worker thread)."""
    enc = make_encoder("opus", rate, 1, SampleFormat.INT16, bitrate=bitrate,
                       application=APPLICATION, comments={}, complexity=complexity)
    return encode_whole(enc, pcm)


class RetryLater(Exception):
    """A failure worth another try (5xx, 408, 425, 429), maybe with `Retry-After`."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class Rejected(Exception):
    """The endpoint refused the chunk for good (4xx other than 408/425/429)."""


class Malformed(Exception):
    """A 2xx answer that is not what the protocol promises."""


@dataclass(frozen=True, slots=True)
class SttRequest:
    """One POST: the arguments `httpx.AsyncClient.post` takes."""

    url: httpx.URL
    headers: dict[str, str]
    content: bytes | None = None
    data: dict[str, str] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None


def _excerpt(resp: httpx.Response) -> str:
    return resp.text[:200].replace("\n", " ")


def _check_status(resp: httpx.Response, now_utc: float) -> None:
    code = resp.status_code
    if 200 <= code < 300:
        return
    if code >= 500 or code in _RETRYABLE_STATUS:
        raise RetryLater(f"status={code}",
                         parse_retry_after(resp.headers.get("retry-after"), now_utc))
    raise Rejected(f"status={code} body={_excerpt(resp)!r}")


def _json_text(resp: httpx.Response, path: Callable[[Any], Any]) -> str:
    if resp.headers.get("content-type", "").split(";")[0].strip().lower() == "text/plain":
        return resp.text.strip()  # e.g. response_format=text
    try:
        doc = json.loads(resp.content)
        if isinstance(doc, dict) and "error" in doc and "text" not in doc:
            # whisper.cpp's server answers 200 {"error": ...} when it cannot decode.
            raise Rejected(f"status={resp.status_code} error={_excerpt(resp)!r}")
        text = path(doc)
    except (ValueError, LookupError, TypeError) as exc:
        raise Malformed(f"status={resp.status_code} unexpected answer "
                        f"({type(exc).__name__}) body={_excerpt(resp)!r}") from None
    if not isinstance(text, str):
        raise Malformed(f"status={resp.status_code} transcript is not a string "
                        f"body={_excerpt(resp)!r}")
    return text


class Wire:
    """How one protocol sends a chunk and reads the answer."""

    def __init__(self, cfg: SttConfig, token: str | None, device_id: str, stream_id: str) -> None:
        self.cfg = cfg
        self.token = token
        self.device_id = device_id
        self.stream_id = stream_id
        self.url = httpx.URL(cfg.url)

    def request(self, chunk: Chunk) -> SttRequest:
        """The POST that sends `chunk` in this protocol."""
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
            return SttRequest(self.url, headers, data=data, files=files)
        if cfg.protocol == "deepgram":
            headers["Content-Type"] = "audio/ogg"
            headers["Authorization"] = f"Token {self.token}"
            # Merged by hand: httpx's `params=` replaces a query the URL already has.
            params = {k: v for k, v in (("model", cfg.model), ("language", cfg.language))
                      if v and k not in self.url.params}
            return SttRequest(self.url.copy_merge_params(params), headers, content=chunk.ogg)
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
        return SttRequest(self.url, headers, content=chunk.ogg)

    def text(self, resp: httpx.Response, now_utc: float) -> str:
        """The transcript in a response; raises `RetryLater`, `Rejected` or `Malformed`."""
        _check_status(resp, now_utc)
        if resp.status_code == 204:
            return ""
        if self.cfg.protocol == "deepgram":
            return _json_text(
                resp, lambda d: d["results"]["channels"][0]["alternatives"][0]["transcript"])
        return _json_text(resp, lambda d: d["text"])
