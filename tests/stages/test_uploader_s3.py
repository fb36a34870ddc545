"""The "s3" target's decisions in virtual time: clock correction, what is retried,
what is named for a person, what is quarantined, and how requests are addressed.

A small S3 endpoint in memory (`FakeS3`, through `httpx.MockTransport`) answers
as AWS does where SeaweedFS answers differently (NoSuchBucket) and produces the
answers a real gateway cannot be made to give on cue (BadDigest, a 501). The
same uploader against a real SeaweedFS gateway is in
tests/integration/test_s3_seaweed.py.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from edge_agent.blocking import InlineRunner
from edge_agent.clock import ManualClock
from edge_agent.config import S3Config, UploadConfig
from edge_agent.spool import Spool
from edge_agent.uploader import Uploader
from edge_agent.wire import SegmentState

from support.spool_rig import DEVICE, open_spool, seal
from support.waiting import until

DEVICE_TIME = 1_900_000_000.0

Answer = Callable[[httpx.Request], httpx.Response | None]


def s3_error(status: int, code: str, message: str = "", **headers: str) -> httpx.Response:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message or code + ' happened'}</Message><RequestId>1</RequestId>"
            "</Error>")
    return httpx.Response(status, text=body, headers={"content-type": "application/xml",
                                                      **headers})


class FakeS3:
    """Objects by URL path; conditional PUTs checked against their digests, as S3 does.

    ``script`` answers the next requests first (an answer of None falls through).
    """

    def __init__(self, server_time: float = DEVICE_TIME) -> None:
        self.objects: dict[str, tuple[bytes, dict[str, str]]] = {}
        self.script: list[Answer] = []
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []  # Trio time of each request
        self.server_time = server_time

    async def handle(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        self.requests.append(request)
        self.times.append(trio.current_time())
        date = {"date": format_datetime(datetime.fromtimestamp(self.server_time, UTC),
                                        usegmt=True)}
        if self.script and (answer := self.script.pop(0)(request)) is not None:
            return answer
        signed = datetime.strptime(request.headers["x-amz-date"], "%Y%m%dT%H%M%SZ")
        if abs(signed.replace(tzinfo=UTC).timestamp() - self.server_time) > 900:
            return s3_error(403, "RequestTimeTooSkewed", **date)
        path = request.url.path
        if request.method == "HEAD":
            if path not in self.objects:
                return httpx.Response(404, headers=date)
            data, meta = self.objects[path]
            return httpx.Response(200, headers={**meta, **date,
                                                "content-length": str(len(data))})
        assert request.method == "PUT"
        digest = hashlib.sha256(body).digest()
        assert request.headers["x-amz-content-sha256"] == digest.hex()
        if request.headers["x-amz-checksum-sha256"] != base64.b64encode(digest).decode():
            return s3_error(400, "BadDigest", **date)
        if request.headers.get("if-none-match") == "*" and path in self.objects:
            return s3_error(412, "PreconditionFailed", **date)
        meta = {k: v for k, v in request.headers.items() if k.startswith("x-amz-meta-")}
        meta["x-amz-checksum-sha256"] = request.headers["x-amz-checksum-sha256"]
        self.objects[path] = (body, meta)
        return httpx.Response(200, headers=date)


def s3_config(tmp_path: Path, token: str | None = None, **s3: object) -> UploadConfig:
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = AKIDEXAMPLE\n"
                     "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY\n"
                     + (f"aws_session_token = {token}\n" if token else ""))
    section = S3Config(**{"endpoint": "http://store.test:9000", "bucket": "audio",
                          "credentials_file": str(creds), **s3})  # type: ignore[arg-type]
    return UploadConfig(enabled=True, target="s3", s3=section, backoff_initial_seconds=1.0,
                        backoff_max_seconds=8.0)


def uploader(tmp_path: Path, store: FakeS3, spool: Spool, clock: ManualClock | None = None,
             **s3: object) -> Uploader:
    return Uploader(s3_config(tmp_path, **s3), DEVICE, spool,  # type: ignore[arg-type]
                    clock=clock or ManualClock(utc_now=DEVICE_TIME),
                    transport=httpx.MockTransport(store.handle), runner=InlineRunner())


async def run_until(up: Uploader, done: Callable[[], bool], limit: float = 600) -> None:
    with trio.fail_after(limit):
        async with trio.open_nursery() as nursery:
            await nursery.start(up.run)
            await until(done, poll=0.5)
            nursery.cancel_scope.cancel()


async def test_a_skewed_clock_is_corrected_from_the_date_header_and_sent_again_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture,
) -> None:
    store = FakeS3(server_time=DEVICE_TIME + 3600)  # the device boots an hour behind
    spool = open_spool(tmp_path / "spool")
    meta = seal(spool)
    up = uploader(tmp_path, store, spool)
    await run_until(up, lambda: not spool.pending())
    assert store.times == [0.0, 0.0, 0.0]  # sent again at once, not after a backoff
    assert (up.stats.failures, up.stats.successes, up.stats.clock_offset_seconds) == (0, 1, 3600)
    first, second = store.requests[0], store.requests[1]
    assert first.headers["x-amz-date"] == "20300317T174640Z"
    assert second.headers["x-amz-date"] == "20300317T184640Z"
    assert second.url.path == first.url.path
    assert len(store.requests) == 3  # audio, audio again, sidecar
    lines = [r.getMessage() for r in caplog.records if "s3 clock corrected" in r.getMessage()]
    assert len(lines) == 1 and "offset_seconds=3600" in lines[0]
    assert spool.get(meta.id) == (meta, SegmentState.SYNCED)


async def test_a_missing_bucket_is_named_at_once_logged_once_and_never_quarantined(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture,
) -> None:
    store = FakeS3()
    store.script = [lambda r: s3_error(404, "NoSuchBucket")] * 5
    spool = open_spool(tmp_path / "spool")
    seal(spool)
    up = uploader(tmp_path, store, spool)
    await up.drain(give_up_on_retry=True)  # one attempt
    assert up.degraded() == ("status=404 NoSuchBucket: the store has no bucket audio; "
                             "check upload.s3.bucket")
    await run_until(up, lambda: not spool.pending())
    errors = [r.getMessage() for r in caplog.records
              if r.name == "edge_agent.uploader" and r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "upload.s3.bucket" in errors[0]
    assert (up.stats.failures, up.stats.quarantined, up.stats.successes) == (5, 0, 1)
    assert up.degraded() is None


@pytest.mark.parametrize(("answer", "setting"), [
    (s3_error(400, "BadDigest"), None),
    (s3_error(500, "InternalError"), None),
    (s3_error(503, "SlowDown"), None),
    (s3_error(409, "ConditionalRequestConflict"), None),
    (s3_error(403, "AccessDenied"), "upload.s3.bucket"),
    (s3_error(400, "AuthorizationHeaderMalformed"), "upload.s3.region"),
    (s3_error(501, "NotImplemented"), "upload.s3.endpoint"),
    (s3_error(400, "InvalidArgument", "x-amz-meta-{gaps} is not {allowed}"), "upload.s3"),
    (httpx.Response(403), "upload.s3"),
])
async def test_whatever_else_the_store_says_is_retried_never_quarantined(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, answer: httpx.Response,
    setting: str | None,
) -> None:
    store = FakeS3()
    store.script = [lambda r: answer]
    spool = open_spool(tmp_path / "spool")
    meta = seal(spool)
    up = uploader(tmp_path, store, spool)
    await up.drain(give_up_on_retry=True)  # one attempt
    assert up.stats.failures == 1
    reason = up.degraded()
    if setting is None:  # one failure is routine: health stays ok
        assert reason is None
    else:  # a person must act: health says so at once, naming the setting
        assert reason is not None and setting in reason
    await run_until(up, lambda: not spool.pending())
    assert spool.get(meta.id) == (meta, SegmentState.SYNCED)
    assert (up.stats.failures, up.stats.quarantined) == (1, 0)


async def test_an_object_there_without_a_digest_is_a_conflict(
    tmp_path: Path, autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeS3()
    spool = open_spool(tmp_path / "spool")
    meta = seal(spool)
    up = uploader(tmp_path, store, spool)
    key = f"/audio/{DEVICE}/2030/03/17/{meta.id}.opus"
    store.objects[key] = (b"someone else's", {})
    await run_until(up, lambda: not spool.pending())
    assert spool.get(meta.id) == (meta, SegmentState.QUARANTINED)
    reason = (spool.audio_path(meta.id).parent / "reason.txt").read_text()
    assert "another object" in reason and "no sha256" in reason
    assert store.objects[key][0] == b"someone else's"


async def test_a_412_that_cannot_be_read_back_names_the_missing_permission(
    tmp_path: Path, autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeS3()
    spool = open_spool(tmp_path / "spool")
    seal(spool)
    store.script = [lambda r: s3_error(412, "PreconditionFailed"),
                    lambda r: httpx.Response(403)]  # the HEAD: no s3:GetObject
    up = uploader(tmp_path, store, spool)
    await up.drain(give_up_on_retry=True)  # one attempt
    reason = up.degraded()
    assert reason is not None and "s3:GetObject" in reason and "AKIDEXAMPLE" in reason
    assert up.stats.quarantined == 0


async def test_virtual_hosted_requests_to_aws_are_signed_for_their_region(
    tmp_path: Path, autojump_clock: trio.testing.MockClock,
) -> None:
    store = FakeS3()
    spool = open_spool(tmp_path / "spool")
    meta = seal(spool)
    up = uploader(tmp_path, store, spool, token="FQoGZXIvYXdzEXAMPLETOKEN", endpoint="",
                  region="eu-west-1", addressing="virtual")
    await run_until(up, lambda: not spool.pending())
    audio, side = store.requests
    assert str(audio.url) == (f"https://audio.s3.eu-west-1.amazonaws.com/{DEVICE}/2030/03/17/"
                              f"{meta.id}.opus")
    assert side.url.path == audio.url.path + ".json"
    auth = audio.headers["authorization"]
    assert auth.startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20300317/eu-west-1/s3/"
                           "aws4_request, SignedHeaders=content-type;host;if-none-match;")
    assert "x-amz-checksum-sha256;x-amz-content-sha256;x-amz-date;x-amz-meta-" in auth
    assert "user-agent" not in auth and "accept-encoding" not in auth
    assert audio.headers["x-amz-security-token"] == "FQoGZXIvYXdzEXAMPLETOKEN"
    for request in store.requests:
        assert not any("wJalrXUtnFEMI" in v for v in request.headers.values())
