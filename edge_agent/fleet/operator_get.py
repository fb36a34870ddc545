"""``fleet get``: a range of a device's audio stitched from the bucket, and the
part the bucket does not hold yet asked of the device.

The range is planned with the agent's own planner (`plan.plan_audio` without a
ring) from the segments' sidecars, the segments it needs are downloaded (each
checked against its SHA-256) and the output is cut by `cut.produce` with the
agent's decoder and encoders: exactly what ``/v1/audio`` on the device would
return, by the same code.

A hole in the plan that lies inside a segment is a hole the device recorded
(it never captured that audio). Any other hole is *missing*: not uploaded yet,
or never captured. With ``--request`` each missing stretch becomes a retrieval
request (`Fleet.place`); the device's answer (`records.Result` and its audio)
is downloaded and planned as one more segment, so the output covers what the
device still held, and the holes that remain are reported.

Imports `api.cut`/`api.plan` (the one cut), the bottom layer and the fleet's
own modules; never cli.
"""

from __future__ import annotations

import hashlib
import secrets
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, cast

import trio

from ..api.cut import FileSink, file_reader, open_renderer, produce
from ..api.plan import AudioPlan, SegmentPiece, plan_audio
from ..blocking import ThreadRunner
from ..clock import iso_utc
from ..fs import FileOps
from ..s3 import EMPTY_SHA256, ObjectClient, object_url
from ..wire import GapNote, SegmentMeta
from .operator import Fleet, FleetError, StoredSegment
from .records import (
    FORMAT_EXTENSIONS,
    Request,
    Result,
    audio_key,
    new_request_id,
    parse_utc,
    result_key,
)

__all__ = ["GAP_TOLERANCE", "Cut", "Hole", "answer_meta", "holes", "plan_stored"]

#: A hole shorter than this is no hole (the ring's default tolerance on a device).
GAP_TOLERANCE: Final = 0.25
_FALLBACK_RATE: Final = 16000  # the rate of a plan with nothing in it


@dataclass(frozen=True)
class Hole:
    """``seconds`` of the range from ``utc`` not in the output. ``reason``:
    "missing" (not in the bucket), "pending" (asked of the device, no answer
    yet), "capture" (a hole inside a stored segment: the device never had it),
    or the reason of a device's answer ("not_held", "refused by the device: ...")."""

    utc: float
    seconds: float
    reason: str


@dataclass
class Cut:
    """What a ``fleet get`` produced."""

    device: str
    start: float
    end: float
    plan: AudioPlan
    segments: list[StoredSegment]
    holes: list[Hole]
    answers: list[Result] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # request ids still unanswered
    path: Path | None = None
    bytes: int = 0
    sha256: str = ""
    rate: int = 0
    channels: int = 0
    frames: int = 0


def plan_stored(metas: Sequence[SegmentMeta], start: float, end: float) -> AudioPlan:
    """The plan of ``[start, end)`` from segments alone, at their (most common) rate."""
    rates = Counter(m.rate for m in metas)
    rate = rates.most_common(1)[0][0] if rates else _FALLBACK_RATE
    return plan_audio(None, metas, start, end, rate=rate, gap_tolerance=GAP_TOLERANCE)


def holes(plan: AudioPlan, stored: Sequence[SegmentMeta], answers: Sequence[Result] = (),
          pending: Sequence[Request] = ()) -> list[Hole]:
    """The plan's holes, each with why: inside a stored segment (the segment's
    own reason, "capture" by default), inside a stretch the device was asked for
    (refused with its reason, not held by it, or "pending" while unanswered), or
    else "missing" from the bucket. The whole range is one hole when nothing is
    planned."""
    if plan.first_utc is None:
        spans = [(plan.start, plan.end - plan.start)]
    else:
        spans = [(g.utc, g.seconds) for g in plan.gaps]
    out = []
    for utc, seconds in spans:
        reason = _why(utc, seconds, stored, answers)
        if reason == "missing" and any(r.start_ts - GAP_TOLERANCE <= utc < r.end_ts
                                       for r in pending):
            reason = "pending"
        out.append(Hole(utc, seconds, reason))
    return out


def _why(utc: float, seconds: float, stored: Sequence[SegmentMeta],
         answers: Sequence[Result]) -> str:
    tol = GAP_TOLERANCE
    for m in stored:
        if m.start_ts - tol <= utc and utc + seconds <= m.end_ts + tol:
            return next((g.reason for g in m.gaps
                         if abs(m.start_ts + g.frame / m.rate - utc) < 1.0), "capture")
    for r in answers:
        if parse_utc(r.start) - tol <= utc < parse_utc(r.end):
            if r.state == "refused":
                return f"refused by the device: {r.reason}" if r.reason else "refused"
            return next((g.reason for g in r.gaps if abs(parse_utc(g.utc) - utc) < 1.0),
                        "not_held")
    return "missing"


def answer_meta(device: str, result: Result) -> SegmentMeta:
    """A device's answer as a segment the planner can place: it starts at the
    answer's first audio and its gaps are the answer's holes."""
    start = parse_utc(result.first_utc)
    end = parse_utc(result.last_utc)
    notes = [GapNote(frame=round(g.offset * result.rate), seconds=g.seconds, utc=g.utc,
                     reason=g.reason) for g in result.gaps]
    return SegmentMeta(
        id=f"answer-{result.id}", device=device, start_utc=result.first_utc,
        end_utc=result.last_utc, start_ts=start, end_ts=end, mono_start=0.0, mono_end=0.0,
        frames=result.samples, rate=result.rate, channels=result.channels,
        format=result.format, content_type="", bytes=result.bytes, sha256=result.sha256,
        clock_synced=True, gaps=notes)


Format = Literal["opus", "wav", "flac", "pcm"]
Progress = Callable[[float, list[str]], None]


class Getter:
    """One ``fleet get``: plan, request what is missing, download, cut.

    Args:
        fleet: the bucket.
        workdir: where downloaded segments and answers are kept while cutting.
        runner: worker threads for decoding, encoding and file writes.
    """

    def __init__(self, fleet: Fleet, workdir: Path, runner: ThreadRunner | None = None) -> None:
        self.fleet = fleet
        self.workdir = workdir
        self.runner = runner or ThreadRunner(2)
        self.files: dict[str, Path] = {}  # segment id -> downloaded file

    async def plan(self, device: str, start: float, end: float) -> Cut:
        stored = await self.fleet.segments(device, start, end)
        metas = [s.meta for s in stored]
        plan = plan_stored(metas, start, end)
        return Cut(device, start, end, plan, stored, holes(plan, metas))

    async def request_missing(self, cut: Cut, fmt: str, by: str) -> list[Request]:
        """Place one request per missing stretch of `cut`."""
        missing = [h for h in cut.holes if h.reason == "missing"]
        limit = self.fleet.config.max_requests_per_get
        if len(missing) > limit:
            raise FleetError(f"{len(missing)} stretches of the range are not in the bucket, "
                             f"more than max_requests_per_get ({limit}) requests; ask for a "
                             "shorter range")
        placed = []
        for hole in missing:
            now = self.fleet.now()
            request = Request(id=new_request_id(now, secrets.token_hex(4)),
                              start=iso_utc(hole.utc), end=iso_utc(hole.utc + hole.seconds),
                              format=cast(Format, fmt), created=iso_utc(now), by=by)
            placed.append(await self.fleet.place(cut.device, request))
        return placed

    async def wait(self, device: str, ids: list[str], seconds: float,
                   progress: Progress | None = None) -> tuple[list[Result], list[str]]:
        """Poll for the answers to `ids` until all are there or `seconds` passed;
        (answers, ids still pending)."""
        answers: dict[str, Result] = {}
        started = trio.current_time()
        poll = self.fleet.config.poll_seconds
        while True:
            for request_id in ids:
                if request_id not in answers:
                    got = await self.fleet.result(device, request_id)
                    if got is not None:
                        answers[request_id] = got
            elapsed = trio.current_time() - started
            states = [answers[i].state if i in answers else "pending" for i in ids]
            if progress is not None:
                progress(elapsed, states)
            if len(answers) == len(ids) or elapsed >= seconds:
                break
            await trio.sleep(min(poll, max(0.0, seconds - elapsed)))
        return [answers[i] for i in ids if i in answers], [i for i in ids if i not in answers]

    async def add_answers(self, cut: Cut, answers: list[Result],
                          pending: Sequence[Request] = ()) -> None:
        """Download the answers with audio and plan the range again with them
        (`pending`: the requests still unanswered, whose holes say so)."""
        metas = [s.meta for s in cut.segments]
        cut.answers = answers
        for result in answers:
            if result.state == "refused" or not result.key or result.samples <= 0:
                continue
            key = result_key(cut.device, result.id)
            if result.format not in FORMAT_EXTENSIONS or result.key != audio_key(
                    cut.device, result.id, result.format):
                raise FleetError(f"{key}: names the audio {result.key!r}, not the answer's "
                                 "own key; the device's answer is not usable")
            meta = answer_meta(cut.device, result)
            await self._download(result.key, meta)
            metas.append(meta)
        cut.plan = plan_stored(metas, cut.start, cut.end)
        cut.holes = holes(cut.plan, [s.meta for s in cut.segments], answers, pending)
        cut.pending = [r.id for r in pending]

    async def _download(self, key: str, meta: SegmentMeta) -> None:
        """The object at `key` into the work directory, checked against `meta`. The
        file is named after the key's digest: nothing a device wrote names a path."""
        path = self.workdir / hashlib.sha256(key.encode()).hexdigest()
        digest = hashlib.sha256()
        with path.open("wb") as f:
            async def write(data: bytes) -> None:
                digest.update(data)
                await self.runner.run(f.write, data)

            found = await stream_object(self.fleet.objects, key, write)
        if not found:
            raise FleetError(f"{key}: gone from the bucket while the range was being cut")
        if meta.sha256 and digest.hexdigest() != meta.sha256:
            raise FleetError(f"{key}: its SHA-256 ({digest.hexdigest()}) is not the one its "
                             f"record names ({meta.sha256}); the object is damaged")
        self.files[meta.id] = path

    async def write(self, cut: Cut, out: Path, fmt: str, rate: int | None,
                    channels: int | None) -> None:
        """Cut the planned range into `out` (written whole, then put in place)."""
        plan = cut.plan
        needed = {item.meta.id: item.meta for item in plan.items
                  if isinstance(item, SegmentPiece)}
        keys = {s.meta.id: s.key for s in cut.segments}
        todo = [m for i, m in needed.items() if i not in self.files]

        async def fetch(meta: SegmentMeta) -> None:
            await self._download(keys[meta.id], meta)

        await self.fleet.each(todo, fetch)
        captured = max((m.channels for m in needed.values()), default=1)
        cut.rate = rate or plan.rate
        cut.channels = channels or captured
        renderer = open_renderer(plan, fmt, rate=cut.rate, channels=cut.channels,
                                 device_id=cut.device)
        cut.frames = renderer.frames_out
        part = out.with_name(out.name + ".part")
        try:
            with part.open("wb") as f:
                sink = FileSink(f, self.runner)
                await produce(plan, renderer, sink, ring=None,
                              read_segment=file_reader(lambda m: self.files[m.id], plan.rate),
                              encode_runner=self.runner, io_runner=self.runner)
            await self.runner.run(FileOps().replace, part, out)
        except BaseException:
            part.unlink(missing_ok=True)  # no half-written file left behind
            raise
        cut.path, cut.bytes, cut.sha256 = out, sink.bytes, sink.sha256


async def stream_object(objects: ObjectClient, key: str,
                        write: Callable[[bytes], Awaitable[None]]) -> bool:
    """Stream the object at `key` into `write` (segments and answers may be far
    larger than `ObjectClient.get` holds in memory); False when there is none.

    An answer other than 200 is asked again through `ObjectClient.get`, which
    says what it means (a 404, or an `S3Error` in one line); when that GET
    succeeds (the signer corrected its clock meanwhile) the stream is tried once
    more. Nothing was written by a failed attempt."""
    url = object_url(objects.config, key)
    for _ in range(2):
        objects.requests += 1
        async with objects.client.stream("GET", url, auth=objects.auth, headers={
                "x-amz-content-sha256": EMPTY_SHA256}) as response:
            if response.status_code == 200:
                async for part in response.aiter_bytes():
                    await write(part)
                return True
        if (await objects.get(key)).status == 404:
            return False
    raise FleetError(f"{key}: the store answered {response.status_code} to reading it "
                     "and then served it; try again")


def workdir() -> tempfile.TemporaryDirectory[str]:
    """A private directory for the downloads of one get (removed afterwards)."""
    return tempfile.TemporaryDirectory(prefix="edge-agent-fleet-get-")
