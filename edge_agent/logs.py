"""Log lines: one per event, ``key=value`` fields, to stderr.

On a terminal or into a file a line reads
``2026-05-04T12:00:00.123Z level=WARNING logger=edge_agent.supervisor task failed
task=api error="StartupError: api.listen 127.0.0.1:8640: address already in use"``.
Under systemd, when stderr is the journal stream named by ``JOURNAL_STREAM``, each
line starts with its syslog priority instead of a time (``<3>`` error, ``<4>``
warning, ``<6>`` info, ``<7>`` debug; sd-daemon(3)): journald keeps the time and
files the priority, so ``journalctl -p err`` finds the errors, every line of a
traceback included.

Quoting is done here, once, for every call site: a value that follows ``key=`` in
a message is written bare when it is one word and as a double-quoted string with
JSON escapes otherwise; an exception value is its innermost cause
(`errors.describe`). httpx's and httpcore's own line per request are left out:
the agent logs what matters of its requests itself.

The command line's own ``error:`` lines (`print_error`) get the error priority too.

Imports only ``errors``; the command line sets logging up with `setup_logging`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import ClassVar, TextIO

from .errors import describe

__all__ = ["JournalFormatter", "KeyValueFormatter", "print_error", "setup_logging",
           "writes_to_journal"]

# Loggers whose INFO lines repeat what the agent logs itself (a line per request).
QUIET_LOGGERS = ("httpx", "httpcore")

# One printf conversion: the key it follows (``key=%s``), if any, and its type.
_CONVERSION = re.compile(
    r"(?P<key>\b[\w.-]+=)?%(?P<spec>\([^)]*\))?[#0 +-]*(?:\*|\d+)?(?:\.(?:\*|\d+))?"
    r"(?P<type>[diouxXeEfFgGcrsa%])")
# A value is written bare when it is one word that cannot be misread.
_BARE = re.compile(r'[^\s"=\\\x00-\x1f\x7f]+')


def quote(value: str) -> str:
    """``value`` as a logfmt value: bare when one word, JSON-quoted otherwise."""
    return value if _BARE.fullmatch(value) else json.dumps(value, ensure_ascii=False)


def _field_text(value: object, conversion: str) -> str:
    """The text of a field's value before quoting; a string is itself, even for %r."""
    if isinstance(value, BaseException):
        return describe(value)
    if conversion in "ra" and not isinstance(value, str):
        return repr(value) if conversion == "r" else ascii(value)
    return str(value)


def render_message(record: logging.LogRecord) -> str:
    """The record's message, each ``key=%s`` / ``key=%r`` value quoted by `quote`.

    Falls back to the standard rendering for anything it does not follow
    (mapping arguments, ``*`` widths, a count that does not match).
    """
    msg, args = record.msg, record.args
    if not isinstance(msg, str) or not isinstance(args, tuple) or not args:
        return record.getMessage()
    out: list[str] = []
    done = used = 0
    try:
        for match in _CONVERSION.finditer(msg):
            out.append(msg[done:match.start()])
            done = match.end()
            key, kind = match["key"] or "", match["type"]
            if kind == "%":
                out.append(key + "%")
                continue
            if match["spec"] is not None or "*" in match[0]:
                return record.getMessage()
            value = args[used]
            used += 1
            conversion = match[0][len(key):]
            if key and kind in "sra":
                out.append(key + quote(_field_text(value, kind)))
            else:
                out.append(key + conversion % (value,))
    except (IndexError, TypeError, ValueError):
        return record.getMessage()
    if used != len(args):
        return record.getMessage()
    out.append(msg[done:])
    return "".join(out)


class KeyValueFormatter(logging.Formatter):
    """``time level=... logger=... message``; a traceback follows on its own lines."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = render_message(record)
        text = (f"{self.head(record)}level={record.levelname} logger={record.name} "
                f"{record.message}")
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text

    def head(self, record: logging.LogRecord) -> str:
        """What precedes the fields: the time, UTC to the millisecond."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z "


class JournalFormatter(KeyValueFormatter):
    """Lines for journald: a syslog priority before every line, no time."""

    PRIORITIES: ClassVar[dict[int, int]] = {
        logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
        logging.DEBUG: 7,
    }

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{self.priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))

    def head(self, record: logging.LogRecord) -> str:
        return ""

    def priority(self, levelno: int) -> int:
        """The syslog priority of a level: the nearest standard level at or below it."""
        for level in sorted(self.PRIORITIES, reverse=True):
            if levelno >= level:
                return self.PRIORITIES[level]
        return self.PRIORITIES[logging.DEBUG]


def writes_to_journal(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether `stream` is the journal stream systemd connected: ``JOURNAL_STREAM``
    names its device and inode (a child whose stderr was redirected inherits the
    variable, so the variable alone is not enough)."""
    dev, _, ino = environ.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup_logging(level: str, stream: TextIO | None = None) -> None:
    """Send every log line at `level` ("debug", "info", ...) and above to `stream`
    (stderr), for journald when it is the journal stream. Like
    `logging.basicConfig`, it leaves a program that set up logging itself alone."""
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JournalFormatter() if writes_to_journal(stream)
                         else KeyValueFormatter())
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def print_error(text: str, stream: TextIO | None = None) -> None:
    """The command line's own ``error: ...`` line, at priority err under journald
    (``journalctl -p err`` finds why the service would not start)."""
    stream = stream if stream is not None else sys.stderr
    prefix = f"<{JournalFormatter.PRIORITIES[logging.ERROR]}>" if writes_to_journal(stream) else ""
    print(f"{prefix}error: {text}", file=stream)
