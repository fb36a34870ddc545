"""The device page in a real browser: Debian's Chromium, driven by Playwright.

One agent on loopback for the module, run by Trio in a thread of its own: its
capture plays the bundled speech sample at real time and then a tone whose level
the tests change; segments and STT chunks go to the reference backend. The tests
use the page as an installer would, in order: a wrong token, the right one, the
meter, listening, the timeline and a download, transcripts, a recording, and the
layout on a 360 px phone screen. ``EDGE_AGENT_SCREENSHOTS=DIR`` keeps the
screenshots (the README's come from here).
"""

from __future__ import annotations

import math
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from playwright.sync_api import Browser, Page, expect, sync_playwright

from edge_agent.agent import Agent
from edge_agent.audio.pcm import SampleFormat, read_wav
from edge_agent.capture import Block, SourceStats
from edge_agent.clock import SystemClock
from edge_agent.config import validate
from edge_agent.reference import Backend, run_backend

RATE = 16000
BLOCK = 320
TOKEN = "browser-test-token-0123456789"
SPEECH_WORDS = ("quick", "brown", "fox", "lazy", "dog", "please", "stella", "store")


class SpeechThenTone:
    """The speech sample once, then a 440 Hz tone at `rms_dbfs` (read per block, so
    a test can turn it up or down), paced at real time."""

    channels, format = 1, SampleFormat.INT16

    def __init__(self) -> None:
        self.rate = RATE
        self.stats = SourceStats()
        speech, rate = read_wav(Path(str(resources.files("edge_agent") / "data" / "speech.wav")))
        assert rate == RATE
        self.speech = speech[:, :1]
        self.rms_dbfs = -20.0
        self.clock = SystemClock()

    @property
    def speech_done(self) -> bool:
        return self.stats.frames > len(self.speech)

    @asynccontextmanager
    async def open(self) -> AsyncIterator[AsyncIterator[Block]]:
        yield self._blocks()

    async def _blocks(self) -> AsyncIterator[Block]:
        start, utc0, mono0 = trio.current_time(), self.clock.utc(), self.clock.mono()
        pos = 0
        while True:
            if pos + BLOCK <= len(self.speech):
                frames = self.speech[pos:pos + BLOCK]
            else:
                amplitude = 10 ** (self.rms_dbfs / 20) * math.sqrt(2)
                t = (pos + np.arange(BLOCK)) / RATE
                tone = amplitude * np.sin(2 * np.pi * 440 * t) * 32767
                frames = tone.astype(np.int16).reshape(-1, 1)
            await trio.sleep_until(start + (pos + BLOCK) / RATE)
            self.stats.blocks += 1
            self.stats.frames += BLOCK
            yield Block(frames, utc0 + pos / RATE, mono0 + pos / RATE)
            pos += BLOCK


@dataclass
class Device:
    url: str
    source: SpeechThenTone
    data_dir: Path


def agent_config(tmp: Path, backend_url: str) -> Any:
    token = tmp / "token"
    token.write_text(TOKEN + "\n")
    return validate({
        "device": {"id": "page-test", "data_dir": str(tmp / "data")},
        "capture": {"source": "tone", "rate": RATE, "channels": 1, "format": "int16"},
        "ring": {"seconds": 60},
        "segments": {"seconds": 5, "format": "opus", "min_free_mb": 0},
        "upload": {"enabled": True,
                   "url": backend_url + "/v1/devices/{device}/segments/{segment}"},
        "stt": {"enabled": True, "protocol": "raw", "url": backend_url + "/v1/stt/raw",
                "chunking": "vad"},
        "api": {"enabled": True, "listen": "127.0.0.1:0", "token_file": str(token)},
    })


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    tmp = tmp_path_factory.mktemp("page")
    source = SpeechThenTone()
    started: dict[str, Any] = {}
    ready = threading.Event()

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            backend_url = await nursery.start(run_backend, Backend(tmp / "backend"),
                                              "127.0.0.1:0")
            agent = Agent(agent_config(tmp, backend_url), source=source)
            await nursery.start(agent.run)
            assert agent.api is not None
            await agent.api.serving.wait()
            started.update(url=agent.api.url, scope=nursery.cancel_scope,
                           trio=trio.lowlevel.current_trio_token())
            ready.set()

    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    assert ready.wait(60), "the agent did not start"
    yield Device(started["url"], source, tmp / "data")
    started["trio"].run_sync_soon(started["scope"].cancel)
    thread.join(30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed (scripts/bootstrap --dev installs it)"
    with sync_playwright() as playwright:
        yield playwright.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
            "--disable-background-networking", "--disable-component-update",
            "--autoplay-policy=no-user-gesture-required"])


@pytest.fixture(scope="module")
def page(browser: Browser, device: Device) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 1000},
                                  accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(20_000)
    yield page
    context.close()


def screenshot(page: Page, name: str) -> None:
    folder = os.environ.get("EDGE_AGENT_SCREENSHOTS")
    if folder:
        page.screenshot(path=str(Path(folder) / name), full_page=True)


def test_a_wrong_token_gets_a_message_on_the_page(page: Page, device: Device) -> None:
    page.goto(device.url + "/")
    expect(page.locator("#login")).to_be_visible()
    page.fill("#token", "not-the-token-at-all")
    page.click("#login-form button")
    expect(page.locator("#login-error")).to_contain_text("did not accept that token")
    expect(page.locator("#main")).to_be_hidden()
    assert "{" not in page.locator("#login-error").inner_text()  # no raw JSON


def test_with_the_token_the_page_shows_health_and_facts(page: Page, device: Device) -> None:
    page.fill("#token", TOKEN)
    page.click("#login-form button")
    expect(page.locator("#main")).to_be_visible()
    expect(page.locator("#device-name")).to_have_text("page-test")
    expect(page.locator("#components li").first).to_be_visible()
    expect(page.locator("#components")).to_contain_text("capture")
    expect(page.locator("#facts")).to_contain_text("Uptime")
    assert page.locator("#overall").inner_text() in ("ok", "degraded")
    # The token is kept for this tab only, never in the address.
    assert TOKEN not in page.url


def rms_shown(page: Page, target: float) -> None:
    page.wait_for_function(
        "target => Math.abs(parseFloat(document.getElementById('rms').value) - target) < 1",
        arg=target)


def test_the_level_meter_shows_the_tone_and_follows_it(page: Page, device: Device) -> None:
    deadline = time.monotonic() + 30
    while not device.source.speech_done and time.monotonic() < deadline:
        time.sleep(0.2)
    device.source.rms_dbfs = -20.0
    rms_shown(page, -20.0)
    assert abs(float(page.locator("#rms").inner_text()) + 20.0) < 1.0
    bar = "el => parseFloat(el.style.width)"  # the bar's length, in % of the meter
    width_loud = page.eval_on_selector("#rms-bar", bar)
    device.source.rms_dbfs = -35.0
    rms_shown(page, -35.0)
    width_quiet = page.eval_on_selector("#rms-bar", bar)
    assert width_quiet == pytest.approx(width_loud - 25, abs=2.5)  # 15 dB of 60
    expect(page.locator("#clip")).to_be_hidden()
    device.source.rms_dbfs = -20.0
    rms_shown(page, -20.0)
    screenshot(page, "device-page.png")


def test_the_listen_button_plays_the_microphone(page: Page, device: Device) -> None:
    page.click("#listen")
    page.wait_for_function("() => document.getElementById('live').currentTime > 1.0")
    expect(page.locator("#listen")).to_have_text("Stop")
    page.click("#listen")
    expect(page.locator("#listen")).to_have_text("Listen live")


def test_the_timeline_lists_segments_and_a_chosen_one_downloads_whole(
        page: Page, device: Device, tmp_path: Path) -> None:
    sealed = page.locator("#timeline .seg")
    page.wait_for_function("() => document.querySelectorAll('#timeline .seg').length >= 2")
    first = sealed.first
    first.click()  # a tap chooses the whole segment
    start = page.input_value("#range-start")
    end = page.input_value("#range-end")
    seconds = (np.datetime64(end.rstrip("Z")) - np.datetime64(start.rstrip("Z"))) \
        / np.timedelta64(1, "ms") / 1000
    assert 0 < seconds <= 5.0
    page.select_option("#range-format", "wav")
    page.click("#play-range")
    page.wait_for_function(
        "() => document.getElementById('range-audio').currentTime > 0.2")
    with page.expect_download() as info:
        page.click("#download")
    path = tmp_path / "range.wav"
    info.value.save_as(path)
    audio, rate = read_wav(path)
    assert rate == RATE
    assert len(audio) == pytest.approx(seconds * RATE, abs=1)


def test_a_transcript_of_the_speech_appears(page: Page, device: Device) -> None:
    page.wait_for_function(
        "words => words.some(w => document.getElementById('transcripts').innerText"
        ".toLowerCase().includes(w))", arg=list(SPEECH_WORDS), timeout=60_000)


def test_a_named_recording_starts_and_stops(page: Page, device: Device) -> None:
    page.fill("#rec-name", "site-check")
    page.click("#rec-start")
    row = page.locator("#recordings li", has_text="site-check")
    expect(row.first).to_contain_text("recording")
    time.sleep(1.0)
    row.first.locator("button").click()
    expect(row.first).not_to_contain_text("recording", timeout=20_000)


def test_the_layout_holds_on_a_phone(page: Page, device: Device) -> None:
    page.set_viewport_size({"width": 360, "height": 740})
    page.wait_for_timeout(300)
    overflow = page.evaluate(
        "() => document.documentElement.scrollWidth - document.documentElement.clientWidth")
    wide = page.evaluate("""() => [...document.querySelectorAll('body *')]
        .filter(el => el.getBoundingClientRect().right > 361)
        .map(el => el.tagName + '#' + el.id + '.' + el.className).slice(0, 8)""")
    assert overflow <= 0, f"the page is {overflow} px wider than a 360 px screen: {wide}"
    for card in ("#level-card", "#timeline-card", "#recording-card"):
        box = page.locator(card).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 360
    screenshot(page, "device-page-phone.png")
