"""The device/backend contract, without I/O.

What a device and its backend must agree on, in one place: the shapes of device
and segment ids, a segment's metadata (`SegmentMeta`, stored as ``meta.json`` and
sent with every upload), the idempotent-PUT headers and digests (RFC 9530),
`Retry-After`, what a response to an upload means (`judge_response`), the object
keys segments get in a bucket (`segment_key`), and the headers of the raw STT
protocol. The uploader, the STT streamer, the recorder's
stores and the reference backend all read it from here.

Imports nothing of the project: every layer may import it.
"""

from __future__ import annotations

import base64
import enum
import re
import secrets
import string
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import msgspec

__all__ = [
    "ALREADY_STATUS",
    "CHUNK_FILENAME",
    "DEFAULT_KEY_TEMPLATE",
    "DEVICE_ID_PATTERN",
    "KEY_FIELDS",
    "RAW_CONTENT_TYPE",
    "RAW_HEADERS",
    "RETRYABLE_STATUS",
    "SEGMENT_ID_PATTERN",
    "SUCCESS_STATUS",
    "URL_FIELDS",
    "ClockStepNote",
    "Decision",
    "GapNote",
    "SegmentMeta",
    "SegmentState",
    "Verdict",
    "agent_version",
    "check_key_template",
    "check_s3_target",
    "check_url_template",
    "content_digest",
    "idempotent_put_headers",
    "is_segment_id",
    "judge_response",
    "new_segment_id",
    "parse_digest_header",
    "parse_retry_after",
    "segment_key",
    "stored_sha256",
]

#: Device ids: letters, digits, ``.``, ``_`` and ``-``; safe in URLs, keys and file names.
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"

_META_VERSION: Final = 1


def agent_version() -> str:
    """The installed edge-agent's version, as a device reports it (``/v1/status``,
    the network announcement); "0.0.0" when run from a source tree never installed."""
    try:
        import importlib.metadata  # not at module level: `config check` must start fast

        return importlib.metadata.version("edge-agent")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


#: Segment ids: UTC start to the millisecond plus 8 random hex digits, e.g.
#: ``20261124T053000.000Z-3f9a1c2b``. Safe in URLs and file names; sorting them sorts
#: by start time, and the suffix keeps ids unique across clock steps and restarts.
SEGMENT_ID_PATTERN: Final = r"^[0-9]{8}T[0-9]{6}\.[0-9]{3}Z-[0-9a-f]{8}$"
_SEGMENT_ID_RE: Final = re.compile(SEGMENT_ID_PATTERN)


def is_segment_id(text: object) -> bool:
    """True when `text` is a whole segment id (fullmatch: "$" alone would accept a
    trailing newline)."""
    return isinstance(text, str) and _SEGMENT_ID_RE.fullmatch(text) is not None


def new_segment_id(start_ts: float) -> str:
    """A fresh id for a segment starting at ``start_ts`` (seconds since the epoch)."""
    ms = round(start_ts * 1000)
    secs, millis = divmod(ms, 1000)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(secs))
    return f"{stamp}.{millis:03d}Z-{secrets.token_hex(4)}"


# ----------------------------------------------------------------------------
# Segment metadata


class GapNote(msgspec.Struct, frozen=True, kw_only=True):
    """A hole in the audio: ``frame`` (into the segment) is the first frame after it."""

    frame: int
    seconds: float
    utc: str
    reason: str = "capture"  # "capture": the source delivered nothing; "overrun": the
    # segmenter fell behind the ring and those frames were gone before it read them.


class ClockStepNote(msgspec.Struct, frozen=True, kw_only=True):
    """The wall clock jumped by ``seconds`` at ``frame`` (into the segment)."""

    frame: int
    seconds: float
    synced: bool


class SegmentMeta(msgspec.Struct, frozen=True, kw_only=True):
    """One sealed segment; also the ``meta.json`` stored next to its audio.

    Times: ``start_ts``/``end_ts`` are seconds since the epoch (``start_utc``/
    ``end_utc`` the same in ISO 8601), ``end`` being the end of the last frame;
    ``mono_start``/``mono_end`` the same span on the monotonic clock of the boot
    that captured it. ``frames`` counts samples per channel at ``rate``.
    """

    id: str
    device: str
    start_utc: str
    end_utc: str
    start_ts: float
    end_ts: float
    mono_start: float
    mono_end: float
    frames: int
    rate: int
    channels: int
    format: str
    content_type: str
    bytes: int
    sha256: str
    clock_synced: bool
    gaps: list[GapNote] = []
    clock_steps: list[ClockStepNote] = []
    recovered: bool = False
    created_at: str = ""
    sealed_at: str = ""
    bitrate: int | None = None
    sample_format: str = "int16"
    # The storage key of a named recording (POST /v1/recordings); "" for segments.
    recording: str = ""
    version: int = _META_VERSION

    @property
    def seconds(self) -> float:
        """Duration of the audio held (gaps excluded)."""
        return self.frames / self.rate if self.rate else 0.0


class SegmentState(enum.StrEnum):
    """Where a segment is in its life."""

    SEALED = "sealed"  # durable, pending upload
    SYNCED = "synced"  # the backend has it; kept for local retrieval
    QUARANTINED = "quarantined"  # never uploaded; reason.txt says why


# ----------------------------------------------------------------------------
# Uploads: idempotent PUT and what its answer means


# 401/403 say nothing about the segment: an expired or revoked token would
# otherwise quarantine every new segment. Retry (health shows the error) until
# the operator fixes the token; the audio waits on disk.
RETRYABLE_STATUS = frozenset({401, 403, 408, 429})
SUCCESS_STATUS = frozenset({200, 201, 204})
ALREADY_STATUS = frozenset({409, 412})
URL_FIELDS = frozenset({"device", "segment"})


def content_digest(sha256_hex: str) -> str:
    """The RFC 9530 header value for a SHA-256 given in hex: `sha-256=:<base64>:`."""
    return f"sha-256=:{base64.b64encode(bytes.fromhex(sha256_hex)).decode('ascii')}:"


_DIGEST_MEMBER = re.compile(r"^\s*([a-z0-9_*.-]+)\s*=\s*:([A-Za-z0-9+/=]*):\s*$")


def parse_digest_header(value: str | None) -> dict[str, bytes]:
    """Algorithm -> digest from a `Content-Digest`/`Repr-Digest` value (an RFC 8941
    dictionary of byte sequences); members that do not parse are skipped."""
    out: dict[str, bytes] = {}
    if not value:
        return out
    for member in value.split(","):
        m = _DIGEST_MEMBER.match(member.split(";", 1)[0])
        if m is None:
            continue
        try:
            out[m.group(1)] = base64.b64decode(m.group(2), validate=True)
        except ValueError:
            continue
    return out


def stored_sha256(headers: Mapping[str, str]) -> str | None:
    """The digest (hex) of the object the backend holds, from `Repr-Digest`,
    `Content-Digest` or a strong `ETag` carrying the hex SHA-256."""
    for name in ("repr-digest", "content-digest"):
        digest = parse_digest_header(headers.get(name)).get("sha-256")
        if digest is not None and len(digest) == 32:
            return digest.hex()
    etag = headers.get("etag", "")
    m = re.fullmatch(r'"([0-9a-fA-F]{64})"', etag.strip())
    return m.group(1).lower() if m else None


def parse_retry_after(value: str | None, now_utc: float) -> float | None:
    """Seconds to wait from a `Retry-After` value (delta seconds or an HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        from email.utils import parsedate_to_datetime

        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now_utc)


class Verdict(enum.Enum):
    SYNCED = "synced"  # stored now
    ALREADY = "already"  # the backend already held this very object
    RETRY = "retry"  # transient: try again later
    QUARANTINE = "quarantine"  # permanent: keep locally, never send again
    GONE = "gone"  # the segment left the spool meanwhile (evicted): nothing to do


@dataclass(frozen=True)
class Decision:
    """What to do with a segment after an upload attempt. ``setting`` names the
    config key a person must check when the failure is theirs to fix (a refused
    key, a missing bucket): retried all the same, and health says so at once."""

    verdict: Verdict
    reason: str = ""
    retry_after: float | None = None
    setting: str | None = None


def idempotent_put_headers(content_type: str, size: int, sha256_hex: str,
                           extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Headers of an idempotent `PUT` of a body of `size` bytes with digest `sha256_hex`:
    the digest travels with it and `If-None-Match: *` asks the server not to overwrite.
    Shared with `store.HttpStore`, so segments and recordings use one protocol."""
    return {
        "Content-Type": content_type,
        "Content-Length": str(size),
        "Content-Digest": content_digest(sha256_hex),
        "If-None-Match": "*",
        **(extra or {}),
    }


def judge_response(
    status: int, headers: Mapping[str, str], excerpt: str, sha256_hex: str, now_utc: float
) -> Decision:
    """What a response to a segment PUT means for that segment."""
    if status in SUCCESS_STATUS:
        return Decision(Verdict.SYNCED)
    if status in ALREADY_STATUS:
        theirs = stored_sha256(headers)
        if theirs == sha256_hex.lower():
            return Decision(Verdict.ALREADY)
        if theirs is None:
            return Decision(Verdict.QUARANTINE,
                            f"status={status} backend holds this id and did not say its digest")
        return Decision(Verdict.QUARANTINE,
                        f"status={status} backend holds a different body under this id "
                        f"(its sha256={theirs}, ours={sha256_hex})")
    if status >= 500 or status in RETRYABLE_STATUS:
        return Decision(Verdict.RETRY, f"status={status} {excerpt}".strip(),
                        parse_retry_after(headers.get("retry-after"), now_utc))
    return Decision(Verdict.QUARANTINE, f"status={status} body={excerpt!r}")


def check_url_template(template: str) -> str | None:
    """None if `template` is a usable upload URL template, else what is wrong."""
    if not re.match(r"^https?://[^/\s{}]+", template):
        return "expected an http:// or https:// URL"
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        return f"unbalanced braces ({exc})"
    unknown = fields - URL_FIELDS
    if unknown:
        return (f"unknown placeholder {{{sorted(unknown)[0]}}}; "
                "expected only {device} and {segment}")
    if "segment" not in fields:
        return "expected a {segment} placeholder (each segment has its own URL)"
    return None


# ----------------------------------------------------------------------------
# Object keys in a bucket (upload.target = "s3")


#: Placeholders of a key template: the device id, the segment id, its start (UTC)
#: as year, month, day and hour, and the audio file's extension.
KEY_FIELDS: Final = frozenset({"device", "segment", "yyyy", "mm", "dd", "hh", "ext"})
#: Device first, then the time: a device's keys list in time order under its own
#: prefix (which a per-device write policy names), and devices spread across prefixes.
DEFAULT_KEY_TEMPLATE: Final = "{device}/{yyyy}/{mm}/{dd}/{segment}.{ext}"
# What the fixed text of a template may hold: the characters that need no encoding in
# a URL (so the signed path is the path sent), and "/". Device and segment ids, the
# other parts of a key, are made of the same.
_KEY_TEXT = re.compile(r"^[A-Za-z0-9_./-]*$")
_MAX_KEY_BYTES: Final = 1024


def check_key_template(template: str) -> str | None:
    """None if `template` makes usable object keys, else what is wrong with it."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"unbalanced braces ({exc})"
    fields = set()
    for text, name, spec, conversion in parts:
        if not _KEY_TEXT.match(text):
            bad = next(ch for ch in text if not _KEY_TEXT.match(ch))
            return (f"character {bad!r} is not allowed in an object key; expected letters, "
                    "digits, '_', '.', '-' and '/'")
        if name is None:
            continue
        if spec or conversion:
            return f"{{{name}}} takes no format, expected a bare {{{name}}}"
        if name not in KEY_FIELDS:
            return (f"unknown placeholder {{{name}}}; expected "
                    + ", ".join(f"{{{f}}}" for f in sorted(KEY_FIELDS)))
        fields.add(name)
    if "segment" not in fields:
        return "expected a {segment} placeholder (each segment needs a key of its own)"
    sample = segment_key(template, "d" * 64, "20261124T053000.000Z-3f9a1c2b", "opus")
    if sample.startswith("/") or "//" in sample or any(
            p in (".", "..") for p in sample.split("/")):
        return "expected a key without a leading '/', an empty part or a '.' or '..' part"
    if len(sample.encode()) + len(".json") > _MAX_KEY_BYTES:
        return f"keys would be longer than {_MAX_KEY_BYTES} bytes"
    return None


# Bucket names as every store takes them: 3 to 63 lower-case letters, digits, "."
# and "-", starting and ending with a letter or digit.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REGION = re.compile(r"^[a-z0-9-]{1,32}$")


def check_s3_target(endpoint: str, region: str, bucket: str, addressing: str,
                    key_template: str) -> list[tuple[str, str]]:
    """What is wrong with an object-storage target, as (setting, problem) pairs."""
    problems = []
    host = ""
    if endpoint:
        m = re.fullmatch(r"https?://(\[[0-9a-fA-F:.]+\]|[^/\s?#@:\[\]]+)(:[0-9]{1,5})?/?",
                         endpoint)
        if m is None:
            problems.append(("endpoint", "expected the http:// or https:// URL of the store, "
                                         "without a path (empty: AWS S3)"))
        host = m.group(1).strip("[]") if m else ""
    if not _REGION.fullmatch(region):
        problems.append(("region", 'expected a region such as "us-east-1"'))
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        problems.append(("bucket", 'expected a bucket name: 3 to 63 lower-case letters, '
                                   'digits, "." or "-"'))
    if addressing == "virtual" and re.fullmatch(r"[0-9.]+|[0-9a-fA-F:]*:[0-9a-fA-F:.]*", host):
        problems.append(("addressing", '"virtual" puts the bucket into the host name, which '
                                       'an IP address cannot take; expected "path"'))
    if (problem := check_key_template(key_template)) is not None:
        problems.append(("key_template", problem))
    return problems


def segment_key(template: str, device: str, segment_id: str, ext: str) -> str:
    """The object key of a segment: `template` filled in. The time comes from the
    segment id (its start, UTC), so a segment's key never changes between attempts."""
    return template.format(device=device, segment=segment_id, ext=ext,
                           yyyy=segment_id[0:4], mm=segment_id[4:6], dd=segment_id[6:8],
                           hh=segment_id[9:11])


# ----------------------------------------------------------------------------
# The raw STT protocol


#: The uploaded file's name: hosted APIs pick the decoder by extension and reject `.opus`.
CHUNK_FILENAME: Final = "chunk.ogg"
#: Content type of the `raw` protocol's body.
RAW_CONTENT_TYPE: Final = "audio/ogg; codecs=opus"
#: Headers of the `raw` protocol: where the chunk sits on the device's timeline.
RAW_HEADERS: Final = {
    "device": "X-Device-Id",  # the device id from the config
    "stream": "X-Stream-Id",  # random hex, one per agent run
    "sequence": "X-Sequence",  # 0, 1, 2, ... within the stream
    "start": "X-Chunk-Start",  # UTC of the first sample, ISO 8601 with microseconds
    "duration": "X-Chunk-Duration",  # seconds, decimal
    "synced": "X-Clock-Synced",  # "true" when the device clock was NTP-synchronised
}
