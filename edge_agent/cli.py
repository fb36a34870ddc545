"""The `edge-agent` command line.

Every error a person on site can cause (a bad config, a missing device, a wrong
argument) ends with one clear line per problem on stderr and exit status 2;
tracebacks are for bugs only.

The top layer: each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import EdgeAgentError
from .logs import print_error, setup_logging

__all__ = ["main"]

EXIT_USAGE = 2


class _Fail(Exception):
    """Raised inside a command to end with exit status 2 and these lines."""

    def __init__(self, *lines: str) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


class _Version(argparse.Action):
    """--version, with the version read only when asked (reading it costs start-up)."""

    def __call__(self, parser: argparse.ArgumentParser, *_args: object) -> None:
        from .wire import agent_version

        print(f"edge-agent {agent_version()}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-agent",
        description="Always-on audio agent: capture, live transcription, durable spool, "
        "device API.",
    )
    p.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="default: info")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the agent")
    run.add_argument("--config", "-c", required=True, type=Path, help="the TOML config file")

    demo = sub.add_parser("demo", help="run the agent end to end on a bundled speech sample")
    demo.add_argument("--data-dir", type=Path,
                      help="where to put the files (default: a new temporary directory)")
    demo.add_argument("--fast", action="store_true",
                      help="feed the sample as fast as possible instead of in real time")
    demo.add_argument("--serve", type=float, metavar="SECONDS",
                      help="keep the agent running with its HTTP API on loopback and print "
                      "curl commands to try it; stop after SECONDS (0: on Ctrl-C)")

    sub.add_parser("devices", help="list audio input devices")

    lv = sub.add_parser("levels", help="live level meter of the input, to set the mic gain")
    lv.add_argument("--config", "-c", type=Path,
                    help="the TOML config file (default: built-in defaults)")
    lv.add_argument("--device", "-d",
                    help="input device by name substring or index (overrides the config)")
    lv.add_argument("--seconds", type=float, default=0.0,
                    help="stop after this much audio (default: until Ctrl-C)")

    backend = sub.add_parser("backend", help="run the reference backend (segment uploads, STT)")
    backend.add_argument("--listen", default="127.0.0.1:8650", metavar="HOST:PORT",
                         help="address to listen on (default: 127.0.0.1:8650)")
    backend.add_argument("--data-dir", required=True, type=Path,
                         help="where received segments are stored")

    disc = sub.add_parser("discover", help="list the edge-agent devices on the local network "
                          "(mDNS)")
    disc.add_argument("--seconds", type=float, default=3.0,
                      help="how long to wait for answers (default: 3)")
    disc.add_argument("--json", action="store_true", help="print JSON, for scripts")

    _fleet_parser(sub)

    cfg = sub.add_parser("config", help="create, check, show or edit a config file")
    csub = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    init = csub.add_parser("init", help="write a complete default config")
    init.add_argument("path", nargs="?", type=Path, help="file to write (default: stdout)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    check = csub.add_parser("check", help="validate a config file")
    check.add_argument("path", type=Path)
    show = csub.add_parser("show", help="print the effective config, defaults included")
    show.add_argument("path", type=Path)
    setp = csub.add_parser("set", help="edit keys in place: key.path=value ...")
    setp.add_argument("path", type=Path)
    setp.add_argument("assignments", nargs="+", metavar="key.path=value")
    return p


def _fleet_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fleet = sub.add_parser("fleet", help="the operator's view of a fleet through the bucket "
                           "it uploads to (fleet.toml)")
    fsub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", type=Path, default=Path("fleet.toml"),
                        help="the operator's fleet.toml (default: ./fleet.toml)")
    common.add_argument("--json", action="store_true", help="print JSON, for scripts")
    times = ("times: ISO 8601 (UTC unless an offset is given), now, or now minus a span: "
             "now-15m, now-2h, now-1d")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return fsub.add_parser(name, help=help_text, parents=[common], epilog=times)

    add("devices", "a table of the devices from their heartbeats; stale ones marked")
    seg = add("segments", "a device's segments in the bucket in a range, and the holes")
    seg.add_argument("device")
    seg.add_argument("--from", dest="from_", required=True, metavar="TIME")
    seg.add_argument("--to", required=True, metavar="TIME")
    get = add("get", "a range of a device's audio, stitched from the bucket (and the device)")
    req = add("request", "ask a device for a range of audio (answered into the bucket)")
    for p in (get, req):
        p.add_argument("device")
        p.add_argument("start", metavar="START")
        p.add_argument("end", metavar="END")
        p.add_argument("--format", default="opus", choices=["opus", "wav", "flac", "pcm"],
                       help="default: opus")
        p.add_argument("--rate", type=int, help="sample rate (default: as captured)")
        p.add_argument("--channels", type=int, help="channels (default: as captured)")
    get.add_argument("-o", "--output", required=True, metavar="FILE", help="file to write")
    get.add_argument("--request", action="store_true",
                     help="ask the device for what the bucket lacks, wait and splice it in")
    get.add_argument("--timeout", type=float, metavar="SECONDS",
                     help="how long --request waits (default: timeout_seconds of fleet.toml)")
    reqs = add("requests", "a device's retrieval requests of the last week and their state")
    reqs.add_argument("device")


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    args = _parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        if args.command == "config":
            return _config(args)
        if args.command == "devices":
            return _devices()
        if args.command == "levels":
            return _levels(args.config, args.device, args.seconds)
        if args.command == "run":
            return _run(args.config, started)
        if args.command == "backend":
            return _backend(args.listen, args.data_dir)
        if args.command == "demo":
            return _demo(args.data_dir, fast=args.fast, serve=args.serve)
        if args.command == "discover":
            return _discover(args.seconds, as_json=args.json)
        if args.command == "fleet":
            from .fleet.operator_cli import run_fleet

            return run_fleet(args)
    except _Fail as exc:
        print_error(str(exc))
        return EXIT_USAGE
    except EdgeAgentError as exc:  # a bad config (one line per problem), port, device...
        for line in getattr(exc, "problems", None) or [str(exc)]:
            print_error(line)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled command {args.command}")


def _config(args: argparse.Namespace) -> int:
    # `check` is what the unit runs before every start: it needs the schema only.
    from . import config as cfgmod

    action = args.config_command
    if action == "check":
        checked = cfgmod.load_config(args.path)
        for line in cfgmod.config_warnings(checked):
            print(f"warning: {args.path}: {line}", file=sys.stderr)
        print(f"{args.path}: ok")
        return 0
    from . import configfile
    from .fs import write_atomic

    if action == "init":
        text = configfile.render(cfgmod.default_config(), header=configfile.HEADER)
        if args.path is None:
            sys.stdout.write(text)
            return 0
        if args.path.exists() and not args.force:
            raise _Fail(f"{args.path}: already exists (use --force to overwrite)")
        write_atomic(args.path, text)
        print(f"wrote {args.path}")
        return 0
    if action == "show":
        sys.stdout.write(configfile.render(cfgmod.load_config(args.path)))
        return 0
    if action == "set":
        # Validated before anything touches the file; comments and order are kept.
        write_atomic(args.path, configfile.edit(args.path, args.assignments))
        print(f"{args.path}: updated {', '.join(a.partition('=')[0] for a in args.assignments)}")
        return 0
    raise AssertionError(action)


def _devices() -> int:
    from .capture import list_input_devices

    devices = list_input_devices()
    if not devices:
        print("no audio input devices found")
        return 1
    print(f"{'index':>5}  {'channels':>8}  {'rate':>7}  {'host API':<12}  name")
    for d in devices:
        mark = " (default)" if d.is_default else ""
        print(f"{d.index:>5}  {d.channels:>8}  {d.default_rate:>7g}  {d.hostapi:<12}  "
              f"{d.name}{mark}")
    return 0


def _levels(path: Path | None, device: str | None, seconds: float) -> int:
    import msgspec
    import trio

    from . import config as cfgmod
    from .capture import make_source
    from .capture.levels import GOOD_PEAK_HIGH, GOOD_PEAK_LOW, LevelMeter, run_levels
    from .clock import SystemClock

    if not seconds >= 0:
        raise _Fail(f"--seconds {seconds:g}: expected a number of seconds, 0 or more")
    config = cfgmod.load_config(path) if path is not None else cfgmod.default_config()
    cap = config.capture
    if device is not None:
        cap = msgspec.structs.replace(
            cap, source="sounddevice", device=int(device) if device.isdigit() else device)
    source = make_source(cap, SystemClock())
    what = f"device {cap.device!r}" if cap.source == "sounddevice" else f"{cap.source} source"
    print(f"levels of {what}, {cap.rate} Hz, {cap.channels} ch: speak at the usual distance; "
          f"speech should peak between {GOOD_PEAK_LOW:g} and {GOOD_PEAK_HIGH:g} dBFS")
    live = sys.stdout.isatty()
    meter = LevelMeter(source.rate, window_seconds=0.1)
    try:
        # On a terminal, ten readings a second on one line; otherwise a line a second.
        summary = trio.run(lambda: run_levels(source, sys.stdout, seconds=seconds, live=live,
                                              print_every=1 if live else 10, meter=meter))
    except KeyboardInterrupt:
        summary = meter.summary
        print()
    print(f"summary: {summary.seconds:.1f} s, peak {summary.peak_dbfs:.1f} dBFS, "
          f"rms {summary.rms_dbfs:.1f} dBFS, overflows {summary.overflows}")
    print(summary.advice())
    return 0


def _raise_descriptor_limit() -> None:
    """Raise the soft limit on open files to the hard one: the API's connections,
    the spool, STT and uploads all hold descriptors (the unit sets LimitNOFILE)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _run(path: Path, started: float) -> int:
    import trio

    from . import config as cfgmod
    from .agent import Agent

    config = cfgmod.load_config(path)
    _raise_descriptor_limit()
    agent = Agent(config, config_path=path, started_at=started)  # SIGHUP re-reads the file
    trio.run(lambda: agent.run(handle_signals=True))
    return 0


def _backend(listen: str, data_dir: Path) -> int:
    import trio

    from .errors import StartupError
    from .fs import make_writable_dir
    from .reference import Backend, run_backend

    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise _Fail(f"--listen {listen}: expected HOST:PORT, such as 127.0.0.1:8650")
    try:
        make_writable_dir(data_dir)
    except OSError as exc:
        raise StartupError.from_os_error("--data-dir", data_dir, exc) from exc
    trio.run(lambda: run_backend(Backend(data_dir), listen, setting="--listen"))
    return 0


def _discover(seconds: float, *, as_json: bool) -> int:
    import msgspec

    from .discovery import DiscoveryError, browse

    if not 0 < seconds <= 600:
        raise _Fail(f"--seconds {seconds:g}: expected a number of seconds above 0, "
                    "at most 600")
    try:
        devices = browse(seconds)
    except DiscoveryError as exc:
        raise _Fail(f"discover: {exc}") from None
    if as_json:
        print(msgspec.json.format(msgspec.json.encode(devices)).decode())
    elif not devices:
        print(f"no edge-agent device answered within {seconds:g} s", file=sys.stderr)
    else:
        rows = [("device", "address", "version", "url")]
        rows += [(d.device, d.address, d.version, d.url) for d in devices]
        w = [max(len(row[i]) for row in rows) for i in range(3)]
        for device, address, version, url in rows:
            print(f"{device:<{w[0]}}  {address:<{w[1]}}  {version:<{w[2]}}  {url}")
    return 0 if devices else 1


def _demo(data_dir: Path | None, *, fast: bool, serve: float | None = None) -> int:
    import trio

    from .demo import run_demo

    if serve is not None and not serve >= 0:
        raise _Fail(f"--serve {serve:g}: expected a number of seconds, 0 or more")
    until = None if serve is None else (serve or float("inf"))

    def show_commands(commands: list[str]) -> None:
        wait = "Ctrl-C stops it" if until == float("inf") else f"it stops in {until:g} s"
        print(f"the device API is serving; try it ({wait}):")
        for command in commands:
            print(f"  {command}")
        sys.stdout.flush()

    if data_dir is None:
        data_dir = Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    print(f"edge-agent demo: data dir {data_dir}")
    print("playing the bundled speech sample through the agent"
          + (" as fast as possible" if fast else " in real time") + " ...")
    report = trio.run(lambda: run_demo(data_dir, realtime=not fast, serve=until,
                                       on_api=show_commands))
    print(f"captured {report.seconds_captured:.2f} s in {report.blocks} blocks, "
          f"{report.input_overflows} input overflows")
    for (meta, state), f in zip(report.segments, report.files, strict=True):
        print(f"{state} segment {meta.id}: {meta.start_utc} .. {meta.end_utc}, "
              f"{meta.seconds:.2f} s, {meta.bytes} bytes, {f}")
    print(f"total {report.bytes_written} bytes written under {report.data_dir}")
    print(f"the reference backend at {report.backend_url} holds {len(report.synced)} "
          f"segment(s) under {report.backend_dir}:")
    for s in report.synced:
        print(f"  {s.id}: {s.bytes} bytes, sha256 {s.sha256[:16]}..., {s.path.name}")
    if report.stt is not None:
        st = report.stt
        print(f"live transcription: {st.chunks_sent} chunk(s) sent ({st.bytes_sent} bytes of "
              f"Opus), {st.seconds_skipped:.1f} s of silence not sent, {st.dropped} dropped:")
        for t in report.transcripts:
            print(f"  {t.start_utc} +{t.duration:.2f} s: {t.text}")
    return 0
