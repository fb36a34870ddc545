"""Live STT chunks (the `openai`, `deepgram` and `raw` protocols) at the
reference backend.

Three routes take one chunk each, a complete Ogg Opus file:

* ``POST /v1/audio/transcriptions`` openai: multipart ``file`` + ``model``,
  ``language``, ``prompt``, ``response_format`` (json or text)
* ``POST /v1/listen`` deepgram: the file as the body (``audio/*``),
  ``Authorization: Token <key>``, ``?model=&language=``
* ``POST /v1/stt/raw`` raw: the file as the body (``audio/ogg``) with the headers
  of `wire.RAW_HEADERS`; 204 for no speech

The audio is decoded with libopusfile and, when pocketsphinx is installed (the
`asr` extra; its wheel ships an English model), recognised in a worker thread;
without it the answer is the decoded duration. `SttReceiver.records` keeps what
arrived (bounded) for tests. Faults (see `reference.hooks`): the common ones
(delay, 503 with Retry-After) plus ``stt_garbage``: the next N answers are 200
with malformed JSON.

Imports only the bottom layer (`audio`, `blocking`, `wire`); never agent or a stage.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..audio.opus import OpusError, decode_ogg_opus
from ..audio.pcm import SampleFormat, from_float32, mix_down
from ..audio.resample import StreamResampler
from ..blocking import ThreadRunner
from ..wire import DEVICE_ID_PATTERN
from .hooks import FaultSource, common_faults

__all__ = ["MAX_STT_CHUNK_BYTES", "SttChunkRecord", "SttReceiver", "stt_routes", "word_accuracy"]

log = logging.getLogger(__name__)

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
        runner: where recognition runs; its limit must stay 1 (one decoder, used
            by one thread at a time).
    """

    def __init__(self, *, recognise: bool = True, token: str | None = None,
                 max_records: int = 1000, runner: ThreadRunner | None = None) -> None:
        self.token = token
        self.records: deque[SttChunkRecord] = deque(maxlen=max_records)
        self.received = 0
        self.rejected = 0
        self.recognise = recognise and importlib.util.find_spec("pocketsphinx") is not None
        self._runner = runner or ThreadRunner(1)  # one decoder, one thread at a time
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
        """`transcribe` in a worker thread."""
        return await self._runner.run(self.transcribe, ogg)


def word_accuracy(script: Sequence[str], heard: Sequence[str]) -> float:
    """How well `heard` words match the `script`: 1 - word error rate, the word-level
    edit distance (substitutions, insertions, deletions) over the script's length."""
    row = list(range(len(heard) + 1))
    for i, word in enumerate(script, 1):
        diagonal, row[0] = row[0], i
        for j, h in enumerate(heard, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (word != h))
    return 1.0 - row[-1] / len(script)


def _stt_error(status: int, message: str, protocol: str) -> Response:
    if protocol == "openai":  # the shape OpenAI's clients parse
        body: dict[str, Any] = {"error": {"message": message, "type": "invalid_request_error"}}
    else:
        body = {"error": message}
    return JSONResponse(body, status_code=status)


def stt_routes(stt: SttReceiver, faults: FaultSource) -> list[Route]:
    """The three STT routes, sharing `stt`; `faults()` is read per request."""

    def check_auth(request: Request, scheme: str) -> bool:
        if stt.token is None:
            return True
        return request.headers.get("authorization", "") == f"{scheme} {stt.token}"

    async def receive(request: Request, protocol: str, scheme: str) -> Response | None:
        """Faults and checks every route shares; a response ends the request."""
        if (fault := await common_faults(faults())) is not None:
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
        hook = faults()
        if hook is not None and hook.take("stt_garbage"):
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
