"""Signed media URLs: how an ``<audio>`` element or an ``EventSource`` is let in.

Neither can send an ``Authorization`` header. The device page asks
``/v1/media-url`` (with its bearer token) for a URL of a media route that carries
``expires`` and ``sig`` instead: an HMAC-SHA256 of the path, every other query
parameter and the expiry, keyed by a key derived from the API token. Such a URL
is good for `URL_SECONDS` (checked when a request starts; a stream that started
in time runs on), names exactly the audio it was signed for, and holds no token:
nothing that reaches a log or the browser's history lets anyone in for longer.
A new token (reload) voids every URL signed with the old one.

Times are Trio's clock: a URL is good only in the process that signed it.
Imports nothing of the project.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable
from typing import Final
from urllib.parse import urlencode

import trio

__all__ = ["SIGNED_PARAMS", "URL_SECONDS", "MediaSigner"]

#: How long a signed URL may be used to start a request.
URL_SECONDS: Final = 120.0
#: The query parameters a signed URL adds.
SIGNED_PARAMS: Final = ("expires", "sig")


class MediaSigner:
    """Signs and checks media URLs with a key derived from the API token."""

    def __init__(self, token: str) -> None:
        self._key = hmac.new(token.encode(), b"edge-agent media url", hashlib.sha256).digest()

    def _signature(self, path: str, params: Iterable[tuple[str, str]]) -> str:
        canonical = f"{path}?{urlencode(sorted(params))}".encode()
        digest = hmac.new(self._key, canonical, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:24]).decode()

    def sign(self, path: str, params: list[tuple[str, str]]) -> tuple[str, float]:
        """A URL of ``path`` with ``params`` that needs no token; and for how many
        seconds it can be used."""
        expires = f"{trio.current_time() + URL_SECONDS:.0f}"
        signed = [*params, ("expires", expires)]
        sig = self._signature(path, signed)
        return f"{path}?{urlencode([*signed, ('sig', sig)])}", URL_SECONDS

    def check(self, path: str, params: list[tuple[str, str]]) -> str | None:
        """None when ``params`` hold a valid, unexpired signature for ``path``;
        otherwise what is wrong with it."""
        sigs = [v for k, v in params if k == "sig"]
        expires = [v for k, v in params if k == "expires"]
        if len(sigs) != 1 or len(expires) != 1:
            return "a signed URL holds one expires and one sig"
        rest = [(k, v) for k, v in params if k != "sig"]
        if not hmac.compare_digest(sigs[0].encode("utf-8", "replace"),
                                   self._signature(path, rest).encode()):
            return "invalid URL signature"
        try:
            deadline = float(expires[0])
        except ValueError:
            return "invalid URL signature"
        if trio.current_time() > deadline:
            return "this signed URL has expired; ask /v1/media-url for a new one"
        return None
