"""The ``edge-agent fleet`` subcommands: what they print and how they fail.

`run_fleet` reads ``fleet.toml`` and the operator's keys, runs one subcommand
against the bucket (`Fleet`, `Getter`) and prints a table, or JSON with
``--json``. Everything a person can get wrong (the file, the keys, the bucket,
a device id, a time, a range) ends as `FleetError` or `ConfigError` in one line,
which the command line turns into exit status 2; a store's refusal names the
``fleet.toml`` key to check.

`cli` imports this module only when ``fleet`` runs (httpx, trio and numpy are
not loaded for the other commands).
"""

from __future__ import annotations

import argparse
import getpass
import math
import re
import secrets
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, TextIO, cast

import httpx
import msgspec
import trio

from ..api.cut import MAX_CHANNELS, MAX_RATE, MIN_RATE, RangeTooLong
from ..api.plan import SegmentPiece
from ..api.render import Abort
from ..clock import Clock, SystemClock, iso_utc
from ..config import ConfigError
from ..errors import ungrouped
from ..s3 import Credentials, ObjectClient, S3Error, SigV4
from .fleetconfig import OperatorConfig, load_operator_config
from .operator import DeviceRow, Fleet, FleetError, RequestRow, check_device
from .operator_get import Cut, Format, Getter, Hole, workdir
from .records import FORMAT_EXTENSIONS, MAILBOX_LIMIT, Request, new_request_id, parse_utc

__all__ = ["parse_time", "run_fleet"]

_SPANS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_RELATIVE: Final = re.compile(r"(?:now)?(?:([-+])([0-9]+(?:\.[0-9]+)?)([smhd]))?")
# Answers to `get --request` come in the output's codec when the decoder reads it,
# lossless for raw PCM.
_ANSWER_FORMAT: Final = {"opus": "opus", "wav": "wav", "flac": "flac", "pcm": "flac"}


def parse_time(text: str, now: float, what: str) -> float:
    """An ISO 8601 time (UTC unless it says otherwise), ``now``, or now plus or
    minus a span (``now-15m``, ``now-2h``; ``-1d`` where no option parser is in the
    way, as in ``--from=-1d``), as seconds since the epoch."""
    text = text.strip()
    m = _RELATIVE.fullmatch(text)
    if text and m is not None:
        sign, amount, unit = m.groups()
        delta = float(amount) * _SPANS[unit] if amount else 0.0
        return now - delta if sign == "-" else now + delta
    try:
        value = parse_utc(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise FleetError(f"{what} {text!r}: expected an ISO 8601 time such as "
                         "2026-11-24T05:30:00Z, now, or now minus a span such as now-15m, "
                         "now-2h, now-1d")
    return value


def _range(args: argparse.Namespace, first: str, last: str, now: float,
           longest: float) -> tuple[float, float]:
    names = {"start": "START", "end": "END", "from_": "--from", "to": "--to"}
    start = parse_time(getattr(args, first), now, names[first])
    end = parse_time(getattr(args, last), now, names[last])
    if end <= start:
        raise FleetError(f"{names[last]} {getattr(args, last)}: the range ends ({iso_utc(end)}) "
                         f"before it starts ({iso_utc(start)})")
    if end - start > longest:
        raise FleetError(f"{names[last]} {getattr(args, last)}: the range is {end - start:g} s "
                         f"long; at most {longest:g} s (max_range_seconds in fleet.toml)")
    return start, end


def run_fleet(args: argparse.Namespace, *, clock: Clock | None = None,
              out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``edge-agent fleet <args.fleet_command>``; the exit status (0: done,
    1: done but some of the range is still missing)."""
    out = out or sys.stdout
    err = err or sys.stderr
    _check_options(args)
    config = load_operator_config(args.config)
    try:
        credentials = config.credentials()
    except ConfigError as exc:
        raise ConfigError([f"{args.config}: {line}" for line in exc.problems]) from None
    command = _Command(config, args, clock or SystemClock(), out, err)
    return trio.run(command.run, credentials)


def _check_options(args: argparse.Namespace) -> None:
    """The options that need neither the store nor fleet.toml, checked first."""
    rate, channels = getattr(args, "rate", None), getattr(args, "channels", None)
    if rate is not None and not MIN_RATE <= rate <= MAX_RATE:
        raise FleetError(f"--rate {rate}: expected {MIN_RATE} to {MAX_RATE} Hz")
    if channels is not None and not 1 <= channels <= MAX_CHANNELS:
        raise FleetError(f"--channels {channels}: expected 1 to {MAX_CHANNELS}")
    timeout = getattr(args, "timeout", None)
    if timeout is not None and not 0 < timeout < math.inf:
        raise FleetError(f"--timeout {timeout:g}: expected a number of seconds above 0")
    output = getattr(args, "output", None)
    if output is not None and Path(output).is_dir():
        raise FleetError(f"-o {output}: is a directory, expected a file to write")
    if output is not None and not Path(output).parent.is_dir():
        raise FleetError(f"-o {output}: no directory {Path(output).parent} to write it in")
    device = getattr(args, "device", None)
    if device is not None:
        check_device(device)


class _Command:
    """One subcommand's run: its handler is the method named after it."""

    def __init__(self, config: OperatorConfig, args: argparse.Namespace, clock: Clock,
                 out: TextIO, err: TextIO) -> None:
        self.config = config
        self.args = args
        self.clock = clock
        self.out = out
        self.err = err
        self.as_json: bool = args.json

    async def run(self, credentials: Credentials) -> int:
        auth = SigV4(credentials, self.config.region, self.clock)
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as client:
                fleet = Fleet(self.config, ObjectClient(self.config, auth, client),
                              self.clock)
                handler = getattr(self, f"_{self.args.fleet_command}")
                status: int = await handler(fleet)
                return status
        except BaseException as exc:  # one line for what a person can fix
            line = self._one_line(exc)
            if line is None:
                raise
            raise line from None

    def _one_line(self, exc: BaseException) -> BaseException | None:
        """The error to end with in one line; None for a bug (its traceback shows)."""
        exc = ungrouped(exc)
        where = self.config.endpoint or f"AWS S3 ({self.config.region})"
        if isinstance(exc, S3Error):
            text = re.sub(r"upload\.s3\.(\w+)", rf"\1 ({self.args.config})", str(exc))
            return FleetError(text)
        if isinstance(exc, httpx.TransportError):
            return FleetError(f"cannot reach the store at {where}: "
                              f"{exc or type(exc).__name__}; check endpoint ({self.args.config})")
        if isinstance(exc, httpx.HTTPError):
            return FleetError(f"the store at {where}: {exc}")
        if isinstance(exc, (Abort, RangeTooLong)):
            return FleetError(str(exc))
        if isinstance(exc, OSError) and exc.filename:  # writing the output, the work files
            return FleetError(f"{exc.filename}: {exc.strerror or exc}")
        if isinstance(exc, (FleetError, ConfigError, KeyboardInterrupt)):
            return exc
        return None

    def _print_json(self, value: object) -> None:
        text = msgspec.json.format(msgspec.json.encode(value), indent=2).decode()
        print(text, file=self.out)

    def _note(self, text: str) -> None:
        print(text, file=self.err)

    async def _device(self, fleet: Fleet, *, must_exist: bool) -> str:
        device = check_device(self.args.device)
        if must_exist and not await fleet.known(device):
            raise _unknown(device)
        return device

    # -- devices -----------------------------------------------------------------

    async def _devices(self, fleet: Fleet) -> int:
        rows = await fleet.devices()
        if self.as_json:
            self._print_json([_device_json(r) for r in rows])
            return 0
        if not rows:
            self._note(f"no heartbeats in bucket {self.config.bucket} (status/*.json): no "
                       "device has reported yet")
            return 0
        header = ("DEVICE", "LAST SEEN", "STATE", "HEALTH", "BACKLOG", "CLOCK",
                  "OLDEST AUDIO", "VERSION")
        print(_table(header, [_device_cells(r) for r in rows]), file=self.out)
        stale = sum(r.stale for r in rows)
        if stale:
            self._note(f"{stale} of {len(rows)} device(s) stale: no heartbeat for longer than "
                       f"{self._stale_rule()}")
        return 0

    def _stale_rule(self) -> str:
        cfg = self.config
        if cfg.stale_after_seconds > 0:
            return f"{cfg.stale_after_seconds:g} s (stale_after_seconds)"
        return f"{cfg.stale_after:g} x their heartbeat interval (stale_after)"

    # -- segments ----------------------------------------------------------------

    async def _segments(self, fleet: Fleet) -> int:
        start, end = _range(self.args, "from_", "to", fleet.now(), 366 * 86400)
        device = check_device(self.args.device)
        getter = Getter(fleet, Path("."))
        cut = await getter.plan(device, start, end)
        if not cut.segments and not await fleet.known(device):
            raise _unknown(device)
        if self.as_json:
            self._print_json({
                "device": device, "from": iso_utc(start), "to": iso_utc(end),
                "stored_seconds": cut.plan.audio_frames / cut.plan.rate,
                "segments": [{"key": s.key, **msgspec.to_builtins(s.meta)}
                             for s in cut.segments],
                "holes": [_hole_json(h) for h in cut.holes]})
            return 0
        rows = [(s.meta.id, _when(s.meta.start_ts), _when(s.meta.end_ts),
                 f"{s.meta.seconds:.1f}", s.meta.format, str(s.meta.bytes),
                 _seconds(sum(g.seconds for g in s.meta.gaps)) if s.meta.gaps else "")
                for s in cut.segments]
        if rows:
            print(_table(("SEGMENT", "START", "END", "SECONDS", "FORMAT", "BYTES", "HOLES"),
                         rows), file=self.out)
        stored = cut.plan.audio_frames / cut.plan.rate
        print(f"{len(rows)} segment(s) of {device} in the bucket, {stored:.1f} s of audio "
              f"between {_when(start)} and {_when(end)}", file=self.out)
        for hole in cut.holes:
            print(f"  hole {_when(hole.utc)} +{_seconds(hole.seconds)}: {_reason(hole)}",
                  file=self.out)
        return 0

    # -- get ---------------------------------------------------------------------

    async def _get(self, fleet: Fleet) -> int:
        args = self.args
        start, end = _range(args, "start", "end", fleet.now(), self.config.max_range_seconds)
        device = check_device(args.device)
        wait = self.config.timeout_seconds if args.timeout is None else args.timeout
        output = Path(args.output)
        with workdir() as tmp:
            getter = Getter(fleet, Path(tmp))
            cut = await getter.plan(device, start, end)
            if not cut.segments and not await fleet.known(device):
                raise _unknown(device)
            missing = [h for h in cut.holes if h.reason == "missing"]
            if missing and args.request:
                placed = await getter.request_missing(cut, _ANSWER_FORMAT[args.format], _who())
                self._note(f"asked {device} for {len(placed)} stretch(es) not in the bucket: "
                           + ", ".join(r.id for r in placed))
                answers, waiting = await getter.wait(device, [r.id for r in placed], wait,
                                                     self._progress(device))
                await getter.add_answers(cut, answers, [r for r in placed if r.id in waiting])
            if cut.plan.audio_frames == 0:
                self._report(cut, args.format)
                self._note(f"nothing of {device} between {_when(start)} and {_when(end)} to "
                           f"write; no file written")
                return 1
            captured = max(s.meta.channels for s in cut.segments) if cut.segments else 1
            if args.channels and captured > 1 and args.channels > captured:
                raise FleetError(f"--channels {args.channels}: expected at most {captured} "
                                 "(the channels captured)")
            await getter.write(cut, output, args.format, args.rate, args.channels)
        self._report(cut, args.format)
        return 1 if any(h.reason in ("missing", "pending") for h in cut.holes) else 0

    def _progress(self, device: str) -> Callable[[float, list[str]], None] | None:
        if not self.err.isatty():
            return None
        wait = self.config.timeout_seconds if self.args.timeout is None else self.args.timeout

        def show(elapsed: float, states: list[str]) -> None:
            done = sum(s != "pending" for s in states)
            counts = ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states)))
            bar_width = 20
            filled = round(bar_width * done / len(states)) if states else bar_width
            line = (f"\r[{'#' * filled}{'.' * (bar_width - filled)}] waiting for {device}: "
                    f"{counts}; {elapsed:.0f} s of {wait:g} s")
            end = "\n" if done == len(states) or elapsed >= wait else ""
            print(line, end=end, file=self.err, flush=True)

        return show

    def _report(self, cut: Cut, fmt: str) -> None:
        audio = cut.frames / cut.rate if cut.rate else 0.0
        if self.as_json:
            self._print_json({
                "device": cut.device, "from": iso_utc(cut.start), "to": iso_utc(cut.end),
                "file": str(cut.path) if cut.path else None, "format": fmt, "rate": cut.rate,
                "channels": cut.channels, "frames": cut.frames, "seconds": audio,
                "bytes": cut.bytes, "sha256": cut.sha256,
                "first_utc": iso_utc(cut.plan.first_utc) if cut.plan.first_utc else None,
                "segments": [s.key for s in cut.segments],
                "answers": [msgspec.to_builtins(a) for a in cut.answers],
                "pending": cut.pending, "holes": [_hole_json(h) for h in cut.holes],
                "complete": all(h.reason not in ("missing", "pending") for h in cut.holes)})
        elif cut.path is not None:
            used = [*{item.meta.id for item in cut.plan.items if isinstance(item, SegmentPiece)}]
            answers = sum(1 for u in used if u.startswith("answer-"))
            print(f"wrote {cut.path}: {audio:.3f} s of {cut.device} ({cut.frames} frames at "
                  f"{cut.rate} Hz, {cut.channels} ch, {fmt}, {cut.bytes} bytes) from "
                  f"{len(used) - answers} stored segment(s)"
                  + (f" and {answers} answer(s) of the device" if answers else ""), file=self.out)
        for result in cut.answers:
            if result.state == "refused":
                self._note(f"request {result.id}: refused by {cut.device}: {result.reason}")
        for request_id in cut.pending:
            self._note(f"request {request_id}: no answer yet; `edge-agent fleet requests "
                       f"{cut.device}` shows when there is one")
        if not self.as_json:
            for hole in cut.holes:
                self._note(f"hole {_when(hole.utc)} +{_seconds(hole.seconds)}: {_reason(hole)}")

    # -- request, requests ---------------------------------------------------------

    async def _request(self, fleet: Fleet) -> int:
        args = self.args
        now = fleet.now()
        start, end = _range(args, "start", "end", now, self.config.max_range_seconds)
        device = await self._device(fleet, must_exist=True)
        request = Request(id=new_request_id(now, secrets.token_hex(4)), start=iso_utc(start),
                          end=iso_utc(end), format=cast(Format, args.format), rate=args.rate,
                          channels=args.channels, created=iso_utc(now), by=_who())
        await fleet.place(device, request)
        if self.as_json:
            self._print_json(msgspec.to_builtins(request))
        else:
            print(f"placed request {request.id} for {device}: {_when(start)} .. {_when(end)}, "
                  f"{request.format}; the answer goes to retrievals/{device}/{request.id}."
                  f"{FORMAT_EXTENSIONS[request.format]} (see: edge-agent fleet requests "
                  f"{device})", file=self.out)
        return 0

    async def _requests(self, fleet: Fleet) -> int:
        device = check_device(self.args.device)
        rows = await fleet.requests(device)
        if not rows and not await fleet.known(device):
            raise _unknown(device)
        if self.as_json:
            self._print_json([{"id": r.id, "state": r.state,
                               "in_mailbox": r.request is not None,
                               "request": msgspec.to_builtins(r.request) if r.request else None,
                               "result": msgspec.to_builtins(r.result) if r.result else None}
                              for r in rows])
            return 0
        if not rows:
            print(f"no requests for {device} in the last week", file=self.out)
            return 0
        print(_table(("REQUEST", "STATE", "FROM", "TO", "FORMAT", "BY", "DETAIL"),
                     [_request_cells(r) for r in rows]), file=self.out)
        waiting = sum(r.request is not None and r.result is None for r in rows)
        print(f"{waiting} waiting in the mailbox (at most {MAILBOX_LIMIT})", file=self.out)
        return 0


# ----------------------------------------------------------------------------
# Cells


def _unknown(device: str) -> FleetError:
    return FleetError(f"device {device}: unknown; the bucket holds no heartbeat "
                      f"(status/{device}.json) and no segments of it")


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "operator"
    return f"{user}@{socket.gethostname()}"


def _when(t: float) -> str:
    return iso_utc(t)[:19] + "Z"


def _seconds(s: float) -> str:
    return f"{s:.3f} s" if s < 10 else f"{s:.1f} s"


def _age(s: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s / size:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def _reason(hole: Hole) -> str:
    return {"missing": "not in the bucket (--request asks the device)",
            "pending": "asked of the device, no answer yet",
            "capture": "never captured (a hole the device recorded)",
            "not_held": "no longer held by the device",
            "overrun": "lost on the device (its segmenter fell behind)",
            "damage": "damaged on the device's disk"}.get(hole.reason, hole.reason)


def _hole_json(hole: Hole) -> dict[str, object]:
    return {"utc": iso_utc(hole.utc), "seconds": hole.seconds, "reason": hole.reason}


def _device_json(row: DeviceRow) -> dict[str, object]:
    beat = row.heartbeat
    return {"device": row.device, "last_seen": iso_utc(row.last_seen),
            "age_seconds": round(row.age, 3), "stale": row.stale,
            "health": beat.health if beat else None, "problem": row.problem or None,
            "heartbeat": msgspec.to_builtins(beat) if beat else None}


def _device_cells(row: DeviceRow) -> tuple[str, ...]:
    beat = row.heartbeat
    state = "STALE" if row.stale else "ok"
    if beat is None:
        return (row.device, _age(row.age), state, row.problem, "", "", "", "")
    health = beat.health + (f" ({'; '.join(beat.reasons)})" if beat.reasons else "")
    sp = beat.spool
    backlog = (f"{sp.get('segments', 0)} seg, {_number(sp.get('seconds', 0)):.0f} s, "
               f"{_number(sp.get('mb', 0)):.1f} MB") if sp else ""
    ck = beat.clock
    offset = ck.get("offset_seconds")
    clock = ("synced" if ck.get("synced") else "NOT synced") + (
        f" {float(offset):+.1f} s" if isinstance(offset, int | float) else "")
    oldest = beat.oldest_audio[:19] + "Z" if beat.oldest_audio else ""
    return (row.device, _age(row.age), state, health, backlog, clock if ck else "", oldest,
            beat.version)


def _number(value: object) -> float:
    """A heartbeat's figure (a device wrote it: not a number shows as nan)."""
    return float(value) if isinstance(value, int | float) else math.nan


def _request_cells(row: RequestRow) -> tuple[str, ...]:
    req, res = row.request, row.result
    start = (req.start if req else res.start if res else "")[:19] + "Z"
    end = (req.end if req else res.end if res else "")[:19] + "Z"
    fmt = req.format if req else res.format if res else ""
    detail = ""
    if res is not None:
        if res.state == "refused":
            detail = res.reason
        else:
            detail = f"{res.samples / res.rate if res.rate else 0:.1f} s in {res.key}"
            if res.gaps:
                detail += f", {len(res.gaps)} hole(s) {sum(g.seconds for g in res.gaps):.1f} s"
    elif req is None:
        detail = "no longer in the mailbox"
    return (row.id, row.state, start, end, fmt, req.by if req else "", detail)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [header, *rows]]
    return "\n".join(lines)
