"""The one exception base of edge-agent, and how a failure is put in one line.

Every error the agent raises on purpose (a bad config, a capture device that is
gone, a codec or spool failure, a store that refuses) derives from
`EdgeAgentError`, so code embedding the agent can catch them all in one place.
`StartupError` is the start-up failure a person caused and can fix (a port in
use, a data dir the agent may not write). `describe` is what logs and health
reasons say of any failure: its innermost cause, never the text of the Trio
nursery's `ExceptionGroup` around it.

This module imports nothing of the project: everything else may import it.
"""

from __future__ import annotations

import errno

__all__ = ["EdgeAgentError", "StartupError", "describe", "innermost", "ungrouped"]

# Where the C library's wording does not say what a person should check.
_OS_CAUSES = {
    errno.EADDRNOTAVAIL: "address not available on this host",
}


class EdgeAgentError(Exception):
    """Base of the errors edge-agent raises on purpose."""


class StartupError(EdgeAgentError):
    """A start-up failure a person caused and can fix, in one line naming the
    setting (a config key or a command-line flag), its value and the cause:
    ``api.listen 127.0.0.1:8640: address already in use``."""

    def __init__(self, setting: str, value: object, cause: str) -> None:
        super().__init__(f"{setting} {value}: {cause}")
        self.setting = setting
        self.value = value
        self.cause = cause

    @classmethod
    def from_os_error(cls, setting: str, value: object, exc: OSError) -> StartupError:
        """The failure of an OS call on `setting`'s value, in the words of the
        C library (``permission denied``) where they say what to check."""
        cause = _OS_CAUSES.get(exc.errno or 0) or exc.strerror or str(exc) or type(exc).__name__
        return cls(setting, value, cause[:1].lower() + cause[1:])


def ungrouped(exc: BaseException) -> BaseException:
    """The exception inside exception groups (the Trio nursery's): of each group its
    first `Exception`, since a group also holding a `Cancelled` failed for the other
    reason. Its own traceback and ``__cause__`` chain are what a log should show."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        members = exc.exceptions
        exc = next((e for e in members if isinstance(e, Exception)), members[0])
    return exc


def innermost(exc: BaseException) -> BaseException:
    """The exception that says what went wrong, inside the ones that wrap it: out
    of exception groups (`ungrouped`) and down ``__cause__``, stopping at an
    `EdgeAgentError`, whose message was written for a person."""
    exc = ungrouped(exc)
    seen = {id(exc)}
    while not isinstance(exc, EdgeAgentError) and exc.__cause__ is not None:
        exc = ungrouped(exc.__cause__)
        if id(exc) in seen:
            break
        seen.add(id(exc))
    return exc


def describe(exc: BaseException) -> str:
    """One line for a failure, as logs and health reasons give it:
    ``OSError: [Errno 28] No space left on device`` (the innermost cause)."""
    cause = innermost(exc)
    text = "; ".join(line.strip() for line in str(cause).splitlines() if line.strip())
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


class CaptureError(EdgeAgentError):
    """Capture cannot go on (device missing, refused settings, device lost).

    The message is one line meant for the person on site. It lives here, not in
    the capture stage, so the command line can report it without importing capture.
    """
