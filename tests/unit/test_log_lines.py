"""Log lines as a person or a log shipper reads them: every ``key=value`` quoted
the same way whatever the call site wrote, and under journald a priority on every
line of a record, traceback included."""

from __future__ import annotations

import json
import logging
import re
import sys

from edge_agent.errors import StartupError
from edge_agent.logs import JournalFormatter, KeyValueFormatter


def record(level: int, msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    return logging.LogRecord("edge_agent.test", level, __file__, 1, msg, args,
                             sys.exc_info() if exc else None)


def fields(line: str) -> dict[str, str]:
    """A logfmt reader: bare words, or JSON strings."""
    found = re.findall(r'([\w.-]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)', line)
    return {key: json.loads(value) if value.startswith('"') else value for key, value in found}


def test_values_are_quoted_the_same_way_whatever_the_call_site_wrote() -> None:
    error = OSError(98, "Address already in use")
    line = KeyValueFormatter().format(record(
        logging.WARNING,
        "upload failed id=%s reason=%r text=%r device=%r path=%s error=%r tries=%d in=%.2fs "
        "done=100%%", "seg-1", "no answer within 30 s", 'he said "hi"\nbye', "default",
        "/var/lib/edge agent", error, 3, 1.5))
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=WARNING "
                    r"logger=edge_agent\.test upload failed id=seg-1 ", line)
    assert "\n" not in line
    assert fields(line) == {
        "level": "WARNING", "logger": "edge_agent.test", "id": "seg-1",
        "reason": "no answer within 30 s", "text": 'he said "hi"\nbye', "device": "default",
        "path": "/var/lib/edge agent", "error": "OSError: [Errno 98] Address already in use",
        "tries": "3", "in": "1.50s", "done": "100%"}


def test_an_error_value_is_its_innermost_cause() -> None:
    try:
        raise ExceptionGroup("Exceptions from Trio nursery", [
            StartupError("api.listen", "127.0.0.1:8640", "address already in use")])
    except ExceptionGroup as group:
        line = KeyValueFormatter().format(record(logging.WARNING, "task failed error=%s", group))
    assert fields(line)["error"] == (
        "StartupError: api.listen 127.0.0.1:8640: address already in use")


def test_under_journald_every_line_of_a_record_carries_its_priority() -> None:
    formatter = JournalFormatter()
    try:
        raise ValueError("bad block")
    except ValueError:
        text = formatter.format(record(logging.ERROR, "segment write failed doing=%s", "seal",
                                       exc=True))
    lines = text.splitlines()
    assert lines[0] == "<3>level=ERROR logger=edge_agent.test segment write failed doing=seal"
    assert lines[-1] == "<3>ValueError: bad block"
    assert all(line.startswith("<3>") for line in lines) and len(lines) > 3
    levels = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)
    assert [formatter.format(record(level, "x"))[:3] for level in levels] == [
        "<7>", "<6>", "<4>", "<3>", "<2>"]
