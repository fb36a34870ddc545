"""6: backlog drain. A spool holding a day of unsynced segments (as an outage
leaves them) drained to the reference backend by the agent while it keeps
capturing in real time: throughput, CPU, and whether capture stayed on time.

Imports `edge_agent` as an installed library only.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import trio

from bench.common import DEVICE_ID, MB, as_dict, cpu_seconds, downsample
from bench.workload import agent_config, capped_source
from edge_agent.agent import Agent
from edge_agent.audio.encoders import encode_whole, make_encoder
from edge_agent.audio.pcm import SampleFormat, read_wav
from edge_agent.clock import iso_utc
from edge_agent.wire import SegmentMeta, new_segment_id

__all__ = ["drain_result", "drain_run", "encode_segment", "write_sealed"]


def encode_segment(wav: Path, seconds: float) -> tuple[bytes, int, int, int]:
    """One Ogg Opus segment (32 kbit/s) of the first `seconds` of `wav`: its bytes,
    frames, rate and channels."""
    pcm, rate = read_wav(wav)
    frames, channels = round(seconds * rate), int(pcm.shape[1])
    enc = make_encoder("opus", rate, channels, SampleFormat.INT16, bitrate=32000,
                       application="audio")
    return encode_whole(enc, np.ascontiguousarray(pcm[:frames])), frames, rate, channels


def write_sealed(root: Path, audio: bytes, *, device: str, count: int, seconds: float,
                 frames: int, rate: int, channels: int = 1) -> list[str]:
    """`count` sealed segments of `seconds` each, ending now, all holding `audio`
    under distinct ids with their own metadata, in the spool's on-disk format (the
    agent's recovery loads them like any other); returns their ids."""
    digest = hashlib.sha256(audio).hexdigest()
    now = time.time()
    mono = time.monotonic()
    ids: list[str] = []
    for i in range(count):
        start = now - (count - i) * seconds
        seg_id = new_segment_id(start)
        seg_dir = root / "sealed" / seg_id
        seg_dir.mkdir(parents=True)
        (seg_dir / "audio.opus").write_bytes(audio)
        meta = SegmentMeta(
            id=seg_id, device=device, start_utc=iso_utc(start), end_utc=iso_utc(start + seconds),
            start_ts=start, end_ts=start + seconds, mono_start=mono - (count - i) * seconds,
            mono_end=mono - (count - i - 1) * seconds, frames=frames, rate=rate,
            channels=channels, format="opus", content_type="audio/ogg; codecs=opus",
            bytes=len(audio), sha256=digest, clock_synced=True, created_at=iso_utc(start),
            sealed_at=iso_utc(start + seconds), bitrate=32000, sample_format="int16")
        (seg_dir / "meta.json").write_bytes(msgspec.json.encode(meta))
        ids.append(seg_id)
    return ids


def _populate_spool(root: Path, wav: Path, count: int, seconds: float) -> dict[str, Any]:
    """`count` sealed segments of `seconds` each, ending now, as a 24 h outage
    leaves them: one encode of the first `seconds` of `wav`, copied under
    distinct ids."""
    audio, frames, rate, channels = encode_segment(wav, seconds)
    ids = write_sealed(root, audio, device=DEVICE_ID, count=count, seconds=seconds,
                       frames=frames, rate=rate, channels=channels)
    return {"ids": ids, "bytes_each": len(audio)}


async def drain_run(p: dict[str, Any]) -> dict[str, Any]:
    """Child process: the agent starts on a spool holding a day of unsynced
    segments, with a real-time source capturing, and drains it to the backend."""
    data_dir = Path(p["data_dir"])
    config = agent_config(data_dir, Path(p["wav"]), p["backend_url"], realtime=True,
                          stt={"chunking": "fixed", "chunk_seconds": 5.0})
    made = await trio.to_thread.run_sync(_populate_spool, data_dir / "spool", Path(p["wav"]),
                                         p["segments"], p["segment_seconds"])
    source = capped_source(config, p["timeout"] + 60)
    agent = Agent(config, source=source)
    assert agent.spool is not None and agent.uploader is not None
    spool, uploader = agent.spool, agent.uploader
    t0, c0 = time.monotonic(), cpu_seconds()
    await trio.to_thread.run_sync(spool.recover)
    recover_s = time.monotonic() - t0
    total = len(made["ids"])
    progress: list[list[float]] = []
    per_second: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.run)
        start, cpu_start = time.monotonic(), cpu_seconds()
        last_t, last_c = start, cpu_start
        with trio.move_on_after(p["timeout"]):
            while True:
                done = uploader.stats.successes + uploader.stats.already_present
                now, cpu = time.monotonic(), cpu_seconds()
                if now - last_t >= 0.5:
                    per_second.append(100 * (cpu - last_c) / (now - last_t))
                    last_t, last_c = now, cpu
                progress.append([round(now - start, 3), done,
                                 round(per_second[-1], 1) if per_second else 0.0])
                if done >= total:
                    break
                await trio.sleep(0.1)
        drain_s = time.monotonic() - start
        drain_cpu = cpu_seconds() - cpu_start
        # Keep capturing a moment after the drain, then stop (the open segment seals).
        await trio.sleep(1.0)
        agent.stop()
    synced = 0
    for seg_id in made["ids"]:
        got = spool.get(seg_id)
        synced += got is None or got[1].value == "synced"
    seg_stats = agent.segmenter.stats if agent.segmenter else None
    stt_stats = agent.stt.statistics() if agent.stt else None
    return {
        "segments": total, "bytes_each": made["bytes_each"], "recover_s": recover_s,
        "recover_cpu_s": cpu_seconds() - c0 - drain_cpu, "drain_s": drain_s,
        "drain_cpu_s": drain_cpu, "synced": synced,
        "cpu_percent_per_interval": [round(v, 1) for v in per_second],
        "progress": downsample(progress, 300),
        "ring_overruns": sum(r.overruns for r in agent.ring.readers())
        + (stt_stats.overruns if stt_stats else 0),
        "lost_frames": (seg_stats.lost_frames if seg_stats else 0),
        "capture_gaps": agent.ring.statistics().gaps,
        "capture_late_ms_max": max(source.late, default=0.0) * 1e3,
        "capture_late_ms_p99": float(np.percentile(source.late, 99)) * 1e3 if source.late
        else 0.0,
        "uploader": as_dict(uploader.stats),
    }


def drain_result(run: dict[str, Any], seconds: float) -> dict[str, Any]:
    n, drain = run["segments"], max(run["drain_s"], 1e-9)
    per = run["cpu_percent_per_interval"]
    return {
        "segments": n, "segment_seconds": seconds,
        "audio_hours": round(n * seconds / 3600, 3),
        "recover_seconds": round(run["recover_s"], 3), "drain_seconds": round(drain, 2),
        "segments_per_second": round(n / drain, 2),
        "mb_per_second": round(n * run["bytes_each"] / MB / drain, 3),
        "audio_hours_per_minute": round(n * seconds / 3600 / (drain / 60), 2),
        "cpu_percent_mean": round(100 * run["drain_cpu_s"] / drain, 1),
        "cpu_percent_max": round(max(per, default=0.0), 1),
        "ring_overruns": run["ring_overruns"], "lost_frames": run["lost_frames"],
        "capture_gaps": run["capture_gaps"],
        "capture_late_ms_max": round(run["capture_late_ms_max"], 2),
        "capture_late_ms_p99": round(run["capture_late_ms_p99"], 2),
        "all_synced": bool(run["synced"] == n),
    }
