"""Requests found by testing from outside that used to crash or mislead the API:
each now gets a 4xx with the documented error shape, and nothing is served wrong."""

from __future__ import annotations

import hashlib
from pathlib import Path

import trio

from support.api_agent import T0, TOKEN, serve_agent


async def raw_request(url: str, head: bytes) -> bytes:
    """Send ``head`` in one write on a fresh connection; the whole answer."""
    host, _, port = url.removeprefix("http://").partition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(head)
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(1 << 16):
                data += chunk
    return data


async def test_a_request_head_over_the_limit_is_refused_however_it_arrives(
        tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as s:
        head = (b"GET /v1/status HTTP/1.1\r\nHost: device\r\nConnection: close\r\n"
                b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                b"X-Padding: " + b"a" * (20 * 1024) + b"\r\n\r\n")
        answer = await raw_request(s.url, head)
        assert answer.startswith(b"HTTP/1.1 431 ")
        assert b'"status":431' in answer and b'"parameter":"headers"' in answer
        metrics = (await s.client.get("/metrics")).text
        assert "edge_agent_api_heads_refused_total 1.0" in metrics


async def test_no_redirect_is_built_from_the_host_header(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as s:
        r = await s.client.get("/v1/segments/", headers={"Host": "evil.example"})
        assert r.status_code == 404
        assert "location" not in r.headers
        assert r.json()["status"] == 404


async def test_times_the_device_cannot_hold_are_a_400_naming_the_parameter(
        tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as s:
        for start, end, bad in (("0001-01-01T00:00:00+23:59", "2027-01-15T08:00:00Z", "start"),
                                ("2027-01-15T08:00:00Z", "9999-12-31T23:59:59-23:59", "end")):
            r = await s.client.get("/v1/audio", params={"start": start, "end": end})
            assert r.status_code == 400, r.text
            assert r.json()["parameter"] == bad


async def test_recordings_errors_have_the_documented_shape(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as s:
        r = await s.client.post("/v1/recordings/no-such-recording/stop")
        assert r.status_code >= 400
        body = r.json()
        assert body["status"] == r.status_code and body["error"]


async def test_a_quarantined_segment_is_served_without_a_tag_its_bytes_do_not_match(
        tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as s:
        spool = s.agent.spool
        assert spool is not None
        meta, _state = spool.list(since=T0 + 20, until=T0 + 25)[0]
        path = spool.audio_path(meta.id)
        path.write_bytes(path.read_bytes()[:-100])  # bit rot the uploader caught
        spool.quarantine(meta.id, "digest mismatch")
        path = spool.audio_path(meta.id)
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() != meta.sha256
        r = await s.client.get(f"/v1/segments/{meta.id}",
                               headers={"If-None-Match": f'"{meta.sha256}"'})
        assert r.status_code == 200 and r.content == data
        assert "etag" not in r.headers
        # A sealed segment still carries its digest as a strong tag, also matched weakly.
        other, _ = spool.list(since=T0 + 25, until=T0 + 30)[0]
        tagged = await s.client.get(f"/v1/segments/{other.id}",
                                    headers={"If-None-Match": f'W/"{other.sha256}"'})
        assert tagged.status_code == 304
