"""Rendering and streaming a response body: PCM blocks in, encoded bytes out to a
client that may stall or go away.

`Renderer` converts planned PCM to the requested format, rate and channels
through `edge_agent.audio.encoders.make_encoder` (synchronous; one worker
thread feeds it at a time). `StreamResponse` is an ASGI response whose body a
producer makes in a task of its own, handing chunks to a `Sink`: a client that
takes nothing for ``stall`` seconds is dropped, and the producer's scarce
resource (an encode slot, a file) is released at once, even while the server's
write to the socket is still stuck. A producer that cannot complete its body
raises `Abort`: the response is cut off (the client sees an incomplete body,
never silently wrong audio).

Imports only the bottom layer (audio); never agent, another stage, metrics or
systemd.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import trio
from numpy.typing import NDArray
from starlette.types import Message, Receive, Scope, Send

from ..audio.encoders import make_encoder
from ..audio.pcm import SampleFormat, mix_down
from ..audio.resample import StreamResampler

__all__ = ["Abort", "Producer", "Renderer", "Sink", "StreamResponse"]

log = logging.getLogger(__package__)  # one logger for the whole API


class Renderer:
    """Converts the planned timeline to the requested format, rate and channels.

    Emits exactly ``frames_out`` frames for every format (what the headers
    promised), trimming the resampler's rounding or padding the end with silence.
    WAV declares its sizes up front (the body streams with a Content-Length).
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
        self._encoder = make_encoder(fmt, out_rate, channels, SampleFormat.INT16,
                                     bitrate=bitrate, application="audio", comments=comments,
                                     wav_data_bytes=frames_out * channels * 2)

    @property
    def content_length(self) -> int | None:
        data = self.frames_out * self.channels * 2
        return {"pcm": data, "wav": 44 + data}.get(self.fmt)

    def start(self) -> bytes:
        return self._encoder.start()

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
        return self._encoder.write(x)

    def finish(self) -> bytes:
        out = b""
        if self._resampler is not None:
            out += self._emit(self._resampler.flush())
        if self._left > 0:
            out += self._emit(np.zeros((self._left, self.channels), dtype=np.float32))
        tail, _patches = self._encoder.finish()  # sizes were declared up front: no patches
        out += tail
        self.close()
        return out

    def close(self) -> None:
        self._encoder.close()


class Abort(Exception):
    """The body cannot be completed; the response is cut off (logged)."""


class Sink:
    """Where a producer puts body chunks; a client that takes nothing for
    ``stall`` seconds ends the producer (`trio.TooSlowError`)."""

    def __init__(self, channel: trio.MemorySendChannel[bytes], stall: float) -> None:
        self._channel = channel
        self._stall = stall

    async def send(self, data: bytes) -> None:
        if data:
            with trio.fail_after(self._stall):
                await self._channel.send(data)


Producer = Callable[[Sink], Awaitable[None]]


class StreamResponse:
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
                await self.producer(Sink(channel, self.stall))
                # Complete before the channel closes: the consumer cancels this task as
                # soon as it sees the end, which may be at the close's checkpoint.
                self._complete = True
        except trio.TooSlowError:
            log.warning("api client took no data for %g s, dropped what=%s", self.stall,
                        self.what)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Abort as exc:
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
