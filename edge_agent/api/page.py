"""The device page: ``GET /`` for the installer on site, and the signed media URLs it uses.

One static page (HTML, CSS, JavaScript in ``api/page/``, shipped in the package:
no build step, nothing fetched from the internet, so it works on a site with no
uplink). The page and its two files are public (`auth.PUBLIC_PATHS`): they hold
no data. The page asks for the token once, keeps it for the browser session
only, and sends it as a bearer header; for ``<audio>`` and ``EventSource``, which
cannot send headers, it asks ``/v1/media-url`` for a signed URL (`signing`).

Imports only the bottom layer and the API's own modules; never agent, another
stage, metrics or systemd.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Final
from urllib.parse import parse_qsl, urlsplit

from starlette.requests import Request
from starlette.responses import Response

from .counters import ApiStats
from .params import MEDIA_PATHS, ApiError, json_response, query_params, show
from .signing import SIGNED_PARAMS, MediaSigner

__all__ = ["PAGE_FILES", "DevicePage"]

#: Served path -> (file in ``api/page/``, content type).
PAGE_FILES: Final = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/ui/page.css": ("page.css", "text/css; charset=utf-8"),
}
# The page runs only its own script and style, and talks only to this device.
_SECURITY_HEADERS: Final = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; media-src 'self'; img-src 'self' data:; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@functools.cache
def _read(name: str) -> bytes:
    return (resources.files(__package__) / "page" / name).read_bytes()


class DevicePage:
    """The page's routes. `signer` is replaced when the token changes (reload)."""

    def __init__(self, signer: MediaSigner, stats: ApiStats) -> None:
        self.signer = signer
        self.stats = stats

    async def file(self, request: Request) -> Response:
        query_params(request, ())
        name, content_type = PAGE_FILES[request.url.path]
        return Response(_read(name), media_type=content_type, headers=_SECURITY_HEADERS)

    async def media_url(self, request: Request) -> Response:
        """``?path=/v1/audio?start=...``: that media URL, signed for a short while."""
        p = query_params(request, ("path",))
        target = p.get("path")
        if not target:
            raise ApiError(400, "path: expected a media route with its query, such as "
                                "/v1/live?seconds=60", "path")
        parts = urlsplit(target)
        if parts.scheme or parts.netloc or parts.path not in MEDIA_PATHS:
            raise ApiError(400, f"path {show(target)}: expected one of "
                                f"{', '.join(sorted(MEDIA_PATHS))} with its query", "path")
        params = parse_qsl(parts.query, keep_blank_values=True)
        taken = sorted({k for k, _ in params} & {"access_token", *SIGNED_PARAMS})
        if taken:
            raise ApiError(400, f"path: {taken[0]} is added by the signature, not given",
                           "path")
        url, seconds = self.signer.sign(parts.path, params)
        self.stats.media_urls += 1
        return json_response({"url": url, "expires_in": seconds},
                             headers={"Cache-Control": "no-store"})
