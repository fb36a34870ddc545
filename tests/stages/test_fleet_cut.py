"""The one cut behind /v1/audio, mailbox answers and ``fleet get``: produced into a
file from downloaded segment files (the operator, no ring) it is byte for byte
what the device makes from its own spool, and the file sink's count and digest
describe the file written."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_agent.api.cut import FileSink, file_reader, open_renderer, produce, spool_reader
from edge_agent.api.plan import plan_audio
from edge_agent.api.render import Abort
from edge_agent.audio.opus import decode_ogg_opus
from edge_agent.blocking import ThreadRunner
from edge_agent.wire import SegmentMeta

from support.spool_rig import open_spool, seal


@pytest.mark.parametrize("fmt", ["wav", "opus"])
async def test_a_cut_from_downloaded_files_equals_the_cut_from_the_spool(
    tmp_path: Path, fmt: str,
) -> None:
    spool = open_spool(tmp_path / "spool")
    metas = [seal(spool, 2.0, start_ts=1_950_000_000.0 + 2 * i) for i in range(3)]  # back to back
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    for m in metas:  # as the operator fetched them from the bucket
        shutil.copy(spool.audio_path(m.id), downloads / m.id)
    start, end = metas[0].start_ts + 0.25, metas[-1].end_ts - 0.5
    rate = metas[0].rate
    plan = plan_audio(None, metas, start, end, rate=rate, gap_tolerance=0.25)
    assert plan.gaps == [] and plan.audio_frames == round((end - start) * rate)

    async def cut(reader: object, out: Path) -> FileSink:
        renderer = open_renderer(plan, fmt, rate=rate, channels=1, device_id="dev-7")
        with out.open("wb") as f:
            sink = FileSink(f, ThreadRunner())
            await produce(plan, renderer, sink, ring=None, read_segment=reader,  # type: ignore[arg-type]
                          encode_runner=ThreadRunner(), io_runner=ThreadRunner())
        return sink

    def path_of(meta: SegmentMeta) -> Path:
        return downloads / meta.id

    here = await cut(file_reader(path_of, rate), tmp_path / f"operator.{fmt}")
    there = await cut(spool_reader(spool, rate), tmp_path / f"device.{fmt}")
    written = (tmp_path / f"operator.{fmt}").read_bytes()
    theirs = (tmp_path / f"device.{fmt}").read_bytes()
    if fmt == "opus":  # each Ogg stream has a serial number of its own: same audio
        assert np.array_equal(decode_ogg_opus(written).pcm, decode_ogg_opus(theirs).pcm)
    else:
        assert written == theirs
    assert (here.bytes, here.sha256) == (len(written), hashlib.sha256(written).hexdigest())
    assert there.bytes == here.bytes

    # A segment missing from the downloads cuts the output off, never silently.
    (downloads / metas[1].id).unlink()
    with pytest.raises(Abort, match=f"segment {metas[1].id}: cannot open"):
        await cut(file_reader(path_of, rate), tmp_path / "broken")
