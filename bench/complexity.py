"""8: Opus complexity, what each setting costs and keeps. For complexity 10 down
to 0 and both of the agent's Opus encoders (STT chunks: 16 kHz mono at the
``stt`` bit rate, cut as `encode_chunk` cuts them; segments: 48 kHz mono at the
``segments`` bit rate, fed as the segmenter feeds it):

* CPU of the encode alone per audio hour (process CPU time, the least of a few
  passes over the speech workload, complexities interleaved so load hits all alike);
* word accuracy of the reference recogniser (pocketsphinx, as the reference
  backend runs it) on the bundled sample, encoded and decoded;
* fidelity of the decoded workload: SNR against the original after alignment,
  and the log-spectral distance over the speech band.

`pick_complexity` applies the stated rule to choose a default. Imports
`edge_agent` as an installed library only.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from bench.common import cpu_seconds, loadavg
from edge_agent.audio.encoders import make_encoder
from edge_agent.audio.opus import COMPLEXITIES, DECODE_RATE, decode_ogg_opus
from edge_agent.audio.pcm import SampleFormat, from_float32, read_wav, to_float32
from edge_agent.audio.resample import resample
from edge_agent.config import SegmentsConfig, SttConfig
from edge_agent.demo import sample_path
from edge_agent.reference.stt import SttReceiver, word_accuracy
from edge_agent.stt.protocols import APPLICATION as STT_APPLICATION
from edge_agent.stt.protocols import encode_chunk

__all__ = [
    "COMPLEXITY_RULE",
    "aligned",
    "default_complexities",
    "lsd_db",
    "measure_complexity",
    "opusenc_comp_args",
    "pick_complexity",
    "snr_db",
]

#: Complexity 10 (libopus's default) first: every other figure is compared with it.
ORDER: Final = tuple(sorted(COMPLEXITIES, reverse=True))
#: Fidelity a default may give up against complexity 10.
MAX_SNR_LOSS_DB: Final = 1.0
MAX_LSD_GROWTH_DB: Final = 0.5
COMPLEXITY_RULE: Final = (
    "the lowest complexity c such that every complexity from c up to 10 loses at most "
    f"{MAX_SNR_LOSS_DB:g} dB of SNR and adds at most {MAX_LSD_GROWTH_DB:g} dB of "
    "log-spectral distance against complexity 10, and c recognises the sample at least "
    "as well as complexity 10 (mean word accuracy over the renditions)")
# Speech workload encoded per pass, and passes (the least CPU counts).
_SECONDS: Final = {"full": 60.0, "tiny": 6.0}
_PASSES: Final = {"full": 3, "tiny": 1}
_TINY_ORDER: Final = (10, 5, 0)
# The sample is recognised in a few renditions, each starting a few milliseconds
# later (so codec and recogniser frames fall elsewhere): one rendition's word
# accuracy swings by several words with such a shift, even uncompressed.
_SHIFTS_MS: Final = {"full": (0.0, 2.5, 5.0, 7.5), "tiny": (0.0,)}
# The sample is 16 kHz audio: its speech lies below 8 kHz at either rate.
_SPEECH_BAND_HZ: Final = 8000
# Frames of the log-spectral distance, and which count as speech.
_FRAME_S: Final = 0.032
_SPEECH_FRAME_DB: Final = 35.0
_MAX_LAG_S: Final = 0.02


#: The default capture rate: what segments are encoded at on a device.
SEGMENT_RATE: Final = 48000


@dataclass(frozen=True)
class EncoderSetup:
    """One of the agent's Opus encoders as its config defaults set it up."""

    name: str
    rate: int
    bitrate: int
    application: str
    config_default: int
    encode_file: Callable[[NDArray[np.int16], int], bytes]
    """Mono int16 at `rate` and a complexity -> one Ogg Opus file, as the agent writes it."""
    file_seconds: float | None = None
    """Longer audio is cut into files this long (None: one file)."""

    def encode(self, pcm: NDArray[np.int16], complexity: int) -> list[bytes]:
        step = len(pcm) if self.file_seconds is None else round(self.file_seconds * self.rate)
        return [self.encode_file(pcm[i:i + step], complexity) for i in range(0, len(pcm), step)]


def _stt_file(pcm: NDArray[np.int16], complexity: int) -> bytes:
    cfg = SttConfig()
    return encode_chunk(pcm, cfg.rate, cfg.bitrate, complexity)


def _segment_file(pcm: NDArray[np.int16], complexity: int) -> bytes:
    """A segment fed in 1 s batches, with the spool's encoder settings."""
    enc = make_encoder("opus", SEGMENT_RATE, 1, SampleFormat.INT16,
                       bitrate=SegmentsConfig().bitrate, complexity=complexity, comments={})
    out = bytearray(enc.start())
    try:
        for i in range(0, len(pcm), SEGMENT_RATE):
            out += enc.write(pcm[i:i + SEGMENT_RATE])
        out += enc.finish()[0]
    finally:
        enc.close()
    return bytes(out)


#: The workload goes to STT in the streamer's fixed chunks (as the CPU benchmark
#: sends it); the sample is encoded as one file, either way.
ENCODERS: Final = (
    EncoderSetup("stt", SttConfig().rate, SttConfig().bitrate, STT_APPLICATION,
                 SttConfig().complexity, _stt_file, SttConfig().chunk_seconds),
    EncoderSetup("segments", SEGMENT_RATE, SegmentsConfig().bitrate, "audio",
                 SegmentsConfig().complexity, _segment_file),
)


def default_complexities() -> dict[str, int]:
    """The complexity each of the agent's Opus encoders uses by default."""
    return {e.name: e.config_default for e in ENCODERS}


def opusenc_comp_args(encoder: str) -> list[str]:
    """``opusenc`` options for the complexity the agent's `encoder` (``stt`` or
    ``segments``) uses by default, so the C comparison encodes alike."""
    return ["--comp", str(default_complexities()[encoder])]


def _decoded(files: list[bytes], rate: int) -> NDArray[np.float32]:
    """The files decoded one after another, mono at `rate`."""
    pcm = np.concatenate([decode_ogg_opus(f).pcm[:, 0] for f in files])
    return pcm if rate == DECODE_RATE else resample(pcm, DECODE_RATE, rate)


def aligned(ref: NDArray[Any], dec: NDArray[Any], rate: int,
            ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """`ref` and `dec` cut to their common span after shifting `dec` by the lag
    (within 20 ms) that maximises their cross-correlation."""
    n = min(len(ref), len(dec))
    r, d = ref[:n].astype(np.float64), dec[:n].astype(np.float64)
    size = 1 << (2 * n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(d, size) * np.conj(np.fft.rfft(r, size)), size)
    max_lag = round(_MAX_LAG_S * rate)
    lags = np.concatenate([np.arange(0, max_lag + 1), np.arange(-max_lag, 0)])
    lag = int(lags[int(np.argmax(corr[lags]))])
    if lag >= 0:
        return r[:n - lag], d[lag:]
    return r[-lag:], d[:n + lag]


def snr_db(ref: NDArray[np.float64], dec: NDArray[np.float64]) -> float:
    """Signal to noise of aligned `dec` against `ref` (the difference is the noise)."""
    return float(10 * np.log10(np.sum(ref**2) / max(float(np.sum((ref - dec) ** 2)), 1e-30)))


def _power_frames(x: NDArray[np.float64], frame: int) -> NDArray[np.float64]:
    hop = frame // 2
    count = (len(x) - frame) // hop + 1
    idx = np.arange(frame)[None, :] + hop * np.arange(count)[:, None]
    spectra = np.fft.rfft(x[idx] * np.hanning(frame), axis=1)
    return np.abs(spectra) ** 2 / frame


def lsd_db(ref: NDArray[np.float64], dec: NDArray[np.float64], rate: int) -> float:
    """Log-spectral distance (dB, RMS over 0-8 kHz, mean over speech frames) of
    aligned `dec` against `ref`; speech frames are those within 35 dB of the
    loudest, so the pauses' noise floor does not count."""
    frame = round(_FRAME_S * rate)
    p, q = _power_frames(ref, frame), _power_frames(dec, frame)
    bins = int(_SPEECH_BAND_HZ * frame / rate) + 1
    p, q = p[:, 1:bins], q[:, 1:bins]  # without DC
    energy = p.sum(axis=1)
    speech = energy >= energy.max() * 10 ** (-_SPEECH_FRAME_DB / 10)
    floor = 1e-12
    diff = 10 * np.log10(p[speech] + floor) - 10 * np.log10(q[speech] + floor)
    return float(np.mean(np.sqrt(np.mean(diff**2, axis=1))))


class _Recogniser:
    """pocketsphinx as the reference backend runs it; the same decoded audio (as
    complexities 8 to 10 often give) is recognised once."""

    def __init__(self) -> None:
        self._stt = SttReceiver()
        self.available = self._stt.recognise
        self._heard: dict[str, str] = {}

    def __call__(self, pcm: NDArray[np.float32], rate: int) -> str | None:
        if not self.available:
            return None
        key = hashlib.sha256(pcm.tobytes()).hexdigest() + str(rate)
        if key not in self._heard:
            self._heard[key] = self._stt.recognise_pcm(pcm.reshape(-1, 1), rate)
        return self._heard[key]


@functools.cache
def _sample() -> tuple[NDArray[np.float32], int, str]:
    pcm, rate = read_wav(sample_path())
    script = (resources.files("edge_agent") / "data" / "speech.txt").read_text("utf-8")
    return to_float32(pcm)[:, 0], rate, " ".join(script.split())


def _as_int16(x: NDArray[Any]) -> NDArray[np.int16]:
    out: NDArray[np.int16] = from_float32(np.clip(x, -1, 1).astype(np.float32),
                                          SampleFormat.INT16)
    return out


def pick_complexity(rows: list[dict[str, Any]]) -> int:
    """The default `COMPLEXITY_RULE` chooses from one encoder's rows (10 first).

    Fidelity is deterministic and changes in steps, so it must hold all the way
    down; word accuracy swings by a word or two with any change of the audio,
    so only the chosen complexity is compared with 10's.
    """
    best = rows[0]
    chosen = best["complexity"]
    for row in rows:
        if (best["snr_db"] - row["snr_db"] > MAX_SNR_LOSS_DB
                or row["lsd_db"] - best["lsd_db"] > MAX_LSD_GROWTH_DB):
            break
        if row["word_accuracy"] is None or row["word_accuracy"] >= best["word_accuracy"]:
            chosen = row["complexity"]
    return int(chosen)


def _renditions(rate: int, shifts_ms: tuple[float, ...]) -> list[NDArray[np.float32]]:
    """The sample at `rate`, once per shift, delayed by that much silence."""
    sample, sample_rate, _ = _sample()
    at_rate = resample(sample, sample_rate, rate)
    return [np.concatenate([np.zeros(round(ms * rate / 1000), np.float32), at_rate])
            for ms in shifts_ms]


def _accuracies(heard: list[str | None], script: str) -> list[float] | None:
    if any(h is None for h in heard):
        return None
    return [round(word_accuracy(script.split(), (h or "").split()), 4) for h in heard]


def _measure_encoder(setup: EncoderSetup, workload: NDArray[np.float32],
                     order: tuple[int, ...], passes: int, shifts_ms: tuple[float, ...],
                     recognise: _Recogniser) -> dict[str, Any]:
    script = _sample()[2]
    renditions = [_as_int16(x) for x in _renditions(setup.rate, shifts_ms)]
    work_in = _as_int16(workload)
    seconds = len(work_in) / setup.rate
    cpu: dict[int, list[float]] = {c: [] for c in order}
    files: dict[int, list[bytes]] = {}
    for _ in range(passes):
        for c in order:
            t0 = cpu_seconds()
            files[c] = setup.encode(work_in, c)
            cpu[c].append(cpu_seconds() - t0)
    reference = to_float32(work_in)
    rows = []
    for c in order:
        ref, dec = aligned(reference, _decoded(files[c], setup.rate), setup.rate)
        words = _accuracies([recognise(_decoded([setup.encode_file(x, c)], setup.rate),
                                       setup.rate) for x in renditions], script)
        rows.append({
            "complexity": c,
            "cpu_s_per_audio_hour": round(min(cpu[c]) * 3600 / seconds, 2),
            "kbit_s": round(sum(map(len, files[c])) * 8 / seconds / 1000, 2),
            "word_accuracy": None if words is None else round(float(np.mean(words)), 4),
            "word_accuracy_renditions": words,
            "snr_db": round(snr_db(ref, dec), 2),
            "lsd_db": round(lsd_db(ref, dec, setup.rate), 3),
        })
    chosen = pick_complexity(rows)
    return {"rate": setup.rate, "bitrate": setup.bitrate, "application": setup.application,
            "chosen": chosen, "config_default": setup.config_default,
            "default_follows_rule": setup.config_default == chosen, "rows": rows}


def measure_complexity(wav: Path, tiny: bool) -> dict[str, Any]:
    """Every figure of section 8 for both encoders, from the first seconds of the
    benchmark audio (its left channel: a mono microphone) and the bundled sample."""
    mode = "tiny" if tiny else "full"
    order = _TINY_ORDER if tiny else ORDER
    started, wall0 = datetime.now(UTC), time.monotonic()
    pcm, rate = read_wav(wav, frames=round(_SECONDS[mode] * SEGMENT_RATE))
    left = to_float32(pcm)[:, 0]
    if rate != SEGMENT_RATE:
        left = resample(left, rate, SEGMENT_RATE)
    recognise = _Recogniser()
    encoders = {}
    for setup in ENCODERS:
        workload = left if setup.rate == SEGMENT_RATE else resample(left, SEGMENT_RATE,
                                                                    setup.rate)
        encoders[setup.name] = _measure_encoder(setup, workload, order, _PASSES[mode],
                                                _SHIFTS_MS[mode], recognise)
    _, sample_rate, script = _sample()
    plain = _accuracies([recognise(x, sample_rate)
                         for x in _renditions(sample_rate, _SHIFTS_MS[mode])], script)
    return {
        "audio_seconds": round(len(left) / SEGMENT_RATE, 1), "passes": _PASSES[mode],
        "rule": COMPLEXITY_RULE, "max_snr_loss_db": MAX_SNR_LOSS_DB,
        "max_lsd_growth_db": MAX_LSD_GROWTH_DB, "sample_words": len(script.split()),
        "sample_shifts_ms": list(_SHIFTS_MS[mode]),
        "uncompressed_word_accuracy": None if plain is None else round(
            float(np.mean(plain)), 4),
        "uncompressed_word_accuracy_renditions": plain, "encoders": encoders,
        "measured_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "wall_seconds": round(time.monotonic() - wall0, 1), "loadavg_end": loadavg(),
        "cores": os.cpu_count() or 1,
    }
