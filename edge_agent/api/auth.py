"""Who may use the device API: the bearer token and the check of each request.

Every route but ``/healthz`` and the device page (`PUBLIC_PATHS`: static files,
no data) wants ``Authorization: Bearer <token>``, compared with
`hmac.compare_digest`; the media routes (`MEDIA_PATHS`) also take a signed URL
(`signing`) or ``?access_token=``. The token comes from ``api.token_file`` (read with
`config.read_secret`); without one (allowed on loopback only) a random token is
kept in ``<data_dir>/api-token`` (mode 0600).

Imports only the bottom layer (config, fs); never agent, another stage, metrics
or systemd.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
from pathlib import Path
from typing import Final

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import Scope

from ..config import ApiConfig, ConfigError, check_api_config, is_loopback, read_secret
from ..fs import write_atomic
from .params import MEDIA_PATHS, ApiError
from .signing import MediaSigner

__all__ = ["PUBLIC_PATHS", "TOKEN_FILE_NAME", "check_bearer", "load_token"]

log = logging.getLogger(__package__)  # one logger for the whole API

#: Where the generated token is kept, below the data directory.
TOKEN_FILE_NAME: Final = "api-token"
_TOKEN_RE: Final = re.compile(r"[A-Za-z0-9._~+/=-]{16,512}")
_TOKEN_EXPECTED: Final = "one token of 16 to 512 letters, digits or ._~+/=- on one line"
_AUTH_REALM: Final = 'Bearer realm="edge-agent"'
#: Paths anyone may fetch: health, and the device page with its static files (the
#: page asks for the token itself; it holds no data).
PUBLIC_PATHS: Final = frozenset({"/healthz", "/", "/ui/page.js", "/ui/page.css"})


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
            write_atomic(path, secrets.token_urlsafe(32) + "\n", mode=0o600, replace=False)
            log.info("api token created path=%s", path)
        except FileExistsError:
            pass  # another process created it first: that token is the one
        except OSError as exc:
            raise ConfigError([f"api: cannot create the token file {path} "
                               f"({exc.strerror})"]) from None
    return read_secret(path, "", pattern=_TOKEN_RE, expected=_TOKEN_EXPECTED)


def check_bearer(scope: Scope, expected: str, signer: MediaSigner | None = None
                 ) -> ApiError | None:
    """None when the request may pass (a public path, the right token, or a media
    route's valid signed URL); else the 401 to answer it with."""
    path = scope["path"]
    if path in PUBLIC_PATHS:
        return None
    headers = Headers(scope=scope)
    token: str | None = None
    auth = headers.get("authorization")
    if auth is not None:
        scheme, _, credentials = auth.partition(" ")
        if scheme.lower() == "bearer":
            token = credentials.strip()
    elif path in MEDIA_PATHS:
        params = Request(scope).query_params.multi_items()
        if signer is not None and any(k == "sig" for k, _ in params):
            problem = signer.check(path, params)
            if problem is None:
                return None
            return ApiError(401, problem, "sig", headers={
                "WWW-Authenticate": f'{_AUTH_REALM}, error="invalid_token"'})
        query = [v for k, v in params if k == "access_token"]
        token = query[0] if len(query) == 1 else None
    if token is not None and hmac.compare_digest(
            token.encode("utf-8", "replace"), expected.encode("utf-8")):
        return None
    if token is None:
        return ApiError(401, "missing bearer token (Authorization: Bearer <token>)",
                        "Authorization", headers={"WWW-Authenticate": _AUTH_REALM})
    return ApiError(401, "invalid bearer token", "Authorization", headers={
        "WWW-Authenticate": f'{_AUTH_REALM}, error="invalid_token"'})
