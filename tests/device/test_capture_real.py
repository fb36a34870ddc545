"""Capture through a real audio stack, no mocks.

A PulseAudio daemon with a null sink is started from the test; speech played
into the sink is captured from its monitor through ALSA's `pulse` plugin,
PortAudio and `SoundDeviceSource`, by device name, exactly as on a device.
A second stack is ALSA's `file` plugin reading a raw file. The hot-plug test
unloads the sink mid-capture (the device vanishes) and loads it again.

These tests skip only when the system packages are missing (scripts/bootstrap
--dev installs them: pulseaudio, pulseaudio-utils, libasound2-plugins,
libportaudio2).
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from edge_agent.agent import Agent
from edge_agent.audio.pcm import SampleFormat, levels, read_wav, write_wav
from edge_agent.audio.resample import StreamResampler
from edge_agent.capture import SoundDeviceSource, list_input_devices
from edge_agent.capture.levels import run_levels
from edge_agent.clock import SystemClock
from edge_agent.config import validate
from edge_agent.demo import sample_path
from edge_agent.supervisor import Backoff

pytestmark = pytest.mark.slow

RATE = 48000
SINK = "edge_test"
MIC = "edge_test_mic"


def _missing_packages() -> str | None:
    missing = [tool for tool in ("pulseaudio", "pactl", "paplay") if not shutil.which(tool)]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install pulseaudio pulseaudio-utils)"
    if not glob.glob("/usr/lib/*/alsa-lib/libasound_module_pcm_pulse.so") and not glob.glob(
        "/usr/lib/alsa-lib/libasound_module_pcm_pulse.so"
    ):
        return "ALSA pulse plugin not installed (apt-get install libasound2-plugins)"
    try:
        list_input_devices()
    except Exception as exc:
        return f"PortAudio unusable: {exc}"
    return None


@dataclass
class Pulse:
    """A private PulseAudio daemon and the environment that points ALSA at it."""

    home: Path
    socket: Path
    env: dict[str, str]
    sink_module: str = ""

    def pactl(self, *args: str) -> str:
        out = subprocess.run(["pactl", *args], env=self.env, capture_output=True, text=True,
                             timeout=10, check=True)
        return out.stdout.strip()

    def load_sink(self) -> None:
        self.sink_module = self.pactl("load-module", "module-null-sink", f"sink_name={SINK}",
                                      f"rate={RATE}", "channels=1", "format=s16le")

    def unload_sink(self) -> None:
        self.pactl("unload-module", self.sink_module)

    def play_cmd(self, wav: Path) -> list[str]:
        return ["paplay", f"--server=unix:{self.socket}", f"--device={SINK}", str(wav)]


@pytest.fixture(scope="module")
def pulse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pulse]:
    reason = _missing_packages()
    if reason:
        pytest.skip(reason)
    home = tmp_path_factory.mktemp("pulse")
    socket = home / "native"
    (home / "run").mkdir()
    script = home / "default.pa"
    script.write_text(
        f"load-module module-native-protocol-unix socket={socket} auth-anonymous=1\n"
    )
    client_conf = home / "client.conf"
    client_conf.write_text("autospawn = no\n")
    # The ALSA PCM PortAudio will list by name: the sink's monitor on our server.
    (home / ".asoundrc").write_text(
        f'pcm.{MIC} {{\n  type pulse\n  device "{SINK}.monitor"\n  server "unix:{socket}"\n}}\n'
    )
    env = {"HOME": str(home), "PULSE_RUNTIME_PATH": str(home / "run"),
           "PULSE_SERVER": f"unix:{socket}", "PULSE_CLIENTCONFIG": str(client_conf)}
    log = (home / "pulseaudio.log").open("w")
    daemon = subprocess.Popen(
        ["pulseaudio", "--daemonize=no", "--exit-idle-time=-1", "--system=false", "-n",
         "-F", str(script), "--use-pid-file=no", "--log-target=stderr"],
        env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
    )
    server = Pulse(home, socket, {**os.environ, **env})
    try:
        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(subprocess.CalledProcessError):
                server.pactl("info")
                break
            if daemon.poll() is not None or time.monotonic() > deadline:
                pytest.fail("pulseaudio did not start:\n" + (home / "pulseaudio.log").read_text())
            time.sleep(0.1)
        server.load_sink()
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            yield server
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)
        log.close()
        # Forget the test PCMs so later tests see this machine's own devices.
        with contextlib.suppress(Exception):
            list_input_devices(refresh=True)


def speech_48k(seconds: tuple[float, float]) -> np.ndarray[Any, Any]:
    """An excerpt of the bundled speech at the sink's rate, so nothing resamples it again."""
    x, rate = read_wav(sample_path())
    part = x[int(seconds[0] * rate): int(seconds[1] * rate)]
    rs = StreamResampler(rate, RATE, 1)
    y = np.concatenate([rs.process(part.astype(np.float32) / 32768), rs.flush()])
    out: np.ndarray[Any, Any] = np.round(np.clip(y, -1, 1) * 32767).astype(np.int16)
    return out.reshape(-1, 1)


def align(captured: np.ndarray[Any, Any], ref: np.ndarray[Any, Any]) -> tuple[int, float]:
    """Offset of `ref` inside `captured` and their correlation coefficient there."""
    c = captured[:, 0].astype(np.float64)
    r = ref[:, 0].astype(np.float64)
    n = 1 << int(np.ceil(np.log2(len(c) + len(r))))
    xcorr = np.fft.irfft(np.fft.rfft(c, n) * np.conj(np.fft.rfft(r, n)), n)[: len(c) - len(r) + 1]
    lag = int(np.argmax(xcorr))
    return lag, float(np.corrcoef(c[lag: lag + len(r)], r)[0, 1])


def onset(x: np.ndarray[Any, Any]) -> int:
    return int(np.argmax(np.abs(x[:, 0].astype(np.int32)) > 2000))


def agent_config(tmp_path: Path) -> dict[str, Any]:
    return {
        "device": {"data_dir": str(tmp_path / "data")},
        "capture": {"source": "sounddevice", "device": MIC, "rate": RATE, "channels": 1,
                    "format": "int16", "stall_seconds": 2.0},
        "ring": {"seconds": 20},
        "segments": {"enabled": False},  # the spool has its own tests; this is about capture
    }


async def wait_until(predicate: Any, limit: float, what: str) -> None:
    """Poll the agent's state (it has no event for each of these moments)."""
    with trio.move_on_after(limit):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.02)
        return
    pytest.fail(f"timed out after {limit} s waiting for {what}")


async def test_speech_played_into_pulseaudio_is_captured_at_real_time(
    pulse: Pulse, tmp_path: Path
) -> None:
    ref = speech_48k((0.25, 2.75))
    wav = tmp_path / "speech48k.wav"
    write_wav(wav, ref, RATE)
    agent = Agent(validate(agent_config(tmp_path)), clock=SystemClock())
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await wait_until(lambda: agent.ring.head > 0, 10, "the first captured block")
        first_block = time.monotonic()
        launched = time.monotonic()
        await trio.run_process(pulse.play_cmd(wav))
        await trio.sleep(0.3)  # the tail still in the server's and PortAudio's buffers
        agent.stop()
    wall = time.monotonic() - first_block
    ring = agent.ring
    captured = ring.read(ring.tail, ring.head)
    lag, corr = align(captured, ref)
    heard = ring.index_to_mono(ring.tail + lag + onset(ref))
    expected = launched + onset(ref) / RATE
    pace = (ring.head / RATE) / wall
    print(f"captured {ring.head / RATE:.2f} s of audio in {wall:.2f} s wall (pace {pace:.3f}); "
          f"correlation {corr:.4f}; speech onset stamped {heard - expected:+.3f} s after it "
          f"was played; overflows {agent.source.stats.input_overflows}, "
          f"resyncs {agent.source.stats.timeline_resyncs}")
    assert isinstance(agent.source, SoundDeviceSource)
    assert agent.source.device_name == MIC
    assert agent.tasks["capture"].failures == 0
    # The whole excerpt arrived, contiguous and undistorted.
    assert corr > 0.98
    assert levels(captured[lag: lag + len(ref)]).peak_dbfs == pytest.approx(
        levels(ref).peak_dbfs, abs=0.5)
    # Audio arrives at the device's pace, not faster or much slower.
    assert 0.75 < pace < 1.33
    # Capture timestamps are not before the sound was played (PortAudio's buffer, tens
    # of ms, is the most a believed latency report can be off), nor far after.
    assert -0.1 < heard - expected < 2.0
    assert ring.gaps(0, ring.head) == []


async def test_level_meter_reads_the_real_device(pulse: Pulse, tmp_path: Path) -> None:
    ref = speech_48k((0.25, 2.0))
    wav = tmp_path / "speech48k.wav"
    write_wav(wav, ref, RATE)
    source = SoundDeviceSource(MIC, RATE, 1, SampleFormat.INT16, SystemClock())
    out = io.StringIO()
    async with trio.open_nursery() as nursery:
        # The meter opens the device (PortAudio through PulseAudio), then speech plays.
        nursery.start_soon(lambda: run_levels(source, out, seconds=3.0))
        await wait_until(lambda: source.stats.blocks > 0, 10, "the meter's first block")
        await trio.run_process(pulse.play_cmd(wav))
    lines = out.getvalue().splitlines()
    peaks = [float(line.split("peak")[1].split()[0]) for line in lines]
    print(f"{len(lines)} readings, loudest {max(peaks):.1f} dBFS; the file peaks at "
          f"{levels(ref).peak_dbfs:.1f} dBFS")
    assert len(lines) == 30  # ten readings a second of audio
    assert max(peaks) == pytest.approx(levels(ref).peak_dbfs, abs=0.5)
    assert min(peaks) < -60  # and silence before the speech reads as silence


async def test_alsa_file_plugin_is_read_bit_exact_by_name(tmp_path: Path) -> None:
    reason = _missing_packages()
    if reason and "PortAudio" in reason:
        pytest.skip(reason)
    ref = speech_48k((0.5, 1.5))
    raw = tmp_path / "speech.raw"
    raw.write_bytes(ref.astype("<i2").tobytes())
    (tmp_path / ".asoundrc").write_text(
        f'pcm.edge_file_mic {{\n  type file\n  slave.pcm "null"\n  file "/dev/null"\n'
        f'  infile "{raw}"\n  format "raw"\n}}\n'
    )
    source = SoundDeviceSource("edge_file_mic", RATE, 1, SampleFormat.INT16, SystemClock(),
                               queue_blocks=1000)
    got: list[np.ndarray[Any, Any]] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(tmp_path))
        try:
            async with source.open() as blocks:
                async for block in blocks:
                    got.append(block.frames)
                    if sum(map(len, got)) >= len(ref):
                        break
        finally:
            mp.undo()
            await trio.to_thread.run_sync(lambda: list_input_devices(refresh=True))
    audio = np.concatenate(got)
    # The null slave is not paced: blocks come as fast as PortAudio can loop.
    print(f"read {len(audio)} frames in {len(got)} blocks; queue drops: "
          f"{source.stats.queue_drops}")
    assert source.device_name == "edge_file_mic"
    assert np.array_equal(audio[: len(ref)], ref)


async def test_device_unplugged_and_replugged_mid_capture(pulse: Pulse, tmp_path: Path) -> None:
    agent = Agent(validate(agent_config(tmp_path)), clock=SystemClock(),
                  backoff=Backoff(initial=0.2, maximum=0.5, jitter=0.0))
    ref = speech_48k((0.25, 1.75))
    wav = tmp_path / "speech48k.wav"
    write_wav(wav, ref, RATE)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        await wait_until(lambda: agent.ring.head >= RATE // 2, 10, "half a second of audio")
        unplugged = time.monotonic()
        await trio.to_thread.run_sync(pulse.unload_sink)
        await wait_until(lambda: "capture" in agent.degraded(), 5, "health to say degraded")
        degraded = agent.degraded()["capture"]
        head_at_loss = agent.ring.head
        await trio.sleep(1.0)
        assert agent.ring.head == head_at_loss  # nothing captured while the device is gone
        await trio.to_thread.run_sync(pulse.load_sink)
        replugged = time.monotonic()
        await wait_until(lambda: agent.ring.head > head_at_loss, 10, "capture to resume")
        resumed = time.monotonic()
        await trio.run_process(pulse.play_cmd(wav))
        await trio.sleep(0.3)
        agent.stop()
    ring, stats = agent.ring, agent.source.stats
    gaps = ring.gaps(0, ring.head)
    print(f"health while unplugged: {degraded!r}; sink away {replugged - unplugged:.2f} s, "
          f"capture back {resumed - unplugged:.2f} s after the unplug; gaps "
          f"{[(g.index, round(g.seconds, 3)) for g in gaps]}; opens {stats.opens}, "
          f"failures {agent.tasks['capture'].failures}")
    assert "stopped delivering audio" in degraded or "cannot" in degraded
    assert agent.tasks["capture"].failures >= 1
    assert stats.opens >= 2
    assert len(gaps) == 1
    gap = gaps[0]
    # The hole is at least as long as the sink was away, and ends when capture came back.
    assert replugged - unplugged - 0.3 < gap.seconds < resumed - unplugged + 0.5
    after = ring.read(gap.index, ring.head)
    _, corr = align(after, ref)
    print(f"speech after the re-plug: correlation {corr:.4f}")
    assert corr > 0.98  # the re-opened device (found by name) delivers the real audio
