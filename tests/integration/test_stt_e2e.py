"""Spoken English through the whole live path, recognised for real.

The bundled sample (`edge_agent/data/speech.wav`, its script in `speech.txt`)
goes FileSource -> 48 kHz ring -> streamer (VAD chunks, 16 kHz, 24 kbit/s Ogg
Opus) -> reference backend on loopback -> pocketsphinx. Its word accuracy must
be within `MARGIN` of pocketsphinx on the original PCM.

The sample is synthetic speech: flite's `slt` voice (`--setf
duration_stretch=1.2`), each sentence trimmed of silence, 0.5 s of silence
before, a 1.5 s pause between, padded to 10.63 s at 16 kHz. espeak-ng was tried
first; pocketsphinx recognises its voices at only 10-50 % word accuracy (75-90 %
for flite's CMU voices), too low for the comparison to mean anything.
"""

from __future__ import annotations

from datetime import datetime
from importlib import resources
from pathlib import Path

import pytest
import trio

from edge_agent.agent import Agent
from edge_agent.audio.pcm import read_wav
from edge_agent.config import validate
from edge_agent.demo import sample_path
from edge_agent.reference import Backend, SttReceiver, run_backend, word_accuracy
from edge_agent.stt import read_transcripts

pytest.importorskip("pocketsphinx")
pytestmark = pytest.mark.slow

#: How many points of word accuracy the Opus path may lose against the PCM.
#: Measured on this sample: PCM ~83-96 %, 24 kbit/s Opus ~83-92 %; one word is
#: 4 points, and pocketsphinx flips a word or two on tiny input changes.
MARGIN = 0.10


def test_word_accuracy_counts_edits() -> None:
    ref = ["the", "quick", "brown", "fox"]
    assert word_accuracy(ref, ref) == 1.0
    assert word_accuracy(ref, ["the", "quick", "fox"]) == 0.75  # a deletion
    # Two substitutions and an insertion.
    assert word_accuracy(ref, ["a", "quick", "brown", "box", "jumps"]) == 0.25


async def test_words_through_24k_opus_are_as_good_as_the_original_pcm(tmp_path: Path) -> None:
    script = (resources.files("edge_agent") / "data" / "speech.txt").read_text().split()
    pcm, rate = read_wav(sample_path())
    receiver = SttReceiver()
    assert receiver.recognise
    pcm_text = await trio.to_thread.run_sync(receiver.recognise_pcm, pcm, rate)

    backend = Backend(tmp_path / "backend")
    backend.stt = receiver
    async with trio.open_nursery() as nursery:
        base = await nursery.start(run_backend, backend)
        config = validate({
            "device": {"id": "e2e-1", "data_dir": str(tmp_path / "data")},
            "capture": {"source": "file", "file": str(sample_path()), "realtime": False,
                        "rate": 48000, "channels": 1, "format": "int16"},
            "ring": {"seconds": 60},
            "segments": {"enabled": False},
            "stt": {"enabled": True, "protocol": "raw", "url": base + "/v1/stt/raw",
                    "chunking": "vad", "bitrate": 24000},
        })
        agent = Agent(config)
        assert agent.stt is not None
        await nursery.start(agent.run)
        with trio.fail_after(60):
            await agent.capture_finished.wait()
            await agent.stt.wait_idle()
        nursery.cancel_scope.cancel()

    transcripts = read_transcripts(tmp_path / "data")
    opus_text = " ".join(t.text for t in transcripts)
    # The same cuts of the original PCM, to tell the codec's effect from the cutting's.
    t0 = agent.ring.index_to_utc(0)
    cut_texts = []
    for r in backend.stt.records:
        start = datetime.fromisoformat(r.headers["x-chunk-start"].replace("Z", "+00:00"))
        a = round((start.timestamp() - t0) * rate)
        b = a + round(float(r.headers["x-chunk-duration"]) * rate)
        cut_texts.append(receiver.recognise_pcm(pcm[a:b], rate))
    acc_pcm = word_accuracy(script, pcm_text.split())
    acc_cuts = word_accuracy(script, " ".join(cut_texts).split())
    acc_opus = word_accuracy(script, opus_text.split())
    print(f"\nscript:        {' '.join(script)}")
    print(f"PCM, whole:    {acc_pcm:.1%}  {pcm_text}")
    print(f"PCM, same cuts:{acc_cuts:.1%}  {' | '.join(cut_texts)}")
    print(f"Opus 24k path: {acc_opus:.1%}  {' | '.join(t.text for t in transcripts)}")
    spans = [(r.headers["x-chunk-start"], r.headers["x-chunk-duration"])
             for r in backend.stt.records]
    print(f"margin allowed: {MARGIN:.0%}; chunks (start, seconds): {spans}")

    # VAD: the two sentences, nothing for the silence around and between them.
    assert len(backend.stt.records) == 2 and len(transcripts) == 2
    assert agent.stt.statistics().seconds_skipped > 1.5
    assert acc_pcm >= 0.7  # the recogniser works on this sample at all
    assert acc_opus >= acc_pcm - MARGIN
    assert [t.seq for t in transcripts] == [0, 1]
    assert transcripts[0].end_utc < transcripts[1].start_utc
