"""The agent's one TOML config file: schema, validation with key-path errors, writing.

Every key has a default, so `edge-agent config init` writes a complete file and an
installer only changes what differs on site. Validation collects *every* problem,
one line each, naming the key path and what was expected, because a person fixing
a file on a device wants the whole list at once, not one error per attempt.
Unknown keys are errors: a typo must never be silently ignored.

Bottom layer: imports only ``wire`` and ``errors``; every stage reads its
section from here, and every rule about the config lives here.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec
import tomli_w

from .errors import EdgeAgentError
from .wire import DEVICE_ID_PATTERN

__all__ = [
    "AgentConfig",
    "ApiConfig",
    "CaptureConfig",
    "ConfigError",
    "DeviceConfig",
    "RecordingsConfig",
    "RingConfig",
    "SegmentsConfig",
    "SttConfig",
    "UploadConfig",
    "assign",
    "default_config",
    "dump",
    "is_loopback",
    "listen_host",
    "load_config",
    "parse_assignment",
    "read_toml",
    "to_toml",
    "validate",
]


PositiveSeconds = Annotated[float, msgspec.Meta(gt=0)]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every config section: unknown keys are rejected."""


class DeviceConfig(_Section):
    """Who this device is and where it keeps its state."""

    id: Annotated[str, msgspec.Meta(pattern=DEVICE_ID_PATTERN)] = "edge-0001"
    data_dir: str = "/var/lib/edge-agent"


class CaptureConfig(_Section):
    """Where audio comes from and in which format it is held in the ring."""

    source: Literal["sounddevice", "file", "tone"] = "sounddevice"
    # Name substring (USB mics change index on re-plug), an index, or "default".
    device: str | int = "default"
    rate: Annotated[int, msgspec.Meta(ge=8000, le=384000)] = 48000
    channels: Annotated[int, msgspec.Meta(ge=1, le=32)] = 1
    format: Literal["int16", "int32", "float32"] = "int16"
    block_ms: Annotated[int, msgspec.Meta(ge=5, le=1000)] = 20
    # Blocks the PortAudio callback may queue while Trio is busy; overflow is counted.
    queue_blocks: Annotated[int, msgspec.Meta(ge=4, le=100000)] = 500
    # No block for this long means the device is gone: fail so the supervisor reopens it.
    stall_seconds: PositiveSeconds = 5.0
    # source = "file": a WAV file, paced at real time or as fast as possible.
    file: str = ""
    realtime: bool = True
    loop: bool = False
    # source = "tone": a sine for tests and demos; seconds = 0 runs forever.
    tone_hz: Annotated[float, msgspec.Meta(gt=0)] = 440.0
    tone_dbfs: Annotated[float, msgspec.Meta(le=0)] = -20.0
    tone_seconds: Annotated[float, msgspec.Meta(ge=0)] = 0.0


class RingConfig(_Section):
    """The in-memory ring: how many seconds of capture are held for readers."""

    seconds: Annotated[float, msgspec.Meta(ge=1, le=86400)] = 300.0


class SttConfig(_Section):
    """Live transcription (best effort)."""

    enabled: bool = False
    protocol: Literal["openai", "deepgram", "raw"] = "raw"
    url: str = ""
    token_file: str = ""
    model: str = ""
    language: str = ""
    prompt: str = ""
    rate: Annotated[int, msgspec.Meta(ge=8000, le=48000)] = 16000
    bitrate: Annotated[int, msgspec.Meta(ge=6000, le=256000)] = 24000
    # "vad" cuts at pauses in speech and sends nothing for silence; "fixed" cuts
    # every chunk_seconds.
    chunking: Literal["fixed", "vad"] = "vad"
    chunk_seconds: Annotated[float, msgspec.Meta(gt=0, le=300)] = 5.0
    min_chunk_seconds: Annotated[float, msgspec.Meta(gt=0, le=300)] = 1.0
    max_chunk_seconds: Annotated[float, msgspec.Meta(gt=0, le=300)] = 15.0
    vad: Literal["webrtc", "energy"] = "webrtc"
    vad_aggressiveness: Annotated[int, msgspec.Meta(ge=0, le=3)] = 2
    # A pause this long ends a chunk; this much audio before speech starts is kept.
    vad_silence_seconds: Annotated[float, msgspec.Meta(gt=0, le=10)] = 0.5
    vad_preroll_seconds: Annotated[float, msgspec.Meta(ge=0, le=2)] = 0.3
    timeout_seconds: PositiveSeconds = 30.0
    # Failed chunks are retried with backoff while younger than max_age_seconds.
    max_age_seconds: PositiveSeconds = 60.0
    backoff_initial_seconds: PositiveSeconds = 0.5
    backoff_max_seconds: PositiveSeconds = 10.0
    # Chunks waiting to be sent, bounded by audio seconds and bytes; the oldest
    # are dropped (and counted) past either.
    backlog_seconds: PositiveSeconds = 120.0
    backlog_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 2_000_000
    # Days of transcripts kept under data_dir/transcripts (one JSONL file per UTC day).
    transcript_days: Annotated[int, msgspec.Meta(ge=1, le=3650)] = 30


class SegmentsConfig(_Section):
    """Durable, wall-clock aligned segments spooled to disk."""

    enabled: bool = True
    seconds: Annotated[int, msgspec.Meta(ge=5, le=3600)] = 60
    format: Literal["opus", "flac", "wav"] = "opus"
    bitrate: Annotated[int, msgspec.Meta(ge=6000, le=256000)] = 32000
    fsync_seconds: Annotated[float, msgspec.Meta(gt=0, le=600)] = 5.0
    max_spool_mb: Annotated[int, msgspec.Meta(ge=1)] = 2048
    min_free_mb: Annotated[int, msgspec.Meta(ge=0)] = 200
    retain_synced_hours: Annotated[float, msgspec.Meta(ge=0)] = 24.0


class UploadConfig(_Section):
    """Syncing sealed segments to the backend."""

    enabled: bool = False
    url: str = ""
    token_file: str = ""
    timeout_seconds: PositiveSeconds = 60.0
    backoff_initial_seconds: PositiveSeconds = 1.0
    backoff_max_seconds: PositiveSeconds = 300.0
    max_bytes_per_second: Annotated[int, msgspec.Meta(ge=0)] = 0
    # After a stop (SIGTERM) sealed the open segment: how long the agent goes on
    # uploading what is pending while the backend answers (0: not at all).
    shutdown_seconds: Annotated[float, msgspec.Meta(ge=0, le=60)] = 4.0


class ApiConfig(_Section):
    """The device HTTP API."""

    enabled: bool = False
    # HOST:PORT; beyond loopback only with a token_file.
    listen: str = "127.0.0.1:8640"
    # One bearer token on one line. Empty (loopback only): a random token is
    # created in <data_dir>/api-token, mode 0600, on first start.
    token_file: str = ""
    # Announce the device on the local network (mDNS/DNS-SD, `edge-agent discover`);
    # only when listen is beyond loopback.
    advertise: bool = True
    # Longest time range one /v1/audio request may ask for.
    max_range_seconds: PositiveSeconds = 3600.0
    # /v1/audio requests converted at once; more wait in a queue of at most
    # max_audio_queue for up to audio_queue_seconds, then get 503 + Retry-After.
    max_audio_encodes: Annotated[int, msgspec.Meta(ge=1, le=64)] = 2
    max_audio_queue: Annotated[int, msgspec.Meta(ge=0, le=1024)] = 16
    audio_queue_seconds: Annotated[float, msgspec.Meta(ge=0, le=300)] = 5.0
    # Segment downloads served at once; more get 503 + Retry-After.
    max_downloads: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 32
    # Client connections served at once (each holds a file descriptor); a few more
    # are let in for /healthz and /metrics only; past that new ones are closed.
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 64
    # Listeners of /v1/live at once, and the longest one listens.
    max_live_listeners: Annotated[int, msgspec.Meta(ge=0, le=64)] = 4
    live_max_seconds: PositiveSeconds = 3600.0
    # A request must start its response within this time; a client that takes
    # no data for this long is dropped (its connection closed); an idle
    # keep-alive connection is closed after it.
    request_timeout_seconds: PositiveSeconds = 30.0


class RecordingsConfig(_Section):
    """Named recordings the backend brackets from the capture (POST /v1/recordings),
    sealed into the spool and uploaded like segments (needs segments.enabled)."""

    enabled: bool = True
    format: Literal["opus", "flac", "wav", "mp3", "pcm"] = "opus"
    # Opus bit/s; MP3 uses it too (rounded to kbit/s).
    bitrate: Annotated[int, msgspec.Meta(ge=8000, le=256000)] = 32000
    max_active: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    # A recording that reaches this length stops and is sealed by itself.
    max_seconds: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 14400.0


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
    value = _convert_struct(raw, AgentConfig, "", problems)
    if not problems:
        assert isinstance(value, AgentConfig)
        problems.extend(_cross_checks(value))
    if problems:
        raise ConfigError(problems)
    assert isinstance(value, AgentConfig)
    return value


def _convert_struct(
    raw: Any, cls: type[msgspec.Struct], path: str, problems: list[str]
) -> msgspec.Struct | None:
    if not isinstance(raw, dict):
        problems.append(f"{path.rstrip('.') or 'config'}: expected a table, got {_show(raw)}")
        return None
    fields = {f.encode_name: f for f in msgspec.structs.fields(cls)}
    hints = typing.get_type_hints(cls, include_extras=True)
    for key in raw:
        if key not in fields:
            problems.append(_unknown_key(f"{path}{key}", key, list(fields)))
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        if name not in raw:
            continue
        ftype = hints[field.name]
        key_path = f"{path}{name}"
        if isinstance(ftype, type) and issubclass(ftype, msgspec.Struct):
            kwargs[field.name] = _convert_struct(raw[name], ftype, key_path + ".", problems)
            continue
        try:
            kwargs[field.name] = msgspec.convert(raw[name], ftype, strict=True)
        except msgspec.ValidationError as exc:
            problems.append(f"{key_path}: {_expected(ftype, str(exc))}, got {_show(raw[name])}")
    if any(v is None for v in kwargs.values()):
        return None
    return cls(**kwargs)


def _unknown_key(key_path: str, key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{key_path}: unknown key{hint}; known keys here: {', '.join(sorted(known))}"


def _expected(ftype: Any, message: str) -> str:
    """Say in words what a key accepts, including any bound msgspec reported."""
    base = _describe(ftype)
    # msgspec reports bounds as "Expected `int` >= 8000".
    bound = re.match(r"Expected `[^`]+` (.+?)(?: - at .*)?$", message)
    if bound and not bound.group(1).startswith("got"):
        if bound.group(1).startswith("matching regex"):
            return f"expected {base} of letters, digits, '.', '_' or '-' (at most 64)"
        return f"expected {base} {bound.group(1)}"
    return f"expected {base}"


def _describe(ftype: Any) -> str:
    origin = typing.get_origin(ftype)
    if origin is Annotated:
        return _describe(typing.get_args(ftype)[0])
    if origin is Literal:
        return "one of " + ", ".join(f'"{a}"' for a in typing.get_args(ftype))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(ftype))
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(ftype, getattr(ftype, "__name__", str(ftype)))


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


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
    for section, url in (("stt", stt.url), ("upload", cfg.upload.url)):
        enabled = getattr(cfg, section).enabled
        if enabled and not re.match(r"^https?://[^/\s]+", url):
            problems.append(f'{section}.url: expected an http:// or https:// URL, got "{url}"')
    if cfg.upload.enabled and re.match(r"^https?://[^/\s]+", cfg.upload.url):
        from .wire import check_url_template

        if (problem := check_url_template(cfg.upload.url)) is not None:
            problems.append(f'upload.url: {problem}, got "{cfg.upload.url}"')
    if cfg.upload.enabled and not cfg.segments.enabled:
        problems.append("upload.enabled: expected segments.enabled = true "
                        "(the uploader sends the spooled segments)")
    if cfg.api.enabled:
        problems.extend(check_api_config(cfg.api))
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

    Every secret file is read here, with one error policy: `ConfigError` with one
    line naming the config ``key``, the file and what is wrong. The secret is the
    file's text without surrounding whitespace; it must be one word, and match
    ``pattern`` when given (``expected`` then says what it should look like).
    """
    p = Path(path)
    where = f"{key}: {p}" if key else str(p)
    try:
        text = p.read_text(encoding="utf-8").strip()
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
    if not text or any(ch.isspace() for ch in text) or (
            pattern is not None and not pattern.fullmatch(text)):
        raise ConfigError([f"{where}: expected {expected}"])
    return text


# ----------------------------------------------------------------------------
# Files


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a TOML file, turning every way it can fail into one clear line."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
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
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{p}: not valid TOML: {exc}"]) from None


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate a config file; raises `ConfigError`."""
    raw = read_toml(path)
    try:
        return validate(raw)
    except ConfigError as exc:
        raise ConfigError([f"{Path(path)}: {line}" for line in exc.problems]) from None


def to_toml(cfg: AgentConfig) -> str:
    return tomli_w.dumps(msgspec.to_builtins(cfg))


HEADER = (
    "# edge-agent configuration. Every key is shown with its default.\n"
    "# Check a change with `edge-agent config check FILE`; edit on site with\n"
    "# `edge-agent config set FILE key.path=value`.\n\n"
)


def dump(raw: dict[str, Any]) -> str:
    """A raw document as the text of a config file."""
    return HEADER + tomli_w.dumps(raw)


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """Parse `key.path=value` from the command line.

    The value is read as a TOML value when it is one (`48000`, `true`, `"x"`,
    `[1, 2]`), otherwise it is taken as a bare string, so `device.id=edge-7`
    works without shell-quoted TOML quotes.
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError([f"{text}: expected key.path=value"])
    parts = key.split(".")
    if any(not re.fullmatch(r"[A-Za-z0-9_-]+", part) for part in parts):
        raise ConfigError([f"{key}: expected a dotted key path such as capture.rate"])
    value = value.strip()
    try:
        parsed: Any = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return parts, parsed


def assign(raw: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set a value at a key path in a raw TOML document, creating tables."""
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError([f"{'.'.join(parts[: i + 1])}: is a value, not a table"])
        node = child
    node[parts[-1]] = value
