"""The agent's one TOML config file: schema, validation with key-path errors, reading.

Every key has a default, so `edge-agent config init` writes a complete file and an
installer only changes what differs on site. Validation collects *every* problem,
one line each, naming the key path and what was expected, because a person fixing
a file on a device wants the whole list at once, not one error per attempt.
Unknown keys are errors: a typo must never be silently ignored. Every key says
what it does and its unit in ``Meta(description=...)``: ``configfile`` writes it
as the key's comment.

Bottom layer: imports only ``wire``, ``schema`` and ``errors``; every stage reads its
section from here, and every rule about the config lives here.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from .errors import EdgeAgentError
from .schema import convert_table, names_any
from .wire import DEFAULT_KEY_TEMPLATE, DEVICE_ID_PATTERN

__all__ = [
    "AgentConfig",
    "ApiConfig",
    "CaptureConfig",
    "ConfigError",
    "DeviceConfig",
    "FleetConfig",
    "RecordingsConfig",
    "RingConfig",
    "S3Config",
    "SegmentsConfig",
    "SttConfig",
    "UploadConfig",
    "check_upload_config",
    "default_config",
    "is_loopback",
    "listen_host",
    "load_config",
    "parse_toml",
    "read_config_text",
    "read_toml",
    "validate",
]


PositiveSeconds = Annotated[float, Meta(gt=0)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every config section: unknown keys are rejected.

    Each key carries a one-line ``Meta(description=...)`` saying what it does and
    its unit: `config init` and `config show` write it as the key's comment.
    """


class DeviceConfig(_Section):
    """Who this device is and where it keeps its state."""

    id: Annotated[str, Meta(pattern=DEVICE_ID_PATTERN, description=(
        "Names this device in uploads and the API: letters, digits, '.', '_' or '-'"
    ))] = "edge-0001"
    data_dir: Annotated[str, Meta(description=(
        "Directory of the spool, transcripts and state (a path)"))] = "/var/lib/edge-agent"


class CaptureConfig(_Section):
    """Where audio comes from and in which format it is held in the ring."""

    source: Annotated[Literal["sounddevice", "file", "tone"], Meta(description=(
        'Where audio comes from: "sounddevice" (a mic), "file" (a WAV file) or '
        '"tone" (a sine)'))] = "sounddevice"
    device: Annotated[str | int, Meta(description=(
        'Input device: a name substring (USB mics change index), an index or "default"'
    ))] = "default"
    rate: Annotated[int, Meta(ge=8000, le=384000, description=(
        "Sample rate captured and held in the ring (Hz)"))] = 48000
    channels: Annotated[int, Meta(ge=1, le=32, description="Channels captured")] = 1
    format: Annotated[Literal["int16", "int32", "float32"], Meta(description=(
        'Sample format held in the ring: "int16", "int32" (24- and 32-bit mics) or '
        '"float32"'))] = "int16"
    block_ms: Annotated[int, Meta(ge=5, le=1000, description=(
        "Length of one capture block (milliseconds; 100 measured cheapest, see benchmarks)"
    ))] = 100
    queue_blocks: Annotated[int, Meta(ge=4, le=100000, description=(
        "Blocks the audio callback may queue for the agent; more are counted as overflow"))] = 100
    stall_seconds: Annotated[PositiveSeconds, Meta(description=(
        "No audio for this long means the device is gone: it is reopened (seconds)"))] = 5.0
    file: Annotated[str, Meta(description=(
        'With source = "file": the WAV file to play (a path)'))] = ""
    realtime: Annotated[bool, Meta(description=(
        'With source = "file": pace it at real time (false: as fast as possible)'))] = True
    loop: Annotated[bool, Meta(description=(
        'With source = "file": start over at its end'))] = False
    tone_hz: Annotated[float, Meta(gt=0, description=(
        'With source = "tone": frequency of the sine (Hz)'))] = 440.0
    tone_dbfs: Annotated[float, Meta(le=0, description=(
        'With source = "tone": level of the sine (dBFS)'))] = -20.0
    tone_seconds: Annotated[float, Meta(ge=0, description=(
        'With source = "tone": how long it plays, 0 for ever (seconds)'))] = 0.0


class RingConfig(_Section):
    """The in-memory ring: how many seconds of capture are held for readers."""

    seconds: Annotated[float, Meta(ge=1, le=86400, description=(
        "Audio held in memory for live readers and the API, set at start (seconds)"))] = 300.0


class SttConfig(_Section):
    """Live transcription (best effort)."""

    enabled: Annotated[bool, Meta(description=(
        "Send the audio to a speech-to-text service as it is captured"))] = False
    protocol: Annotated[Literal["openai", "deepgram", "raw"], Meta(description=(
        'How chunks are sent: "openai", "deepgram" or "raw" (see the README)'))] = "raw"
    url: Annotated[str, Meta(description=(
        "The service's full endpoint (an http:// or https:// URL)"))] = ""
    token_file: Annotated[str, Meta(description=(
        "File holding the bearer token or Deepgram key (a path; empty: none)"))] = ""
    model: Annotated[str, Meta(description=(
        'Model named in each request, e.g. "whisper-1" (empty: none)'))] = ""
    language: Annotated[str, Meta(description=(
        'Language of the speech, e.g. "en" (empty: the service detects it)'))] = ""
    prompt: Annotated[str, Meta(description=(
        'Text sent as the prompt with each chunk, protocol "openai" (empty: none)'))] = ""
    rate: Annotated[int, Meta(ge=8000, le=48000, description=(
        "Sample rate of the audio sent (Hz)"))] = 16000
    bitrate: Annotated[int, Meta(ge=6000, le=256000, description=(
        "Opus bit rate of the audio sent (bit/s)"))] = 24000
    # Defaults of both complexities: chosen by the rule of docs/benchmarks.md, section 8.
    complexity: Annotated[int, Meta(ge=0, le=10, description=(
        "Opus encoder complexity: 0 (least CPU) to 10 (most quality per bit)"
    ))] = 0
    chunking: Annotated[Literal["fixed", "vad"], Meta(description=(
        '"vad": cut at pauses in speech, send no silence; "fixed": cut every chunk_seconds'
    ))] = "vad"
    chunk_seconds: Annotated[float, Meta(gt=0, le=300, description=(
        'Length of a chunk with chunking = "fixed" (seconds)'))] = 5.0
    min_chunk_seconds: Annotated[float, Meta(gt=0, le=300, description=(
        'Shortest chunk with chunking = "vad" (seconds)'))] = 1.0
    max_chunk_seconds: Annotated[float, Meta(gt=0, le=300, description=(
        'Longest chunk with chunking = "vad"; longer speech is cut (seconds)'))] = 15.0
    vad: Annotated[Literal["webrtc", "energy"], Meta(description=(
        'Speech detector: "webrtc", or "energy" (any sound above -45 dBFS)'))] = "webrtc"
    vad_aggressiveness: Annotated[int, Meta(ge=0, le=3, description=(
        "How strict the webrtc detector is, 0 (lenient) to 3 (strict)"))] = 2
    vad_silence_seconds: Annotated[float, Meta(gt=0, le=10, description=(
        "A pause this long ends a chunk (seconds)"))] = 0.5
    vad_preroll_seconds: Annotated[float, Meta(ge=0, le=2, description=(
        "Audio kept from before speech starts (seconds)"))] = 0.3
    timeout_seconds: Annotated[PositiveSeconds, Meta(description=(
        "Longest wait for the service's answer to a chunk (seconds)"))] = 30.0
    max_age_seconds: Annotated[PositiveSeconds, Meta(description=(
        "Failed chunks are retried while younger than this (seconds)"))] = 60.0
    backoff_initial_seconds: Annotated[PositiveSeconds, Meta(description=(
        "Delay before the first retry, doubling up to the longest (seconds)"))] = 0.5
    backoff_max_seconds: Annotated[PositiveSeconds, Meta(description=(
        "Longest delay between retries (seconds)"))] = 10.0
    backlog_seconds: Annotated[PositiveSeconds, Meta(description=(
        "Audio waiting to be sent, at most; past it the oldest chunks are dropped "
        "(seconds)"))] = 120.0
    backlog_bytes: Annotated[int, Meta(ge=1024, description=(
        "Chunks waiting to be sent, at most; past it the oldest are dropped "
        "(bytes)"))] = 2_000_000
    transcript_days: Annotated[int, Meta(ge=1, le=3650, description=(
        "Transcripts kept under data_dir/transcripts, one file a UTC day (days)"))] = 30


class SegmentsConfig(_Section):
    """Durable, wall-clock aligned segments spooled to disk."""

    enabled: Annotated[bool, Meta(description=(
        "Keep the audio on disk in segments under data_dir/spool"))] = True
    seconds: Annotated[int, Meta(ge=5, le=3600, description=(
        "Length of a segment, aligned to the wall clock (seconds)"))] = 60
    format: Annotated[Literal["opus", "flac", "wav"], Meta(description=(
        'Segment format: "opus", "flac" (Ogg FLAC) or "wav"'))] = "opus"
    bitrate: Annotated[int, Meta(ge=6000, le=256000, description=(
        "Opus bit rate (bit/s)"))] = 32000
    complexity: Annotated[int, Meta(ge=0, le=10, description=(
        "Opus encoder complexity: 0 (least CPU) to 10 (most quality per bit)"
    ))] = 7
    fsync_seconds: Annotated[float, Meta(gt=0, le=600, description=(
        "Audio written and flushed to disk at a time: what a crash can lose (seconds)"
        ))] = 5.0
    max_spool_mb: Annotated[int, Meta(ge=1, description=(
        "Spool size at most; past it the oldest synced segments go first (MB)"))] = 2048
    min_free_mb: Annotated[int, Meta(ge=0, description=(
        "Disk space kept free; below it the oldest synced segments go first (MB)"))] = 200
    retain_synced_hours: Annotated[float, Meta(ge=0, description=(
        "How long uploaded segments are kept for retrieval (hours)"))] = 24.0


class S3Config(_Section):
    """Object storage for upload.target = "s3": AWS S3 or an S3-compatible store."""

    endpoint: Annotated[str, Meta(description=(
        "The store's URL, e.g. https://minio.example:9000 (empty: AWS S3 in region)"
    ))] = ""
    region: Annotated[str, Meta(description=(
        "Region the requests are signed for (self-hosted stores mostly take us-east-1)"
    ))] = "us-east-1"
    bucket: Annotated[str, Meta(description="Bucket the segments are written to")] = ""
    key_template: Annotated[str, Meta(description=(
        "Object key: {device} {yyyy} {mm} {dd} {hh} {segment} {ext}; needs {segment}"
    ))] = DEFAULT_KEY_TEMPLATE
    addressing: Annotated[Literal["path", "virtual"], Meta(description=(
        '"path": ENDPOINT/BUCKET/KEY; "virtual": BUCKET.ENDPOINT/KEY'))] = "path"
    credentials_file: Annotated[str, Meta(description=(
        "AWS shared-credentials file holding this device's keys (a path)"))] = ""
    profile: Annotated[str, Meta(description=(
        "Section of credentials_file to use"))] = "default"


class UploadConfig(_Section):
    """Syncing sealed segments to the backend or to object storage."""

    enabled: Annotated[bool, Meta(description=(
        "Upload sealed segments to the backend (needs segments.enabled)"))] = False
    target: Annotated[Literal["http", "s3"], Meta(description=(
        'Where segments go: "http" (PUT to url) or "s3" (object storage, [upload.s3])'
    ))] = "http"
    url: Annotated[str, Meta(description=(
        "Where each segment is PUT: a URL template with {device} and {segment}"))] = ""
    token_file: Annotated[str, Meta(description=(
        "File holding the bearer token (a path; empty: none)"))] = ""
    timeout_seconds: Annotated[PositiveSeconds, Meta(description=(
        "Longest time one whole upload may take (seconds)"))] = 60.0
    backoff_initial_seconds: Annotated[PositiveSeconds, Meta(description=(
        "Delay before the first retry, doubling up to the longest (seconds)"))] = 1.0
    backoff_max_seconds: Annotated[PositiveSeconds, Meta(description=(
        "Longest delay between retries; also caps a Retry-After (seconds)"))] = 300.0
    max_bytes_per_second: Annotated[int, Meta(ge=0, description=(
        "Upload speed limit, 0 for none (bytes/s)"))] = 0
    shutdown_seconds: Annotated[float, Meta(ge=0, le=60, description=(
        "After a stop, how long pending segments are still sent, 0 for not at all "
        "(seconds)"))] = 4.0
    s3: S3Config = msgspec.field(default_factory=S3Config)


class ApiConfig(_Section):
    """The device HTTP API."""

    enabled: Annotated[bool, Meta(description="Serve the device HTTP API")] = False
    listen: Annotated[str, Meta(description=(
        "Address to serve on (HOST:PORT); beyond loopback only with a token_file"
    ))] = "127.0.0.1:8640"
    token_file: Annotated[str, Meta(description=(
        "Bearer token file (a path; empty, on loopback: a random one in data_dir/api-token)"))] = ""
    advertise: Annotated[bool, Meta(description=(
        "Announce the device over mDNS (edge-agent discover) when listen is beyond loopback"
    ))] = True
    max_range_seconds: Annotated[PositiveSeconds, Meta(description=(
        "Longest time range one /v1/audio request may ask for (seconds)"))] = 3600.0
    max_audio_encodes: Annotated[int, Meta(ge=1, le=64, description=(
        "/v1/audio requests converted at once"))] = 2
    max_audio_queue: Annotated[int, Meta(ge=0, le=1024, description=(
        "/v1/audio requests waiting their turn, at most; more get 503"))] = 16
    audio_queue_seconds: Annotated[float, Meta(ge=0, le=300, description=(
        "Longest wait of a /v1/audio request in the queue, then 503 (seconds)"))] = 5.0
    max_downloads: Annotated[int, Meta(ge=1, le=1024, description=(
        "Segment downloads served at once; more get 503"))] = 32
    max_connections: Annotated[int, Meta(ge=1, le=4096, description=(
        "Client connections served at once; a few more only for /healthz and /metrics"
        ))] = 64
    max_live_listeners: Annotated[int, Meta(ge=0, le=64, description=(
        "Listeners of /v1/live at once"))] = 4
    live_max_seconds: Annotated[PositiveSeconds, Meta(description=(
        "Longest one /v1/live listener stays (seconds)"))] = 3600.0
    request_timeout_seconds: Annotated[PositiveSeconds, Meta(description=(
        "Time to start a response; a client stalled or idle this long is dropped (seconds)"
    ))] = 30.0


class RecordingsConfig(_Section):
    """Named recordings the backend brackets from the capture (POST /v1/recordings).

    Sealed into the spool and uploaded like segments (needs segments.enabled).
    """

    enabled: Annotated[bool, Meta(description=(
        "Accept named recordings (POST /v1/recordings)"))] = True
    format: Annotated[Literal["opus", "flac", "wav", "mp3", "pcm"], Meta(description=(
        'Recording format: "opus", "flac", "wav", "mp3" or "pcm"'))] = "opus"
    bitrate: Annotated[int, Meta(ge=8000, le=256000, description=(
        "Opus bit rate; MP3 uses it rounded to kbit/s (bit/s)"))] = 32000
    max_active: Annotated[int, Meta(ge=1, le=64, description=(
        "Recordings at once; more get 429"))] = 4
    max_seconds: Annotated[float, Meta(gt=0, le=86400, description=(
        "A recording this long stops and is sealed by itself (seconds)"))] = 14400.0


class FleetConfig(_Section):
    """Fleet operations through the bucket of [upload.s3]: retrieval requests
    answered from a mailbox object, and a heartbeat (no inbound connection)."""

    enabled: Annotated[bool, Meta(description=(
        'Answer requests, send heartbeats through the bucket (needs upload.target = "s3")'
    ))] = False
    poll_seconds: Annotated[float, Meta(ge=1, le=86400, description=(
        "How often the mailbox is read while idle, give or take 10% (seconds)"))] = 60.0
    busy_poll_seconds: Annotated[float, Meta(ge=0.1, le=86400, description=(
        "How often the mailbox is read while requests wait their turn (seconds)"))] = 5.0
    heartbeat_seconds: Annotated[float, Meta(ge=1, le=86400, description=(
        "How often the heartbeat is written, and on every health change (seconds)"))] = 300.0
    max_request_seconds: Annotated[float, Meta(gt=0, le=86400, description=(
        "Longest range one request may ask for; longer ones are refused (seconds)"))] = 3600.0
    max_requests_per_poll: Annotated[int, Meta(ge=1, le=100, description=(
        "Requests taken up (answered, refused, or found answered) per mailbox reading"
    ))] = 4
    keep_results_hours: Annotated[float, Meta(gt=0, le=8760, description=(
        "Requests placed longer ago than this are not answered (again) (hours)"))] = 168.0


class AgentConfig(_Section):
    """The whole agent."""

    device: DeviceConfig = msgspec.field(default_factory=DeviceConfig)
    capture: CaptureConfig = msgspec.field(default_factory=CaptureConfig)
    ring: RingConfig = msgspec.field(default_factory=RingConfig)
    stt: SttConfig = msgspec.field(default_factory=SttConfig)
    segments: SegmentsConfig = msgspec.field(default_factory=SegmentsConfig)
    upload: UploadConfig = msgspec.field(default_factory=UploadConfig)
    api: ApiConfig = msgspec.field(default_factory=ApiConfig)
    recordings: RecordingsConfig = msgspec.field(default_factory=RecordingsConfig)
    fleet: FleetConfig = msgspec.field(default_factory=FleetConfig)


class ConfigError(EdgeAgentError):
    """A config file that cannot be used; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# ----------------------------------------------------------------------------
# Validation


def default_config() -> AgentConfig:
    return AgentConfig()


def validate(raw: dict[str, Any]) -> AgentConfig:
    """Turn a parsed TOML document into an `AgentConfig`, or raise `ConfigError`
    listing every problem found."""
    problems: list[str] = []
    bad: list[str] = []
    value = convert_table(raw, AgentConfig, "", problems, bad)
    assert isinstance(value, AgentConfig)
    # The rules across keys run even when some keys are bad (those hold their
    # defaults here), so one check lists every problem. A rule that names a bad
    # key is left out: it would judge the default, not what the file says.
    problems.extend(p for p in _cross_checks(value) if not names_any(p, bad))
    if problems:
        raise ConfigError(problems)
    return value


def _cross_checks(cfg: AgentConfig) -> list[str]:
    """Rules that involve more than one key."""
    problems = []
    cap = cfg.capture
    if cap.source == "file" and not cap.file:
        problems.append('capture.file: expected a WAV file path when capture.source = "file"')
    if cap.source == "tone" and cap.tone_hz >= cap.rate / 2:
        problems.append(
            f"capture.tone_hz: expected a frequency below half of capture.rate "
            f"({cap.rate / 2:g}), got {cap.tone_hz:g}"
        )
    if cfg.ring.seconds < 2 * cap.block_ms / 1000:
        problems.append("ring.seconds: expected at least two capture blocks")
    stt = cfg.stt
    if stt.min_chunk_seconds > stt.max_chunk_seconds:
        problems.append(
            f"stt.min_chunk_seconds: expected at most stt.max_chunk_seconds "
            f"({stt.max_chunk_seconds:g}), got {stt.min_chunk_seconds:g}"
        )
    if stt.enabled:
        problems.extend(check_stt_config(stt))
    if stt.enabled and not re.match(r"^https?://[^/\s]+", stt.url):
        problems.append(f'stt.url: expected an http:// or https:// URL, got "{stt.url}"')
    problems.extend(check_upload_config(cfg.upload))
    if cfg.upload.enabled and not cfg.segments.enabled:
        problems.append("upload.enabled: expected segments.enabled = true "
                        "(the uploader sends the spooled segments)")
    if cfg.api.enabled:
        problems.extend(check_api_config(cfg.api))
    fleet = cfg.fleet
    if fleet.enabled and (not cfg.upload.enabled or cfg.upload.target != "s3"):
        problems.append('fleet.enabled: expected upload.enabled = true and upload.target = '
                        '"s3" (the fleet meets in the bucket of [upload.s3])')
    if fleet.enabled and fleet.busy_poll_seconds > fleet.poll_seconds:
        problems.append(f"fleet.busy_poll_seconds: expected at most fleet.poll_seconds "
                        f"({fleet.poll_seconds:g}), got {fleet.busy_poll_seconds:g}")
    return problems


#: Sample rates the voice activity detectors take (webrtcvad's own list).
VAD_RATES: Final = (8000, 16000, 32000, 48000)
#: Ogg Opus bytes per byte of Opus payload, at worst (page headers, short packets).
OGG_OVERHEAD: Final = 1.15


def check_stt_config(cfg: SttConfig) -> list[str]:
    """Problems with an enabled `[stt]` section that involve several keys (no I/O)."""
    problems: list[str] = []
    if cfg.protocol == "deepgram" and not cfg.token_file:
        problems.append('stt.token_file: expected the file holding the Deepgram API key '
                        'when stt.protocol = "deepgram"')
    if cfg.chunking == "vad" and cfg.rate not in VAD_RATES:
        rates = ", ".join(str(r) for r in VAD_RATES)
        problems.append(f'stt.rate: expected one of {rates} when stt.chunking = "vad" '
                        f"(rates the VAD takes), got {cfg.rate}")
    longest = cfg.max_chunk_seconds if cfg.chunking == "vad" else cfg.chunk_seconds
    longest_key = "stt.max_chunk_seconds" if cfg.chunking == "vad" else "stt.chunk_seconds"
    if longest > cfg.backlog_seconds:
        problems.append(f"stt.backlog_seconds: expected room for the longest chunk "
                        f"({longest_key} = {longest:g}), got {cfg.backlog_seconds:g}")
    need = math.ceil(longest * cfg.bitrate / 8 * OGG_OVERHEAD) + 4096
    if need > cfg.backlog_bytes:
        problems.append(f"stt.backlog_bytes: expected room for the longest chunk "
                        f"(about {need} bytes at stt.bitrate = {cfg.bitrate}), "
                        f"got {cfg.backlog_bytes}")
    if cfg.backoff_initial_seconds > cfg.backoff_max_seconds:
        problems.append(f"stt.backoff_initial_seconds: expected at most "
                        f"stt.backoff_max_seconds ({cfg.backoff_max_seconds:g}), "
                        f"got {cfg.backoff_initial_seconds:g}")
    return problems


def check_upload_config(cfg: UploadConfig) -> list[str]:
    """Problems with the ``[upload]`` section and, with target "s3", ``[upload.s3]``
    (no I/O: the credentials file is read when the uploader starts)."""
    from .wire import check_s3_target, check_url_template

    if cfg.target == "s3":
        s3 = cfg.s3
        problems = [f'upload.s3.{key}: {problem}, got "{getattr(s3, key)}"' for key, problem
                    in check_s3_target(s3.endpoint, s3.region, s3.bucket, s3.addressing,
                                       s3.key_template)]
        if not s3.credentials_file:
            problems.append('upload.s3.credentials_file: expected the file holding this '
                            'device\'s keys when upload.target = "s3"')
        return problems
    if not cfg.enabled:
        return []
    if not re.match(r"^https?://[^/\s]+", cfg.url):
        return [f'upload.url: expected an http:// or https:// URL, got "{cfg.url}"']
    problem = check_url_template(cfg.url)
    return [f'upload.url: {problem}, got "{cfg.url}"'] if problem else []


def listen_host(listen: str) -> str:
    """The host of ``HOST:PORT`` (an IPv6 address without its brackets)."""
    return listen.rpartition(":")[0].strip("[]")


def is_loopback(listen: str) -> bool:
    """Whether ``HOST:PORT`` binds only the loopback interface."""
    host = listen_host(listen)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_api_config(cfg: ApiConfig) -> list[str]:
    """Problems with an enabled ``[api]`` section (no I/O)."""
    problems: list[str] = []
    host, sep, port = cfg.listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        problems.append(f'api.listen: expected HOST:PORT such as 127.0.0.1:8640, '
                        f'got "{cfg.listen}"')
    elif not cfg.token_file and not is_loopback(cfg.listen):
        problems.append(
            f'api.token_file: expected a token file when api.listen ("{cfg.listen}") is not '
            "a loopback address: without one anybody on the network could listen to the mic")
    return problems


def config_warnings(cfg: AgentConfig) -> list[str]:
    """Settings that are valid but that a service will likely refuse (no I/O).

    Shown by ``config check`` and logged at start; they never stop the agent,
    since a self-hosted server may not need what a hosted one does.
    """
    warnings: list[str] = []
    stt = cfg.stt
    if stt.enabled and stt.protocol in ("openai", "deepgram") and not stt.model:
        hint = "whisper-1" if stt.protocol == "openai" else "nova-2"
        warnings.append(f'stt.model: empty with stt.protocol = "{stt.protocol}"; hosted '
                        f"services and most servers refuse a request without one "
                        f'(e.g. "{hint}")')
    return warnings


# ----------------------------------------------------------------------------
# Secrets


def read_secret(path: str | os.PathLike[str], key: str, *,
                pattern: re.Pattern[str] | None = None,
                expected: str = "one token on one line") -> str:
    """The one secret held in the file at ``path`` (a bearer token, an API key).

    Every secret file is read here (`read_secret_text`), with one error policy:
    `ConfigError` with one line naming the config ``key``, the file and what is
    wrong. The secret is the file's text without surrounding whitespace; it must
    be one word, and match ``pattern`` when given (``expected`` then says what it
    should look like).
    """
    text = read_secret_text(path, key).strip()
    if not text or any(ch.isspace() for ch in text) or (
            pattern is not None and not pattern.fullmatch(text)):
        where = f"{key}: {Path(path)}" if key else str(Path(path))
        raise ConfigError([f"{where}: expected {expected}"])
    return text


def read_secret_text(path: str | os.PathLike[str], key: str) -> str:
    """The whole text of a file holding secrets (a token, a credentials file), or
    `ConfigError` in one line naming the config ``key`` and the file."""
    p = Path(path)
    where = f"{key}: {p}" if key else str(p)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{where}: no such file"]) from None
    except PermissionError:
        raise ConfigError([f"{where}: permission denied"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{where}: is a directory, expected a file"]) from None
    except OSError as exc:
        raise ConfigError([f"{where}: cannot read ({exc.strerror})"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{where}: cannot read (not UTF-8 text)"]) from None


# ----------------------------------------------------------------------------
# Files


def read_config_text(path: str | os.PathLike[str]) -> str:
    """The text of a config file, every way reading it can fail turned into one line."""
    p = Path(path)
    try:
        return p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(
            [f"{p}: no such file (create one with: edge-agent config init {p})"]
        ) from None
    except IsADirectoryError:
        raise ConfigError([f"{p}: is a directory, expected a TOML file"]) from None
    except PermissionError:
        raise ConfigError([f"{p}: permission denied"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{p}: not UTF-8 text (byte {exc.start})"]) from None
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read ({exc.strerror})"]) from None


def parse_toml(text: str, path: str | os.PathLike[str]) -> dict[str, Any]:
    """The document in `text` (read from `path`), or `ConfigError` in one line."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{Path(path)}: not valid TOML: {exc}"]) from None


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML file, turning every way it can fail into one clear line."""
    return parse_toml(read_config_text(path), path)


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate a config file; raises `ConfigError`."""
    raw = read_toml(path)
    try:
        return validate(raw)
    except ConfigError as exc:
        raise ConfigError([f"{Path(path)}: {line}" for line in exc.problems]) from None
