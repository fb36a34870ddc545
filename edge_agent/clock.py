"""Wall-clock and monotonic time for capture timestamps, injectable for tests.

Trio's clock drives scheduling; capture timestamps need the OS clocks because the
PortAudio callback runs on a foreign thread. Monotonic time is the truth for
spans; UTC is what the backend asks for, so whether it is NTP-synchronised is
recorded with the audio.

Bottom layer: imports nothing of the project.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar, Protocol

__all__ = ["Clock", "ManualClock", "SystemClock", "iso_utc", "ntp_synchronized", "parse_iso_utc"]


def iso_utc(t: float) -> str:
    """Format seconds since the Unix epoch as ISO 8601 UTC with microseconds.

    Example: ``2026-11-24T05:25:08.123456Z``. Used in logs, errors and metadata so
    every module prints times the same way.
    """
    return datetime.fromtimestamp(t, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso_utc(text: str) -> float:
    """Seconds since the Unix epoch of an ISO 8601 time (the inverse of `iso_utc`);
    one without an offset is UTC. ValueError for anything else."""
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


class Clock(Protocol):
    @property
    def real_time(self) -> bool:
        """Whether its time passes by itself (the system's clocks), so a thread can
        pace audio by it; a test's clock is moved by hand."""
        ...

    def utc(self) -> float:
        """Seconds since the Unix epoch."""
        ...

    def mono(self) -> float:
        """Seconds of a monotonic clock."""
        ...

    def synced(self) -> bool:
        """Whether the wall clock is synchronised (NTP)."""
        ...


class _Timex(ctypes.Structure):
    # The head of struct timex from <sys/timex.h>; ctypes aligns the `long`s as the
    # C ABI does on 32- and 64-bit. Only `status` is read; the tail is padding
    # larger than the rest of the kernel struct.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("_rest", ctypes.c_byte * 256),
    ]


_STA_UNSYNC = 0x0040
_TIME_ERROR = 5


@functools.cache
def _libc() -> ctypes.CDLL:
    # Loaded once: find_library runs `ldconfig -p` in a child process (~1 ms of CPU
    # and a fork per call), and the capture asks for the sync flag every second.
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def ntp_synchronized() -> bool:
    """True when the kernel says the clock is disciplined (adjtimex, read-only).

    This is what `timedatectl` reports as "System clock synchronized"; it is false
    on a Pi without RTC until its first NTP sync.
    """
    try:
        libc = _libc()
        tx = _Timex()
        tx.modes = 0
        state = libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return False
    return state not in (-1, _TIME_ERROR) and not (tx.status & _STA_UNSYNC)


class SystemClock:
    """The real clocks; the NTP flag is re-read at most once a second."""

    real_time = True

    def __init__(self) -> None:
        self._synced = False
        self._checked_at = -1e9

    def utc(self) -> float:
        return time.time()

    def mono(self) -> float:
        return time.monotonic()

    def synced(self) -> bool:
        now = time.monotonic()
        if now - self._checked_at >= 1.0:
            self._synced = ntp_synchronized()
            self._checked_at = now
        return self._synced


@dataclass
class ManualClock:
    """A clock tests move by hand (including wall-clock steps)."""

    real_time: ClassVar[bool] = False
    utc_now: float = 1_800_000_000.0
    mono_now: float = 1000.0
    is_synced: bool = True

    def utc(self) -> float:
        return self.utc_now

    def mono(self) -> float:
        return self.mono_now

    def synced(self) -> bool:
        return self.is_synced

    def advance(self, seconds: float) -> None:
        self.utc_now += seconds
        self.mono_now += seconds
