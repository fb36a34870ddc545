"""Fleet load on object storage: simulated devices upload into a local SeaweedFS.

``python -m bench.s3load --devices 100 --segments 10 --processes 2`` starts a
SeaweedFS S3 gateway on loopback (`bench.seaweed.LocalSeaweed`) with one identity
and write-only policy per device, gives every device a spool of sealed 60 s Opus
segments (one real encode at 32 kbit/s, copied under distinct ids), and runs each
device's own `Uploader` (``upload.target = "s3"``), several devices per worker
process on one Trio loop, until every spool is drained. It reports segments and
MB per second, the upload latency of a segment (audio and sidecar, p50/p95),
the device side's CPU per uploaded MB, the gateway's CPU, and checks that every
object is in the bucket once with the segment's digest; then projects the
figures to a fleet of 10,000 devices.

Imports `edge_agent` as an installed library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from bench.common import MB, cpu_seconds, spread
from bench.drain import encode_segment, write_sealed
from bench.seaweed import DeviceIdentity, LocalSeaweed
from bench.workload import make_bench_audio
from edge_agent.clock import SystemClock
from edge_agent.config import S3Config, SegmentsConfig, UploadConfig
from edge_agent.s3 import Credentials, checksum
from edge_agent.spool import Spool
from edge_agent.uploader import SegmentInfo, Uploader

__all__ = ["main", "project", "run_load"]

BUCKET = "fleet"
SEGMENT_SECONDS = 60.0
FLEET = 10_000
PUT_PRICE_PER_1000 = 0.005  # USD, AWS S3 Standard PUT/COPY/POST/LIST (us-east-1)
PREFIX_PUTS_PER_SECOND = 3500  # AWS S3: PUT/COPY/POST/DELETE per second per prefix


class _Timed:
    """The spool as the uploader sees it, timing each segment from its digest
    re-check (the start of an upload) to ``mark_synced`` (both objects stored)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.started: dict[str, float] = {}
        self.latencies: list[float] = []

    def pending(self) -> Sequence[SegmentInfo]:
        return self.spool.pending()

    def audio_path(self, segment_id: str) -> Path:
        return self.spool.audio_path(segment_id)

    def verify(self, segment_id: str) -> bool:
        self.started[segment_id] = time.monotonic()
        return self.spool.verify(segment_id)

    def mark_synced(self, segment_id: str) -> None:
        self.spool.mark_synced(segment_id)
        self.latencies.append(time.monotonic() - self.started[segment_id])

    def quarantine(self, segment_id: str, reason: str) -> None:
        self.spool.quarantine(segment_id, reason)

    async def wait_pending(self) -> None:
        await self.spool.wait_pending()


async def _drain_devices(spec: dict[str, Any]) -> dict[str, Any]:
    """Worker process: every device of `spec` drains its spool, all at once."""
    timed: list[_Timed] = []
    uploaders: list[Uploader] = []
    for dev in spec["devices"]:
        spool = Spool(Path(dev["spool"]), device_id=dev["device"],
                      config=SegmentsConfig(min_free_mb=0), clock=SystemClock())
        spool.recover()
        config = UploadConfig(enabled=True, target="s3", timeout_seconds=60.0,
                              backoff_initial_seconds=0.2, backoff_max_seconds=2.0,
                              s3=S3Config(endpoint=spec["endpoint"], bucket=spec["bucket"],
                                          credentials_file=dev["credentials"]))
        timed.append(_Timed(spool))
        uploaders.append(Uploader(config, dev["device"], timed[-1]))
    # Set up (imports, spools recovered): wait for the word, so that all workers start
    # draining at one moment and the parent times the drain alone.
    print("ready", flush=True)
    await trio.to_thread.run_sync(sys.stdin.readline)
    wall, cpu = time.monotonic(), cpu_seconds()
    async with trio.open_nursery() as nursery:
        for up in uploaders:
            nursery.start_soon(up.drain)
    return {
        "wall_s": time.monotonic() - wall, "cpu_s": cpu_seconds() - cpu,
        "latencies": [x for t in timed for x in t.latencies],
        "bytes": sum(u.stats.bytes_sent for u in uploaders),
        "synced": sum(u.stats.successes + u.stats.already_present for u in uploaders),
        "failures": sum(u.stats.failures for u in uploaders),
        "quarantined": sum(u.stats.quarantined for u in uploaders),
        "left": sum(len(t.pending()) for t in timed),
    }


def _gateway_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_load(store: LocalSeaweed, devices: list[DeviceIdentity], *, segments: int,
             processes: int, work: Path, bucket: str = BUCKET,
             segment_seconds: float = SEGMENT_SECONDS) -> dict[str, Any]:
    """Drain `segments` sealed segments of each device into `bucket` of `store`,
    the devices spread over `processes` worker processes; the figures."""
    wav = make_bench_audio(work / "speech.wav", segment_seconds)
    audio, frames, rate, channels = encode_segment(wav, segment_seconds)
    specs: list[dict[str, Any]] = [{"endpoint": store.endpoint, "bucket": bucket,
                                    "devices": []} for _ in range(processes)]
    for i, dev in enumerate(devices):
        root = work / dev.device
        write_sealed(root / "spool", audio, device=dev.device, count=segments,
                     seconds=segment_seconds, frames=frames, rate=rate, channels=channels)
        creds = root / "credentials"
        creds.write_text(f"[default]\naws_access_key_id = {dev.credentials.access_key_id}\n"
                         f"aws_secret_access_key = {dev.credentials.secret_access_key}\n")
        specs[i % processes]["devices"].append(
            {"device": dev.device, "spool": str(root / "spool"), "credentials": str(creds)})
    procs = []
    for n, spec in enumerate(specs):
        path = work / f"worker-{n}.json"
        path.write_text(json.dumps(spec))
        procs.append(subprocess.Popen([sys.executable, "-m", "bench.s3load", "--worker",
                                       str(path)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True))
    for proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"worker failed with {proc.wait()}")
    gateway_pid = store.proc.pid if store.proc is not None else None
    gw0 = _gateway_cpu(gateway_pid) if gateway_pid else 0.0
    started = time.monotonic()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"worker failed with {proc.returncode}")
        results.append(json.loads(out))
    wall = time.monotonic() - started
    gateway_cpu = (_gateway_cpu(gateway_pid) - gw0) if gateway_pid else 0.0

    # Every object once, with the digest of what the device holds.
    listed = store.list_keys(bucket)
    audio_keys = [k for k in listed if not k.endswith(".json")]
    digest = checksum(hashlib.sha256(audio).hexdigest())
    wrong = [k for k in audio_keys
             if store.head(bucket, k).headers.get("x-amz-checksum-sha256") != digest]
    total = len(devices) * segments
    mb = sum(r["bytes"] for r in results) / MB
    device_cpu = sum(r["cpu_s"] for r in results)
    return {
        "devices": len(devices), "segments_per_device": segments, "processes": processes,
        "segment_seconds": segment_seconds, "segment_bytes": len(audio),
        "segments": total, "wall_seconds": round(wall, 2),
        "segments_per_second": round(total / wall, 1), "mb_per_second": round(mb / wall, 2),
        "latency_s": spread([x for r in results for x in r["latencies"]]),
        "device_cpu_s": round(device_cpu, 2),
        "device_cpu_ms_per_mb": round(1000 * device_cpu / mb, 1) if mb else 0.0,
        "gateway_cpu_s": round(gateway_cpu, 2),
        "failures": sum(r["failures"] for r in results),
        "quarantined": sum(r["quarantined"] for r in results),
        "left_pending": sum(r["left"] for r in results),
        "objects_listed": len(listed),
        "every_object_once": len(audio_keys) == total and len(listed) == 2 * total
        and not wrong,
    }


def project(result: dict[str, Any], fleet: int = FLEET) -> dict[str, Any]:
    """The measured figures projected, on paper, to `fleet` devices recording all day."""
    per_day = 86400 / result["segment_seconds"]
    puts = 2 * per_day  # the audio and its sidecar
    day_bytes = per_day * result["segment_bytes"]
    return {
        "fleet": fleet, "puts_per_device_per_day": round(puts),
        "mb_per_device_per_day": round(day_bytes / MB, 1),
        "puts_per_second_fleet": round(fleet * puts / 86400, 1),
        "tb_per_day_fleet": round(fleet * day_bytes / 1e12, 2),
        "mb_per_second_fleet": round(fleet * day_bytes / 86400 / MB, 1),
        "puts_per_second_per_device_prefix": round(puts / 86400, 4),
        "prefix_limit_puts_per_second": PREFIX_PUTS_PER_SECOND,
        "put_cost_usd_per_device_per_day": round(puts * PUT_PRICE_PER_1000 / 1000, 4),
        "put_cost_usd_fleet_per_month": round(fleet * puts * PUT_PRICE_PER_1000 / 1000 * 30),
        "device_cpu_s_per_day_here": round(result["device_cpu_ms_per_mb"] * day_bytes / MB
                                           / 1000, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.s3load", description=__doc__)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--segments", type=int, default=10, help="sealed segments per device")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--results", type=Path, help="write the figures here as JSON")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(trio.run(_drain_devices, json.loads(args.worker.read_text()))))
        return 0
    with tempfile.TemporaryDirectory(prefix="edge-s3load-") as tmp:
        work = Path(tmp)
        devices = [DeviceIdentity(f"dev-{i:05d}", Credentials(f"LOADKEY{i:05d}", f"secret-{i}"),
                                  (BUCKET,)) for i in range(args.devices)]
        store = LocalSeaweed(work / "seaweed", devices)
        try:
            store.start()
            store.create_bucket(BUCKET)
            result = run_load(store, devices, segments=args.segments,
                              processes=args.processes, work=work)
        finally:
            store.close()
    result["projection"] = project(result)
    result["cores"] = os.cpu_count()
    result["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    if args.results is not None:
        args.results.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if result["every_object_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
