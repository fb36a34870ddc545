"""What no client can do to the API's connections: take the server down with an
HTTP/2 request it cannot parse, or hold every descriptor with idle connections
so that health checks go unanswered."""

from __future__ import annotations

import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h2.config
import h2.connection
import httpx
import trio

from support.api_agent import TOKEN, serve_agent
from support.waiting import until


def host_port(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").partition(":")
    return host, int(port)


def h2_request(path: bytes, token: str | None) -> bytes:
    """The bytes an HTTP/2 client with prior knowledge sends for one GET."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
    conn.initiate_connection()
    headers = [(b":method", b"GET"), (b":path", path), (b":scheme", b"http"),
               (b":authority", b"device")]
    if token:
        headers.append((b"authorization", b"Bearer " + token.encode()))
    conn.send_headers(1, headers, end_stream=True)
    return conn.data_to_send()


async def exchange(url: str, request: bytes) -> bytes:
    """Send raw bytes on a new connection; what the server sent until it closed."""
    answer = b""
    async with await trio.open_tcp_stream(*host_port(url)) as stream:
        await stream.send_all(request)
        with trio.move_on_after(5):
            while data := await stream.receive_some(65536):
                answer += data
    return answer


async def test_http2_is_not_spoken_and_cannot_restart_the_api(tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as s:
        api = s.agent.tasks["api"]
        starts = api.starts
        # An authorised request on a connection of its own, held open meanwhile.
        async with httpx.AsyncClient(base_url=s.url, timeout=20,
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as other:
            assert (await other.get("/v1/status")).status_code == 200
            # Prior knowledge, a path that is not ASCII, no token: an HTTP/1.1
            # 505 for the preface, never an HTTP/2 frame.
            answer = await exchange(s.url, h2_request(b"/v1/\xff\xfe", None))
            assert answer.startswith(b"HTTP/1.1 505 ")
            answer = await exchange(s.url, h2_request(b"/v1/status", TOKEN))
            assert answer.startswith(b"HTTP/1.1 505 ")
            assert (await other.get("/v1/status")).status_code == 200  # same connection
        assert api.starts == starts and api.failures == 0
        # An h2c upgrade is ignored: the request is answered over HTTP/1.1.
        upgrade = (b"GET /v1/status HTTP/1.1\r\nHost: device\r\n"
                   b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                   b"Connection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\n"
                   b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
        answer = await exchange(s.url, upgrade)
        assert answer.startswith(b"HTTP/1.1 200 ") and b'"connections"' in answer
        # A body is refused however the request asks for HTTP/2.
        post = (b"POST /v1/recordings HTTP/1.1\r\nHost: device\r\nUpgrade: h2c\r\n"
                b"Connection: Upgrade, HTTP2-Settings, close\r\n"
                b"HTTP2-Settings: AAMAAABkAAQAAP__\r\nContent-Length: 5\r\n\r\nhello")
        assert (await exchange(s.url, post)).startswith(b"HTTP/1.1 413 ")
        assert (await s.client.get("/healthz")).status_code == 200


async def test_a_connection_flood_is_capped_and_health_checks_still_answer(
        tmp_path: Path) -> None:
    # Hypercorn keeps a closed keep-alive connection's task until its idle timeout.
    async with serve_agent(tmp_path, max_connections=4, request_timeout_seconds=6.0) as s:
        assert s.agent.api is not None
        stats = s.agent.api.stats.connections
        flood = [await trio.open_tcp_stream(*host_port(s.url)) for _ in range(4 + 8 + 6)]
        await until(lambda: stats.refused >= 6, limit=5)
        assert stats.open <= 4 + 8  # the descriptors a flood can hold are bounded
        await trio.sleep(2.5)  # idle connections over the cap are closed soon
        async with httpx.AsyncClient(base_url=s.url, timeout=5,
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as fresh:
            health = await fresh.get("/healthz")
            assert health.status_code == 200
            busy = await fresh.get("/v1/status")
            assert busy.status_code == 503 and busy.json()["status"] == 503
        for stream in flood:
            await stream.aclose()
        await until(lambda: stats.open == 0, limit=12)
        assert (await s.client.get("/v1/status")).status_code == 200
        text = (await s.client.get("/metrics")).text
        assert f"edge_agent_api_connections_refused_total {float(stats.refused)}" in text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_flood_of_idle_connections_never_takes_descriptors_from_the_spool(
        tmp_path: Path) -> None:
    # The agent under a descriptor limit of 256 (soft and hard), and 400 idle
    # connections held against it: past the cap they are refused, so the spool
    # keeps writing and sealing, and /healthz answers.
    port = free_port()
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'[device]\ndata_dir = "{tmp_path}/data"\n'
        '[capture]\nsource = "tone"\nrate = 16000\n'
        '[segments]\nseconds = 5\nfsync_seconds = 0.5\n'
        f'[api]\nenabled = true\nlisten = "127.0.0.1:{port}"\ntoken_file = "{token}"\n'
        'max_connections = 64\n')

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)],
                            stderr=subprocess.PIPE, text=True, preexec_fn=low_limit)
    assert proc.stderr is not None
    flood: list[socket.socket] = []
    try:
        for line in proc.stderr:
            if "agent ready" in line:
                break
        for _ in range(400):
            flood.append(socket.create_connection(("127.0.0.1", port)))
        time.sleep(11)  # two 5 s boundaries pass with the flood held
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert health.status_code == 200
    finally:
        for sock in flood:
            sock.close()
        proc.send_signal(signal.SIGTERM)
        try:
            err = proc.communicate(timeout=20)[1]
        finally:
            proc.kill()
    assert "Too many open files" not in err and "segment write failed" not in err
    sealed = list((tmp_path / "data" / "spool" / "sealed").iterdir())
    assert len(sealed) >= 3  # two boundaries in the flood, and the seal at the stop
