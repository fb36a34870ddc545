"""The device side's decisions, without I/O: which requests of a mailbox to
take up, which to refuse and why, what holes an answer names, when to poll next.

`FleetDevice` (``device.py``) moves the data; everything here is synchronous
and plain, so it is tested without a store or a clock.

Imports only the bottom layer, the API's cut limits and ``records``; never
agent, metrics or cli.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from ..api.cut import MAX_CHANNELS, MAX_RATE, MIN_RATE, OPUS_BITRATE
from ..api.plan import MAX_GAPS_LISTED, AudioPlan
from ..clock import iso_utc
from ..config import FleetConfig
from .records import Request, ResultGap, parse_utc

__all__ = [
    "ANSWERED_REMEMBERED",
    "POLL_JITTER",
    "AnsweredIds",
    "FleetStats",
    "answer_gaps",
    "expired",
    "invalid",
    "next_poll",
    "not_held",
    "not_yet",
    "too_large",
]

#: A poll comes this fraction earlier or later than its interval, at random, so a
#: fleet started together does not poll the store together.
POLL_JITTER: Final = 0.1
#: Request ids remembered as answered (more than a mailbox holds: `MAILBOX_LIMIT`).
ANSWERED_REMEMBERED: Final = 1000
#: The share of the free disk one answer may take while it waits to be stored
#: (the spool's segments need the rest).
ANSWER_DISK_SHARE: Final = 0.5
#: A request whose range ends less than this before the device's clock waits
#: for the next poll: capture has not delivered its last blocks yet (seconds).
CAPTURE_SETTLE_SECONDS: Final = 2.0


@dataclass
class FleetStats:
    """The fleet device's counters, for the agent's status and metrics."""

    polls: int = 0  # mailbox reads
    not_modified: int = 0  # of those, 304: unchanged
    mailbox_changes: int = 0  # of those, 200: a new mailbox read
    mailbox_empty: int = 0  # of those, 404: no mailbox
    results_found: int = 0  # requests found answered already (a result in the store)
    requests_answered: int = 0  # audio and result written (ok or partial)
    requests_partial: int = 0  # of those, with gaps
    requests_refused: int = 0
    requests_failed: int = 0  # attempts that failed (retried at a later poll)
    requests_expired: int = 0  # placed longer ago than keep_results_hours: skipped
    requests_waiting: int = 0  # deferrals: the range is not all captured yet
    requests_over_limit: int = 0  # requests past MAILBOX_LIMIT in a mailbox read: not read
    audio_already: int = 0  # audio PUTs the store answered "already there" (a redo)
    heartbeats: int = 0
    errors: int = 0  # failed polls, heartbeats and requests
    last_error: str | None = None
    last_poll_utc: str | None = None
    last_heartbeat_utc: str | None = None


class AnsweredIds:
    """Ids of requests known to be answered, the newest `capacity` of them."""

    def __init__(self, capacity: int = ANSWERED_REMEMBERED) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, request_id: str) -> None:
        self._ids[request_id] = None
        self._ids.move_to_end(request_id)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)


def next_poll(config: FleetConfig, busy: bool, rng: random.Random) -> float:
    """Seconds to the next mailbox read: ``busy_poll_seconds`` while requests wait
    their turn, else ``poll_seconds``, either give or take `POLL_JITTER`."""
    base = config.busy_poll_seconds if busy else config.poll_seconds
    return base * (1.0 + POLL_JITTER * (2.0 * rng.random() - 1.0))


def expired(request: Request, now: float, config: FleetConfig) -> bool:
    """Placed longer ago than ``keep_results_hours`` (or with an unreadable time)."""
    try:
        created = parse_utc(request.created)
    except ValueError:
        return True
    return now - created > config.keep_results_hours * 3600.0


def not_yet(request: Request, now: float) -> bool:
    """The range reaches past what capture can have delivered by `now`."""
    return request.end_ts > now - CAPTURE_SETTLE_SECONDS


def invalid(request: Request, config: FleetConfig, channels: int) -> str | None:
    """Why `request` itself cannot be answered, whatever the device holds, or None;
    checked before a request waits for capture, so a range that ends in the year
    9999 is refused at once rather than kept waiting. `channels`: the capture's.

    The reason starts with a word scripts can match (``bad_request``,
    ``inverted``, ``too_long``), then says it for a person.
    """
    try:
        start, end = request.start_ts, request.end_ts
    except ValueError as exc:  # a date the pattern lets through (month 13)
        return f"bad_request: {exc}"
    if end <= start:
        return f"inverted: end {request.end} is not after start {request.start}"
    if end - start > config.max_request_seconds:
        return (f"too_long: the range is {end - start:g} s; at most "
                f"{config.max_request_seconds:g} s (fleet.max_request_seconds)")
    if request.rate is not None and not MIN_RATE <= request.rate <= MAX_RATE:
        return f"bad_request: rate {request.rate}: expected {MIN_RATE} to {MAX_RATE} Hz"
    if request.channels is not None and not 1 <= request.channels <= MAX_CHANNELS:
        return f"bad_request: channels {request.channels}: expected 1 to {MAX_CHANNELS}"
    if request.channels is not None and 1 < channels < request.channels:
        return (f"bad_request: channels {request.channels}: expected at most {channels} "
                "(the channels captured)")
    return None


def not_held(request: Request, oldest: float | None) -> str | None:
    """Why a valid `request` gets no audio (``nothing_held``, ``before_oldest``), or
    None; `oldest` is the UTC of the oldest audio the device holds."""
    if oldest is None:
        return "nothing_held: the device holds no audio"
    if request.end_ts <= oldest:
        return (f"before_oldest: the range ends at {request.end}, before the oldest audio "
                f"held ({iso_utc(oldest)})")
    return None


def answer_gaps(plan: AudioPlan, oldest: float, tolerance: float) -> list[ResultGap]:
    """The plan's holes as an answer names them: "not_held" where the hole lies
    before the oldest audio the device holds (it was there once, or never was,
    the device cannot tell), "capture" for a hole in what it holds. At most
    `MAX_GAPS_LISTED` (as ``/v1/audio``'s header)."""
    out = []
    for gap in plan.gaps[:MAX_GAPS_LISTED]:
        reason = "not_held" if gap.utc + gap.seconds <= oldest + tolerance else "capture"
        out.append(ResultGap(utc=iso_utc(gap.utc), seconds=round(gap.seconds, 6),
                             offset=round(gap.at, 6), reason=reason))
    return out


def too_large(fmt: str, frames: int, rate: int, channels: int, free_bytes: int) -> str | None:
    """Why an answer of `frames` at `rate` must not be cut on a disk with
    `free_bytes` free (``too_large``), or None. The size is an upper bound: Opus
    at its bit rate, the others as raw PCM (FLAC is never larger)."""
    need = (frames / rate * OPUS_BITRATE / 8 * 1.25 if fmt == "opus"
            else frames * channels * 2) + 65536
    if need <= free_bytes * ANSWER_DISK_SHARE:
        return None
    return (f"too_large: the answer may need {need / 2**20:.0f} MB and the device has "
            f"{free_bytes / 2**20:.0f} MB free; ask for opus, a lower rate or a shorter range")
