"""The child processes a run is made of: each measurement runs the agent in a
worker process of its own (`Job`), against the reference backend in another
(`BackendProcess`), so each one's CPU time and RSS are its own; the C tools of
the CPU comparison run through `run_tool`. CPU seconds of a child come from
`wait4`, never from wall time.

Measures nothing by itself. Imports `edge_agent` as an installed library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import trio

from bench.common import BenchError

__all__ = ["BackendProcess", "Job", "require_tool", "run_tool", "serve_backend", "wait_child"]


def _child_env() -> dict[str, str]:
    """This environment, with the directory holding the `bench` package on the
    module path, so a child runs ``python -m bench`` from any working directory."""
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env

def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BenchError(f"{name} is not installed (apt-get install "
                         f"{'opus-tools' if name == 'opusenc' else name}); it is the "
                         "comparison point of the CPU benchmark")
    return path


def wait_child(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, float]:
    """Reap `proc` with wait4 (its own rusage); kill it after `timeout` seconds.

    Returns (exit status, CPU seconds of the child).
    """
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            proc.kill()
            deadline = time.monotonic() + 10
        time.sleep(0.02)


def run_tool(argv: list[str]) -> float:
    """Run a command to completion and return its CPU seconds (user + system)."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    code, cpu = wait_child(proc, 600)
    if code != 0:
        raise BenchError(f"{argv[0]} failed (exit {code}): "
                         f"{err.decode('utf-8', 'replace').strip()[:300]}")
    return cpu


# ----------------------------------------------------------------------------
# The reference backend, in its own process


def serve_backend(data_dir: Path) -> None:
    """Child process: serve the reference backend (no speech recognition: it
    decodes each STT chunk and answers with its duration) until stdin closes."""
    from edge_agent.reference import Backend, SttReceiver, run_backend

    async def serve() -> None:
        backend = Backend(data_dir, stt=SttReceiver(recognise=False))
        async with trio.open_nursery() as nursery:
            url = await nursery.start(run_backend, backend, "127.0.0.1:0")
            sys.stdout.write(f"{url}\n")
            sys.stdout.flush()
            await trio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()

    trio.run(serve)


class BackendProcess:
    """The reference backend in a child process; `stop()` returns its CPU seconds."""

    def __init__(self, data_dir: Path, log_file: IO[bytes]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench", "--serve-backend", str(data_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, env=_child_env())
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if not line.startswith("http"):
            self.stop()
            raise BenchError("the reference backend did not start (see the bench log)")
        self.url = line

    def stop(self) -> float:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        _, cpu = wait_child(self.proc, 30)
        return cpu


class Job:
    """One measurement: its own reference backend and a worker child process
    running the agent against it. Start several to run them side by side;
    `finish()` waits and returns (the worker's JSON, the backend's CPU seconds)."""

    def __init__(self, kind: str, params: dict[str, Any], work: Path, name: str,
                 timeout: float) -> None:
        self.kind, self.timeout = kind, timeout
        self.log_path = work / "bench.log"
        self.out = work / f"{name}.json"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in finish)
        self.backend = BackendProcess(work / f"backend-{name}", self._log)
        params = {**params, "data_dir": str(work / f"agent-{name}"),
                  "backend_url": self.backend.url, "out": str(self.out)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench", "--worker", kind],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log, env=_child_env())
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(params).encode())
        self.proc.stdin.close()

    def finish(self) -> tuple[dict[str, Any], float]:
        try:
            try:
                code = self.proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise BenchError(f"the {self.kind} measurement took more than "
                                 f"{self.timeout:g} s (see {self.log_path})") from None
        finally:
            backend_cpu = self.backend.stop()
            self._log.close()
        if code != 0 or not self.out.exists():
            raise BenchError(f"the {self.kind} measurement failed (exit {code}); "
                             f"see {self.log_path}")
        result: dict[str, Any] = json.loads(self.out.read_text(encoding="utf-8"))
        return result, backend_cpu
