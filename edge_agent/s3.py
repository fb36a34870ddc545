"""S3-compatible object storage: credentials, request signing, and each object
written exactly once.

`Bucket.put_once` stores an object under a key that must never be overwritten:
a ``PUT`` with ``If-None-Match: *`` (S3 conditional writes) and the body's
SHA-256 in ``x-amz-checksum-sha256``, which the store checks. 200 is stored. 412
says an object is already there: a ``HEAD`` tells whether it is ours (a lost
acknowledgement: success) or another one (a conflict: quarantine, with both
digests). Everything else is retried, never quarantined: `BadDigest` is a body
damaged on the way; a refused signature, an unknown access key, a denied prefix
or a missing bucket is a setting a person must fix, and the `Decision` names it.

Requests are signed with AWS Signature Version 4 by the AWS Common Runtime
(`awscrt`: AWS's own C signer, also behind the AWS CLI) through `SigV4`, an
httpx auth class, so they go through the uploader's own httpx client: one
mechanism for retries, timeouts, the bandwidth cap and health. botocore's signer
was the other candidate; here it cost 31 MB installed (28 MB of it API models
the signer never reads) and 270 ms and 11 MB to import, against 12 MB, 80 ms and
5 MB for awscrt, and it signs at the system's time, where awscrt takes the
signing time as a parameter, which the clock correction below needs.

SigV4 refuses a request signed more than 15 minutes off the store's clock
(``RequestTimeTooSkewed``), and a Pi without a real-time clock boots with a
wrong one. As the AWS SDKs do, `SigV4` takes the store's time from the ``Date``
header of its answers whenever it is five minutes or more from the corrected
device time, and signs with the device's time plus that offset; a request
refused for skew is sent again at once.

Imports only the bottom layer (``config``, ``clock``, ``wire``); the uploader
stage uses it.
"""

from __future__ import annotations

import base64
import configparser
import hashlib
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable, Generator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Final

import httpx
from awscrt import auth as crt_auth
from awscrt import http as crt_http

from .clock import Clock, parse_iso_utc
from .config import ConfigError, S3Config, read_secret_text
from .wire import Decision, Verdict, parse_retry_after

__all__ = [
    "Bucket",
    "Credentials",
    "Fetched",
    "Listed",
    "ObjectClient",
    "S3Error",
    "SigV4",
    "checksum",
    "error_code",
    "object_url",
    "read_credentials",
]

log = logging.getLogger(__name__)

#: The store's clock is believed over the device's from this difference on (seconds).
SKEW_TOLERANCE: Final = 300.0
EMPTY_SHA256: Final = hashlib.sha256(b"").hexdigest()
# Of an error answer's body, what is read to find its <Code>.
ERROR_BODY_BYTES: Final = 4096
CREDENTIALS_KEY: Final = "upload.s3.credentials_file"


# ----------------------------------------------------------------------------
# Credentials


@dataclass(frozen=True)
class Credentials:
    """One identity's keys; the secrets never appear in a repr or a log."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)


def read_credentials(path: str | os.PathLike[str], profile: str = "default",
                     key: str = CREDENTIALS_KEY) -> Credentials:
    """The keys of ``[profile]`` in an AWS shared-credentials file
    (``aws_access_key_id``, ``aws_secret_access_key``, optional
    ``aws_session_token``), or `ConfigError` in one line naming `key` and the file."""
    text = read_secret_text(path, key)
    where = f"{key}: {path}"
    parser = configparser.ConfigParser(interpolation=None, default_section="\0")
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError([f"{where}: not an AWS credentials file ({first})"]) from None
    if not parser.has_section(profile):
        found = ", ".join(f"[{name}]" for name in parser.sections()) or "none"
        raise ConfigError([f"{where}: expected a [{profile}] section (upload.s3.profile), "
                           f"found {found}"])
    section = parser[profile]
    values = {}
    for name in ("aws_access_key_id", "aws_secret_access_key"):
        value = section.get(name, "").strip()
        if not value or any(ch.isspace() for ch in value):
            raise ConfigError([f"{where}: expected {name} = ... under [{profile}]"])
        values[name] = value
    return Credentials(values["aws_access_key_id"], values["aws_secret_access_key"],
                       section.get("aws_session_token", "").strip() or None)


# ----------------------------------------------------------------------------
# Signing


# The headers the signer writes itself (a request signed again still has them).
_SIGNER_HEADERS: Final = frozenset({"authorization", "x-amz-date", "x-amz-security-token",
                                    "x-amz-content-sha256"})


def _signed_header(name: str) -> bool:
    # What a proxy may rewrite (Connection, Accept-Encoding, User-Agent) stays out of
    # the signature; what S3 requires signed (Host, every x-amz-*) and what says what
    # the body is or when to refuse it is in.
    name = name.lower()
    return name not in _SIGNER_HEADERS and (
        name in ("host", "content-type", "content-md5") or name.startswith(("if-", "x-amz-")))


class SigV4(httpx.Auth):
    """Signs every request with AWS Signature Version 4 (awscrt) at the device's
    time plus `offset`, and learns `offset` from the store's ``Date`` headers.

    The body is never read: its SHA-256 (hex) comes in the ``x-amz-content-sha256``
    header the caller sets (a request without one carries no body).

    Args:
        credentials: the keys to sign with (`credentials` may be replaced later).
        region: the region signed for.
        clock: the device's wall clock.
    """

    def __init__(self, credentials: Credentials, region: str, clock: Clock) -> None:
        self.credentials = credentials
        self.region = region
        self.clock = clock
        self.offset = 0.0  # seconds added to the device's clock when signing

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        self.sign(request)
        response = yield request
        self.observe(response.headers.get("date"))

    def sign(self, request: httpx.Request) -> None:
        """Add ``Authorization``, ``X-Amz-Date`` and the session token to `request`."""
        creds = self.credentials
        body = request.headers.get("x-amz-content-sha256", EMPTY_SHA256)
        config = crt_auth.AwsSigningConfig(
            algorithm=crt_auth.AwsSigningAlgorithm.V4,
            signature_type=crt_auth.AwsSignatureType.HTTP_REQUEST_HEADERS,
            credentials_provider=crt_auth.AwsCredentialsProvider.new_static(
                creds.access_key_id, creds.secret_access_key, creds.session_token),
            region=self.region, service="s3",
            date=datetime.fromtimestamp(self.clock.utc() + self.offset, tz=UTC),
            # S3 signs the path as sent: neither encoded twice nor normalised.
            use_double_uri_encode=False, should_normalize_uri_path=False,
            signed_body_value=body,
            signed_body_header_type=crt_auth.AwsSignedBodyHeaderType.X_AMZ_CONTENT_SHA_256)
        headers = crt_http.HttpHeaders([(k, v) for k, v in request.headers.multi_items()
                                        if _signed_header(k)])
        signable = crt_http.HttpRequest(request.method, request.url.raw_path.decode("ascii"),
                                        headers)
        # With static credentials awscrt signs in the calling thread: done on return.
        signed = crt_auth.aws_sign_request(signable, config).result(timeout=10)
        for name, value in signed.headers:
            if name.lower() in _SIGNER_HEADERS:
                request.headers[name] = value

    def observe(self, date_header: str | None) -> bool:
        """Take the store's time from a ``Date`` header when it is `SKEW_TOLERANCE`
        or more away from the corrected device time; True when `offset` changed."""
        if not date_header:
            return False
        try:
            server = parsedate_to_datetime(date_header).timestamp()
        except (TypeError, ValueError, IndexError):
            return False
        device = self.clock.utc()
        if abs(server - (device + self.offset)) < SKEW_TOLERANCE:
            return False
        was, self.offset = self.offset, round(server - device)
        log.warning("s3 clock corrected from the store's Date offset_seconds=%d was=%d "
                    "device_clock=%s", self.offset, was,
                    "behind" if self.offset > 0 else "ahead")
        return True


# ----------------------------------------------------------------------------
# Answers


def object_url(config: S3Config, key: str) -> str:
    """The URL of `key` in the configured bucket (path- or virtual-hosted style)."""
    base = config.endpoint.rstrip("/") or f"https://s3.{config.region}.amazonaws.com"
    if config.addressing == "virtual":
        scheme, _, host = base.partition("://")
        return f"{scheme}://{config.bucket}.{host}/{key}"
    return f"{base}/{config.bucket}/{key}"


def error_code(body: bytes) -> tuple[str, str]:
    """The ``<Code>`` and ``<Message>`` of an S3 error answer ("" when absent)."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return "", ""
    return (root.findtext("Code") or "").strip(), (root.findtext("Message") or "").strip()


def checksum(sha256_hex: str) -> str:
    """The value of ``x-amz-checksum-sha256``: the digest in base64."""
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode("ascii")


# What a person must fix, by error code: the setting to check, and what to say
# (naming that setting, and the key inside it where one is to blame).
_CREDS = f"check aws_{{}} in {CREDENTIALS_KEY}"
_SETTINGS: Final = {
    "SignatureDoesNotMatch": (CREDENTIALS_KEY, "the store refuses the signature: the secret key "
                              "does not belong to access key {ak}; "
                              + _CREDS.format("secret_access_key")),
    "InvalidAccessKeyId": (CREDENTIALS_KEY, "the store knows no access key {ak}; "
                           + _CREDS.format("access_key_id")),
    "InvalidToken": (CREDENTIALS_KEY, "the session token is not valid; "
                     + _CREDS.format("session_token")),
    "ExpiredToken": (CREDENTIALS_KEY, "the session token has expired; "
                     + _CREDS.format("session_token")),
    "AccessDenied": ("upload.s3.bucket", "access denied writing {key} to bucket {bucket}; "
                     "check upload.s3.bucket (does it exist?), upload.s3.key_template (the "
                     "device's prefix) and that the policy of {ak} allows s3:PutObject and "
                     "s3:GetObject there"),
    "NoSuchBucket": ("upload.s3.bucket", "the store has no bucket {bucket}; "
                     "check upload.s3.bucket"),
    "InvalidBucketName": ("upload.s3.bucket", "the store refuses the bucket name {bucket}; "
                          "check upload.s3.bucket"),
    "AuthorizationHeaderMalformed": ("upload.s3.region", "the store is not in region "
                                     "{region}; check upload.s3.region"),
    "PermanentRedirect": ("upload.s3.endpoint", "bucket {bucket} is served elsewhere; check "
                          "upload.s3.endpoint and upload.s3.region"),
    "NotImplemented": ("upload.s3.endpoint", "the store does not support conditional writes "
                       "(If-None-Match), which exactly-once uploads need; check "
                       "upload.s3.endpoint"),
}
# Answers about the body as it arrived, not about the segment (BadDigest: damaged on
# the way), or about a moment (NoSuchKey: the object a 412 announced was deleted
# before the HEAD): send it again.
_TRANSIENT: Final = frozenset({"BadDigest", "XAmzContentSHA256Mismatch", "IncompleteBody",
                               "RequestTimeout", "NoSuchKey", "SlowDown"})


# ----------------------------------------------------------------------------
# Writing once


Body = Callable[[], AsyncIterator[bytes]] | bytes
Metadata = Mapping[str, str] | Callable[[], Mapping[str, str]]


class Bucket:
    """The configured bucket, written through `client` with `auth`.

    Args:
        config: the ``[upload.s3]`` section.
        auth: the signer (it holds the credentials and the clock offset).
        clock: the device's wall clock, for ``Retry-After`` dates.
    """

    def __init__(self, config: S3Config, auth: SigV4, clock: Clock) -> None:
        self.config = config
        self.auth = auth
        self.clock = clock
        self.last_status: int | None = None  # of the last answer, for status

    async def put_once(self, client: httpx.AsyncClient, key: str, body: Body, size: int,
                       sha256_hex: str, content_type: str, metadata: Metadata, *,
                       identity: str | None = None) -> Decision:
        """Store `body` under `key` unless an object is there already.

        `metadata` becomes the ``x-amz-meta-*`` headers (a callable is asked again
        when the request is sent again). `identity` (hex SHA-256) is what makes an
        object at `key` ours when a 412 says one exists: by default the body's own
        digest, compared with the store's checksum of the object (or its
        ``x-amz-meta-sha256``); a sidecar passes the digest of the audio it
        describes, compared with the metadata.
        """
        url = object_url(self.config, key)
        for _ in range(2):  # a second time at once when the clock was corrected
            offset = self.auth.offset
            headers = {
                "Content-Type": content_type,
                "Content-Length": str(size),
                "If-None-Match": "*",
                "x-amz-content-sha256": sha256_hex,
                "x-amz-checksum-sha256": checksum(sha256_hex),
                "x-amz-meta-sha256": identity or sha256_hex,
                **{f"x-amz-meta-{name}": value for name, value in (
                    metadata() if callable(metadata) else metadata).items()},
            }
            content = body if isinstance(body, bytes) else body()
            async with client.stream("PUT", url, content=content, headers=headers,
                                     auth=self.auth) as response:
                self.last_status = response.status_code
                excerpt = b""
                if response.status_code != 200:
                    async for part in response.aiter_bytes():
                        excerpt += part
                        if len(excerpt) >= ERROR_BODY_BYTES:
                            break
            code, message = error_code(excerpt[:ERROR_BODY_BYTES])
            if code != "RequestTimeTooSkewed" or self.auth.offset == offset:
                break
        if response.status_code == 200:
            return Decision(Verdict.SYNCED)
        if response.status_code == 412:
            return await self._judge_existing(client, key, url, identity or sha256_hex,
                                              exact=identity is None)
        return self._refused(response, code, message, key)

    async def _judge_existing(self, client: httpx.AsyncClient, key: str, url: str,
                              ours: str, *, exact: bool) -> Decision:
        """Whether the object at `key` (a 412 said there is one) is ours."""
        response = await client.head(url, auth=self.auth,
                                      headers={"x-amz-checksum-mode": "ENABLED"})
        self.last_status = response.status_code
        if response.status_code != 200:
            # A HEAD answer has no body: the status says what the code would.
            code = {403: "AccessDenied", 404: "NoSuchKey"}.get(response.status_code, "")
            if code == "AccessDenied":
                return Decision(Verdict.RETRY, f"status=403 AccessDenied reading back {key} "
                                "after a 412 to compare it; check that the policy of "
                                f"{self.auth.credentials.access_key_id} allows s3:GetObject "
                                "on the device's prefix (upload.s3.key_template)",
                                setting="upload.s3.key_template")
            return self._refused(response, code, "", key)
        stored = response.headers.get("x-amz-checksum-sha256")
        theirs = None
        if exact and stored:
            try:
                theirs = base64.b64decode(stored, validate=True).hex()
            except ValueError:
                theirs = None
        if theirs is None:
            theirs = response.headers.get("x-amz-meta-sha256", "").strip().lower() or None
        if theirs == ours.lower():
            return Decision(Verdict.ALREADY)
        if theirs is None:
            return Decision(Verdict.QUARANTINE, f"status=412 bucket {self.config.bucket} holds "
                                                f"another object under {key}, with no sha256 "
                                                "to compare (not written by an edge-agent)")
        return Decision(Verdict.QUARANTINE,
                        f"status=412 bucket {self.config.bucket} holds a different object "
                        f"under {key} (its sha256={theirs}, ours={ours})")

    def _refused(self, response: httpx.Response, code: str, message: str, key: str
                 ) -> Decision:
        """A failed request: always retried; a setting to check named where one is to blame."""
        status = response.status_code
        retry_after = parse_retry_after(response.headers.get("retry-after"), self.clock.utc())
        what = f"status={status}" + (f" {code}" if code else "")
        if code == "RequestTimeTooSkewed":
            return Decision(Verdict.RETRY, f"{what}: the store's clock and the device's differ "
                            f"by more than 15 minutes (offset {self.auth.offset:+.0f} s)",
                            retry_after)
        if code == "" and status == 404:
            code = "NoSuchBucket"  # a HEAD or a store that says no more than its status
        known = _SETTINGS.get(code)
        if known is not None:
            setting, text = known
            text = text.format(ak=self.auth.credentials.access_key_id, key=key,
                               bucket=self.config.bucket, region=self.config.region)
            return Decision(Verdict.RETRY, f"{what}: {text}", retry_after, setting=setting)
        if code in _TRANSIENT or status >= 500 or status in (408, 409, 429) or status < 400:
            detail = f": {message}" if message else ""
            return Decision(Verdict.RETRY, f"{what}{detail}", retry_after)
        # An answer we cannot place is about the request, not the segment.
        return Decision(Verdict.RETRY, f"{what}: {message or 'the store refused the request'}; "
                        "check the settings of upload.s3", retry_after, setting="upload.s3")


# ----------------------------------------------------------------------------
# Reading, overwriting and listing (the fleet's mailbox, heartbeats and results)


class S3Error(Exception):
    """A request the store refused or that could not be made sense of; the text is
    one line naming the status, the store's error code and what to check."""

    def __init__(self, text: str, status: int = 0, code: str = "") -> None:
        super().__init__(text)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class Fetched:
    """A GET's answer: 200 with `body`, 304 (unchanged since `etag`) or 404."""

    status: int
    body: bytes = b""
    etag: str | None = None
    last_modified: float | None = None  # the store's clock (seconds since the epoch)


@dataclass(frozen=True)
class Listed:
    """One object of a listing."""

    key: str
    size: int
    etag: str
    last_modified: float


_S3_NS: Final = "{http://s3.amazonaws.com/doc/2006-03-01/}"
#: Keys asked for per ListObjectsV2 page (S3's own maximum).
LIST_PAGE: Final = 1000


def _http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


class ObjectClient:
    """Reads, conditional writes and listings in the bucket of `config`, for small
    objects (the whole body in memory, at most `max_bytes`).

    Args:
        config: the bucket's settings (``[upload.s3]``, or the operator's fleet.toml).
        auth: the signer.
        client: the httpx client the requests go through.
        max_bytes: the largest body read from a GET (a larger object is an error).
    """

    def __init__(self, config: S3Config, auth: SigV4, client: httpx.AsyncClient,
                 max_bytes: int = 16 * 1024 * 1024) -> None:
        self.config = config
        self.auth = auth
        self.client = client
        self.max_bytes = max_bytes
        self.requests = 0  # made so far (each GET, PUT and listing page counts one)

    async def _send(self, method: str, url: str, *, content: bytes = b"",
                    headers: Mapping[str, str] | None = None,
                    params: Mapping[str, str] | None = None) -> tuple[httpx.Response, bytes]:
        """One request, sent again at once if the store corrected our clock; the
        answer's body read up to `max_bytes` (an error answer's up to a few kB)."""
        for _ in range(2):
            offset = self.auth.offset
            hdrs = {"x-amz-content-sha256": hashlib.sha256(content).hexdigest(),
                    **(headers or {})}
            self.requests += 1
            async with self.client.stream(method, url, content=content or None,
                                          headers=hdrs, params=params,
                                          auth=self.auth) as response:
                limit = self.max_bytes if response.status_code < 300 else ERROR_BODY_BYTES
                body = b""
                async for part in response.aiter_bytes():
                    body += part
                    if len(body) > limit:
                        if response.status_code < 300:
                            raise S3Error(f"{method} {url}: the object is larger than "
                                          f"{limit} bytes", response.status_code)
                        break
            if response.status_code < 400 or self.auth.offset == offset:
                break
            if error_code(body)[0] != "RequestTimeTooSkewed":
                break
        return response, body

    def _error(self, method: str, key: str, response: httpx.Response, body: bytes) -> S3Error:
        code, message = error_code(body[:ERROR_BODY_BYTES])
        if not code:
            code = {403: "AccessDenied", 404: "NoSuchBucket"}.get(response.status_code, "")
        known = _SETTINGS.get(code)
        if known is not None:
            text = known[1].format(ak=self.auth.credentials.access_key_id, key=key,
                                   bucket=self.config.bucket, region=self.config.region)
            if code == "AccessDenied":
                text = (f"access denied: {method} {key} in bucket {self.config.bucket} as "
                        f"{self.auth.credentials.access_key_id}; check the bucket and that "
                        "key's policy")
        else:
            text = message or "the store refused the request"
        what = f"status={response.status_code}" + (f" {code}" if code else "")
        return S3Error(f"{method} {key}: {what}: {text}", response.status_code, code)

    async def get(self, key: str, *, etag: str | None = None) -> Fetched:
        """The object at `key`; with `etag`, a 304 when it is still that one. A
        missing object is a 404 `Fetched`, not an error."""
        headers = {"If-None-Match": etag} if etag else {}
        response, body = await self._send("GET", object_url(self.config, key),
                                          headers=headers)
        status = response.status_code
        if status == 404 and error_code(body)[0] in ("NoSuchKey", ""):
            return Fetched(404)
        if status in (200, 304):
            return Fetched(status, body if status == 200 else b"",
                           response.headers.get("etag"),
                           _http_date(response.headers.get("last-modified")))
        raise self._error("GET", key, response, body)

    async def put(self, key: str, body: bytes, content_type: str, *,
                  if_match: str | None = None, if_none_match: bool = False,
                  metadata: Mapping[str, str] | None = None) -> str | None:
        """Write `body` to `key` (with its SHA-256 checked by the store); the new
        ETag, or None when a condition failed (412: `if_match` is no longer the
        object's ETag, or `if_none_match` and an object is there)."""
        digest = hashlib.sha256(body).hexdigest()
        headers = {"Content-Type": content_type, "x-amz-checksum-sha256": checksum(digest),
                   **{f"x-amz-meta-{k}": v for k, v in (metadata or {}).items()}}
        if if_match is not None:
            headers["If-Match"] = if_match
        if if_none_match:
            headers["If-None-Match"] = "*"
        response, answer = await self._send("PUT", object_url(self.config, key),
                                            content=body, headers=headers)
        if response.status_code == 200:
            return response.headers.get("etag") or ""
        if response.status_code == 412:
            return None
        raise self._error("PUT", key, response, answer)

    async def list(self, prefix: str, *, start_after: str = "",
                   limit: int = 100_000) -> AsyncIterator[Listed]:
        """The objects under `prefix` in key order, after `start_after`, at most
        `limit` of them (ListObjectsV2, a page of `LIST_PAGE` per request)."""
        url = object_url(self.config, "").rstrip("/")
        if self.config.addressing == "virtual":
            url += "/"
        token = ""
        left = limit
        while left > 0:
            params = {"list-type": "2", "prefix": prefix,
                      "max-keys": str(min(LIST_PAGE, left))}
            if token:
                params["continuation-token"] = token
            elif start_after:
                params["start-after"] = start_after
            response, body = await self._send("GET", url, params=params)
            if response.status_code != 200:
                raise self._error("LIST", prefix or "/", response, body)
            try:
                root = ET.fromstring(body)
            except ET.ParseError as exc:
                raise S3Error(f"LIST {prefix}: the store's answer is not XML ({exc})",
                              response.status_code) from None
            for item in root.iter(f"{_S3_NS}Contents"):
                left -= 1
                yield Listed(item.findtext(f"{_S3_NS}Key") or "",
                             int(item.findtext(f"{_S3_NS}Size") or 0),
                             item.findtext(f"{_S3_NS}ETag") or "",
                             parse_iso_utc(item.findtext(f"{_S3_NS}LastModified") or
                                           "1970-01-01T00:00:00Z"))
            token = root.findtext(f"{_S3_NS}NextContinuationToken") or ""
            if root.findtext(f"{_S3_NS}IsTruncated") != "true" or not token:
                return
