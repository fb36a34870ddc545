"""What no client can do to the API's connections: take the server down with an
HTTP/2 request it cannot parse, or hold every descriptor with idle connections
so that health checks go unanswered."""

from __future__ import annotations

from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import trio

from support.api_agent import TOKEN, serve_agent
from support.waiting import until


def host_port(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").partition(":")
    return host, int(port)


async def h2_request(url: str, path: bytes, token: str | None) -> list[h2.events.Event]:
    """One HTTP/2 request with prior knowledge; the events the server sent back."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False))
    conn.initiate_connection()
    headers = [(b":method", b"GET"), (b":path", path), (b":scheme", b"http"),
               (b":authority", b"device")]
    if token:
        headers.append((b"authorization", b"Bearer " + token.encode()))
    conn.send_headers(1, headers, end_stream=True)
    events: list[h2.events.Event] = []
    stream = await trio.open_tcp_stream(*host_port(url))
    async with stream:
        await stream.send_all(conn.data_to_send())
        with trio.move_on_after(3):
            while data := await stream.receive_some(65536):
                events += conn.receive_data(data)
                if any(isinstance(e, h2.events.StreamEnded | h2.events.ConnectionTerminated)
                       for e in events):
                    break
    return events


def status_of(events: list[h2.events.Event]) -> int | None:
    for event in events:
        if isinstance(event, h2.events.ResponseReceived):
            return int(dict(event.headers)[b":status"])
    return None


async def test_an_http2_request_that_cannot_be_parsed_never_restarts_the_api(
        tmp_path: Path) -> None:
    async with serve_agent(tmp_path) as s:
        api = s.agent.tasks["api"]
        starts = api.starts
        # An authorised request on a connection of its own, held open meanwhile.
        async with httpx.AsyncClient(base_url=s.url, timeout=20,
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as other:
            assert (await other.get("/v1/status")).status_code == 200
            events = await h2_request(s.url, b"/v1/\xff\xfe", None)
            assert status_of(events) in (None, 400, 401, 505)  # never a 500
            assert (await other.get("/v1/status")).status_code == 200  # same connection
        assert api.starts == starts and api.failures == 0
        # A well-formed HTTP/2 request, with the token: HTTP/2 is not served.
        assert status_of(await h2_request(s.url, b"/v1/status", TOKEN)) == 505
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
