"""The device page's server side: the page itself, signed media URLs and the level
stream, over real HTTP on loopback (the page in a real browser: test_device_page_browser)."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import numpy as np
import trio
import trio.testing

from edge_agent.api.signing import URL_SECONDS, MediaSigner
from edge_agent.audio.pcm import levels
from edge_agent.clock import iso_utc

from support.api_agent import SIGNAL, T0, TOKEN, serve_agent


async def test_the_page_and_its_files_need_no_token_and_run_only_their_own_code(
        tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as s, httpx.AsyncClient(base_url=s.url) as anyone:
        page = await anyone.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script src="/ui/page.js"' in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        script = await anyone.get("/ui/page.js")
        assert script.status_code == 200 and "EventSource" in script.text
        assert (await anyone.get("/ui/page.css")).status_code == 200
        # The data stays behind the token.
        assert (await anyone.get("/v1/status")).status_code == 401
        assert (await anyone.get("/ui/other.js")).status_code == 401


async def test_a_signed_media_url_plays_without_the_token_and_only_what_was_signed(
        tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as s, httpx.AsyncClient(base_url=s.url) as anyone:
        start, end = iso_utc(T0 + 2), iso_utc(T0 + 4)
        target = f"/v1/audio?start={start}&end={end}&format=wav"
        answer = await s.client.get("/v1/media-url", params={"path": target})
        assert answer.status_code == 200
        url = answer.json()["url"]
        assert TOKEN not in url and answer.json()["expires_in"] == URL_SECONDS
        signed = await anyone.get(url)
        assert signed.status_code == 200
        assert signed.content == (await s.client.get(target)).content
        # Any change to what was signed is refused.
        tampered = url.replace("T08%3A", "T07%3A", 1)
        refused = await anyone.get(tampered)
        assert refused.status_code == 401 and refused.json()["error"] == "invalid URL signature"
        # Only media routes are signed, and never with credentials inside.
        for bad in ("/v1/status", "https://elsewhere/v1/live", "/v1/live?access_token=x"):
            wrong = await s.client.get("/v1/media-url", params={"path": bad})
            assert wrong.status_code == 400 and wrong.json()["parameter"] == "path"
        # Asking for a signature needs the token itself.
        assert (await anyone.get("/v1/media-url", params={"path": target})).status_code == 401


async def test_signed_urls_expire(autojump_clock: trio.testing.MockClock) -> None:
    signer = MediaSigner(TOKEN)
    url, seconds = signer.sign("/v1/live", [("seconds", "60")])
    params = parse_qsl(urlsplit(url).query)
    assert signer.check("/v1/live", params) is None
    await trio.sleep(seconds + 1)
    assert "expired" in (signer.check("/v1/live", params) or "")
    # A new token voids what the old one signed.
    assert MediaSigner(TOKEN + "x").check("/v1/live", params) == "invalid URL signature"


async def read_events(client: httpx.AsyncClient, url: str, count: int) -> list[dict[str, float]]:
    events: list[dict[str, float]] = []
    async with client.stream("GET", url) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
                if len(events) == count:
                    break
    return events


async def test_the_level_stream_reports_the_newest_audio_ten_times_a_second(
        tmp_path: Path) -> None:
    async with serve_agent(tmp_path, max_live_listeners=1) as s, \
            httpx.AsyncClient(base_url=s.url, timeout=10) as anyone:
        url = (await s.client.get("/v1/media-url", params={"path": "/v1/levels"})).json()["url"]
        events = await read_events(anyone, url, 3)
        # Capture has ended: the newest 0.1 s of the scripted signal is what it measures.
        expected = levels(SIGNAL[-1600:].reshape(-1, 1))
        for event in events:
            assert abs(event["rms_dbfs"] - expected.rms_dbfs) < 0.05
            assert abs(event["peak_dbfs"] - expected.peak_dbfs) < 0.05
            assert event["clipped"] is False and event["overflow"] is False
        # One listener at a time here: a second is turned away while the first listens.
        async with anyone.stream("GET", url) as first:
            assert first.status_code == 200
            second = await anyone.get(url)
            assert second.status_code == 503
        assert np.isfinite(events[0]["seconds"]) and events[0]["seconds"] == 0.1
