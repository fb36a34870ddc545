"""Thousands of generated hostile requests against the real API on loopback.

Requests are written to a raw socket (an HTTP client would normalise ``..`` away)
with traversal fragments, encodings, NULs, absolute paths, garbage times and
headers. Every file the process opens meanwhile is seen through a Python audit
hook. The API must never answer 500, never return the secret planted beside the
spool (a random marker no request can echo) or a line of /etc/passwd, and never
open anything outside the data directory.

The requests are generated reproducibly (hypothesis with a fixed seed): every run
sends the same ones, and the test counts their answers itself.
"""

from __future__ import annotations

import secrets
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trio
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from support.api_agent import TOKEN, at, serve_agent

# Random per run: a response that holds it read the planted file; no request can
# echo it back in an error message, since no request contains it.
MARKER = b"SECRET-" + secrets.token_hex(16).encode() + b"-DO-NOT-SERVE"


def _passwd_root_line() -> bytes:
    """The real root line of /etc/passwd (what a leak of that file would hold)."""
    try:
        for line in Path("/etc/passwd").read_bytes().splitlines():
            if line.startswith(b"root:"):
                return line
    except OSError:
        pass
    return b"root:x:0:0:root:"


PASSWD_LINE = _passwd_root_line()

# ----------------------------------------------------------------------------
# Every file opened while the requests run


_opened: list[str] = []
_recording = threading.Event()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _recording.is_set() and args and isinstance(args[0], str | bytes):
        path = args[0]
        _opened.append(path.decode("utf-8", "replace") if isinstance(path, bytes) else path)


sys.addaudithook(_audit)  # cannot be removed; it only records while _recording is set


# ----------------------------------------------------------------------------
# The agent, served from a thread of its own so hypothesis can drive it


class BackgroundAgent:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.ready = threading.Event()
        self.port = 0
        self.segment_ids: list[str] = []
        self.error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        async def run() -> None:
            async with serve_agent(self.tmp_path) as s:
                assert s.agent.spool is not None
                self.segment_ids = [m.id for m, _ in s.agent.spool.list()]
                self.port = int(s.url.rpartition(":")[2])
                self._token = trio.lowlevel.current_trio_token()
                self._stop = trio.Event()
                self.ready.set()
                await self._stop.wait()

        try:
            trio.run(run)
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    def __enter__(self) -> BackgroundAgent:
        self._thread.start()
        assert self.ready.wait(60), "the agent did not start"
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None and self._stop is not None:
            self._token.run_sync_soon(self._stop.set)
        self._thread.join(30)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundAgent]:
    tmp_path = tmp_path_factory.mktemp("security")
    (tmp_path / "secret.txt").write_bytes(MARKER + b"\n")
    with BackgroundAgent(tmp_path) as agent:
        # A planted symlink inside the spool, under a valid id the index does not know.
        planted = tmp_path / "data" / "spool" / "sealed" / "20270115T080000.000Z-deadbeef"
        planted.mkdir(parents=True)
        (planted / "audio.wav").symlink_to(tmp_path / "secret.txt")
        yield agent


def request(port: int, target: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    """Send one raw HTTP/1.1 GET; return (status, whole response)."""
    head = b"GET " + target + b" HTTP/1.1\r\nHost: device\r\nConnection: close\r\n"
    head += b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head)
        parts = []
        while chunk := sock.recv(1 << 16):
            parts.append(chunk)
    data = b"".join(parts)
    status_line = data.split(b"\r\n", 1)[0].split()
    return int(status_line[1]) if len(status_line) > 1 else 0, data


def check(served: BackgroundAgent, target: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    status, data = request(served.port, target, headers)
    assert status != 0, target
    assert status < 500 or status == 503, (status, target, data[:500])
    assert MARKER not in data, target
    assert PASSWD_LINE not in data, target
    return status


def no_file_outside(served: BackgroundAgent) -> None:
    """Check (and forget) the files opened since the last check."""
    data_dir = (served.tmp_path / "data").resolve()
    opened = list(_opened)
    _opened.clear()
    for path in opened:
        low = path.lower()
        assert "secret" not in low and "passwd" not in low and "shadow" not in low, path
        p = Path(path)
        if p.is_absolute() and p.resolve().is_relative_to(served.tmp_path.resolve()):
            assert p.resolve().is_relative_to(data_dir), path


# ----------------------------------------------------------------------------
# Strategies

_ABS_SECRET = "%2F" + quote(str(Path("/tmp") / "secret.txt").lstrip("/"), safe="")
FRAGMENTS = [
    "..", ".", "/", "//", "%2e%2e", "%2E%2E", ".%2e", "%2e.", "%252e%252e", "..%2f", "..%2F",
    "..%5c", "%5c", "\\", "..\\", "%00", "%0a", "%0d%0a", "%c0%ae%c0%ae", "%ff", "%", "%zz",
    "etc", "passwd", "secret.txt", "%2fetc%2fpasswd", _ABS_SECRET, "~root", "meta", "sealed",
    "synced", "tmp", "spool", "audio.wav", "audio.opus", "*", ";x", "?", "#", "&", "=",
    "20270115T080000.000Z-deadbeef", "20270115T080000.000Z-deadbeef%0a",
    "20270115T080000.000Z-DEADBEEF", "20270115T080005.000Z-0", "\x7f", "%e2%80%ae",
]
_URL_SAFE = st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=" ")
piece = st.one_of(st.sampled_from(FRAGMENTS), st.text(_URL_SAFE, max_size=10))
tail = st.lists(piece, min_size=1, max_size=6).map("".join)

time_text = st.one_of(
    st.integers(-4000, 4000).map(lambda s: at(s / 10)),
    st.sampled_from(["", "Z", "now", "2027-01-15", "2027-01-15T08:00:30", "2027-13-45T99:99Z",
                     "9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "1e309", "nan", "-1",
                     "2027-01-15T08:00:30+25:00", "2027-01-15T08:00:30 01:00", "%00", "..",
                     "2027-01-15T08:00:30.123456789Z", "2027-01-15T08:00:30Z%00"]),
    st.text(_URL_SAFE, max_size=30),
)
number_text = st.one_of(st.integers(-10, 400000).map(str),
                        st.sampled_from(["", "0x10", "1e5", "nan", "inf", "48000.0", "١٢"]),
                        st.text(_URL_SAFE, max_size=8))


def q(value: str) -> str:
    return quote(value, safe="%:")


@st.composite
def valid_or(draw: st.DrawFn, valid: st.SearchStrategy[str],
             garbage: st.SearchStrategy[str]) -> str:
    """Mostly (7 in 8) valid values, so requests get past validation into deep code."""
    return draw(garbage if draw(st.integers(0, 7)) == 0 else valid)


@st.composite
def audio_target(draw: st.DrawFn) -> str:
    start = draw(st.floats(-30, 65))
    length = draw(st.floats(0.01, 8))
    params = {
        "start": draw(valid_or(st.just(at(start)), time_text)),
        "end": draw(valid_or(st.just(at(start + length)), time_text)),
    }
    optional = {
        "format": valid_or(st.sampled_from(["pcm", "wav", "opus", "flac"]),
                           st.sampled_from(["mp3", "", "PCM", "wav;x"])),
        "rate": valid_or(st.sampled_from(["8000", "16000", "22050", "48000"]), number_text),
        "channels": valid_or(st.sampled_from(["1", "2"]), number_text),
        "fill": valid_or(st.sampled_from(["silence", "none"]), st.text(_URL_SAFE, max_size=8)),
    }
    if draw(st.integers(0, 3)) == 0:  # sometimes a parameter that does not belong
        optional[draw(st.sampled_from(["bitrate", "x", "start", "access_token"]))] = number_text
    for name, values in optional.items():
        if draw(st.booleans()):
            params[name] = draw(values)
    items = [f"{k}={q(v)}" for k, v in params.items()]
    return "/v1/audio?" + "&".join(draw(st.permutations(items)))


@st.composite
def targets(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["segment", "meta", "root", "list", "audio", "transcripts",
                                 "live"]))
    if kind == "segment":
        return "/v1/segments/" + draw(tail)
    if kind == "meta":
        return "/v1/segments/" + draw(tail) + "/meta"
    if kind == "root":
        return "/" + draw(tail)
    if kind == "list":
        params = {"before": valid_or(st.sampled_from(FRAGMENTS[-5:-2]), tail),
                  "state": valid_or(st.sampled_from(["sealed", "synced", "quarantined"]), tail),
                  "limit": valid_or(st.sampled_from(["1", "3", "1000"]), number_text),
                  "since": time_text, "until": time_text}
        chosen = [f"{k}={q(draw(v))}" for k, v in params.items() if draw(st.booleans())]
        return "/v1/segments?" + "&".join(chosen)
    if kind == "transcripts":
        return f"/v1/transcripts?since={q(draw(time_text))}&until={q(draw(time_text))}"
    if kind == "live":
        return f"/v1/live?format={q(draw(tail))}&seconds={q(draw(number_text))}"
    return draw(audio_target())


header_values = st.one_of(
    st.sampled_from([b"bytes=0-10", b"bytes=-5", b"bytes=99999999999999999999-",
                     b"bytes=5-1", b"bytes=0-1,3-4", b"items=0-1", b"bytes=--1", b"\xff\xfe",
                     b'"' + b"0" * 64 + b'"', b"*"]),
    st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b))


@st.composite
def header_sets(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    auth = draw(st.sampled_from(["good", "good", "good", "none", "bad", "basic"]))
    out: list[tuple[bytes, bytes]] = []
    if auth == "good":
        out.append((b"Authorization", b"Bearer " + TOKEN.encode()))
    elif auth == "bad":
        out.append((b"Authorization", b"Bearer " + draw(header_values)))
    elif auth == "basic":
        out.append((b"Authorization", b"Basic " + TOKEN.encode()))
    for name in (b"Range", b"If-Range", b"If-None-Match"):
        if draw(st.booleans()):
            out.append((name, draw(header_values)))
    return out


# ----------------------------------------------------------------------------
# Tests


def test_generated_hostile_requests(served: BackgroundAgent) -> None:
    statuses: dict[int, int] = {}

    # A fixed seed: every run sends the same requests (about 180 of them are
    # served with 200), so the counts asserted below do not vary from run to run.
    @settings(max_examples=2500, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @seed(5)
    @given(target=targets(), headers=header_sets())
    def one_request(target: str, headers: list[tuple[bytes, bytes]]) -> None:
        _recording.set()
        try:
            status = check(served, target.encode("latin-1", "replace"), headers)
            statuses[status] = statuses.get(status, 0) + 1
        finally:
            _recording.clear()
        if target.startswith("/v1/segments/") and status == 200:
            # Only a real segment's file or metadata is ever served.
            seg = target.removeprefix("/v1/segments/").removesuffix("/meta")
            assert seg in served.segment_ids, target
        no_file_outside(served)

    one_request()
    # The run is only worth something if many requests were served, not just
    # refused at the door.
    print("statuses of the generated requests:", dict(sorted(statuses.items())))
    assert statuses.get(200, 0) >= 150
    assert statuses.get(400, 0) >= 150 and statuses.get(401, 0) >= 150
    assert statuses.get(404, 0) >= 20


def test_known_traversals(served: BackgroundAgent) -> None:
    auth = [(b"Authorization", b"Bearer " + TOKEN.encode())]
    _recording.set()
    try:
        for target in (b"/v1/segments/../../../../etc/passwd",
                       b"/v1/segments/..%2f..%2f..%2fsecret.txt",
                       b"/v1/segments/%2e%2e/%2e%2e/secret.txt",
                       b"/v1/segments/20270115T080000.000Z-deadbeef",  # the planted symlink
                       b"/v1/segments/20270115T080000.000Z-deadbeef/meta",
                       b"/v1/segments/20270115T080000.000Z-deadbeef%00.wav",
                       b"//etc/passwd", b"/v1/segments//etc/passwd",
                       b"/v1/segments/%2Fetc%2Fpasswd", b"/v1/audio/../segments/x",
                       b"http://device/v1/segments/../../secret.txt"):
            status = check(served, target, auth)
            assert status in (400, 404), (target, status)
    finally:
        _recording.clear()
    no_file_outside(served)
