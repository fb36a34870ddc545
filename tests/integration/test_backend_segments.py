"""The reference backend's segment store, over real HTTP on loopback.

Idempotent by id, digest-checked, never overwritten, and able to fail the way a
real network does (refused, reset mid-body, response lost after storing).
"""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from edge_agent.reference import Backend, list_stored_segments
from edge_agent.wire import content_digest, stored_sha256

from support import waiting

DEVICE = "dev-1"
SEG = "20300101T000000.000Z-00c0ffee"


def headers(body: bytes, **extra: str) -> dict[str, str]:
    return {"Content-Digest": content_digest(hashlib.sha256(body).hexdigest()),
            "Content-Type": "audio/ogg; codecs=opus", "If-None-Match": "*", **extra}



# The store answers within moments: a wait past 5 s is a failure.
until = partial(waiting.until, poll=0.01, limit=5)


def seg_url(base: str, seg: str = SEG, device: str = DEVICE) -> str:
    return f"{base}/v1/devices/{device}/segments/{seg}"



def leftovers(backend: Backend) -> list[Path]:
    return [p for p in (backend.data_dir / "segments").rglob(".*")]


async def test_put_stores_and_repeats_are_recognised(served: tuple[Backend, str]) -> None:
    backend, base = served
    body = b"OggS" + bytes(range(256)) * 40
    digest = hashlib.sha256(body).hexdigest()
    async with httpx.AsyncClient() as client:
        first = await client.put(seg_url(base), content=body, headers=headers(body))
        again = await client.put(seg_url(base), content=body, headers=headers(body))
        plain = headers(body)
        del plain["If-None-Match"]
        without_inm = await client.put(seg_url(base), content=body, headers=plain)
        got = await client.get(seg_url(base))
        listing = await client.get(f"{base}/v1/devices/{DEVICE}/segments")
    assert first.status_code == 201
    assert stored_sha256(first.headers) == digest
    assert again.status_code == 412 and stored_sha256(again.headers) == digest
    assert without_inm.status_code == 200 and stored_sha256(without_inm.headers) == digest
    assert got.content == body and got.headers["etag"] == f'"{digest}"'
    assert [(s["id"], s["sha256"], s["bytes"]) for s in listing.json()] == [
        (SEG, digest, len(body))]
    assert backend.segment_stats.created[(DEVICE, SEG)] == 1
    assert [s.path.name for s in list_stored_segments(backend.data_dir, DEVICE)] == [
        f"{SEG}.opus"]
    assert leftovers(backend) == []


async def test_a_different_body_under_a_stored_id_is_refused(
    served: tuple[Backend, str],
) -> None:
    backend, base = served
    original, other = b"first body" * 100, b"second body" * 100
    async with httpx.AsyncClient() as client:
        assert (await client.put(seg_url(base), content=original,
                                 headers=headers(original))).status_code == 201
        conflict = await client.put(seg_url(base), content=other, headers=headers(other))
        plain = headers(other)
        del plain["If-None-Match"]
        conflict_no_inm = await client.put(seg_url(base), content=other, headers=plain)
        got = await client.get(seg_url(base))
    assert conflict.status_code == 409
    assert conflict_no_inm.status_code == 409
    assert stored_sha256(conflict.headers) == hashlib.sha256(original).hexdigest()
    assert got.content == original
    assert backend.segment_stats.conflicts == 2


async def test_digest_is_checked(served: tuple[Backend, str]) -> None:
    backend, base = served
    body = b"x" * 5000
    async with httpx.AsyncClient() as client:
        wrong = await client.put(seg_url(base), content=body,
                                 headers=headers(b"something else"))
        missing = await client.put(seg_url(base), content=body,
                                   headers={"Content-Type": "audio/ogg"})
        malformed = await client.put(seg_url(base), content=body,
                                     headers={"Content-Digest": "sha-256=abc"})
        got = await client.get(seg_url(base))
    assert wrong.status_code == 400 and "mismatch" in wrong.text
    assert missing.status_code == 400 and "Content-Digest" in missing.text
    assert malformed.status_code == 400
    assert got.status_code == 404
    assert backend.segment_stats.digest_mismatches == 1
    assert list_stored_segments(backend.data_dir, DEVICE) == []
    assert leftovers(backend) == []


@pytest.mark.parametrize(("device", "seg"), [("-bad", SEG), (DEVICE, ".hidden"),
                                              (DEVICE, "a%20b"), (DEVICE, "20300101T000000Z")])
async def test_bad_names_are_refused(served: tuple[Backend, str], device: str,
                                     seg: str) -> None:
    _, base = served
    async with httpx.AsyncClient() as client:
        r = await client.put(seg_url(base, seg, device), content=b"x", headers=headers(b"x"))
    assert r.status_code == 400
    assert "expected" in r.text


async def test_same_segment_three_times_concurrently_and_in_a_row_is_one_object(
    served: tuple[Backend, str],
) -> None:
    backend, base = served
    body = b"OggS" + b"\x01" * 200_000
    statuses: list[int] = []
    async with httpx.AsyncClient() as client:

        async def put(seg: str) -> None:
            r = await client.put(seg_url(base, seg), content=body, headers=headers(body))
            statuses.append(r.status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(put, "20300101T000000.000Z-00000001")
        concurrent = sorted(statuses)
        statuses.clear()
        for _ in range(3):
            await put("20300101T000100.000Z-00000002")
    assert concurrent == [201, 412, 412]
    assert statuses == [201, 412, 412]
    assert backend.segment_stats.created == {(DEVICE, "20300101T000000.000Z-00000001"): 1,
                                              (DEVICE, "20300101T000100.000Z-00000002"): 1}
    assert len(list_stored_segments(backend.data_dir, DEVICE)) == 2
    assert leftovers(backend) == []


async def test_reset_mid_body_stores_nothing(served: tuple[Backend, str]) -> None:
    backend, base = served
    body = b"OggS" + b"\x02" * 100_000
    backend.faults.reset_mid_body = 1
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.TransportError):
            await client.put(seg_url(base), content=body, headers=headers(body))
        await until(lambda: backend.segment_stats.incomplete == 1)  # the app saw it
        assert (await client.get(seg_url(base))).status_code == 404
        r = await client.put(seg_url(base), content=body, headers=headers(body))
    assert r.status_code == 201
    assert backend.segment_stats.created[(DEVICE, SEG)] == 1
    assert leftovers(backend) == []


async def test_lost_response_after_storing(served: tuple[Backend, str]) -> None:
    backend, base = served
    body = b"OggS" + b"\x03" * 30_000
    backend.faults.drop_response = 1
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.TransportError):
            await client.put(seg_url(base), content=body, headers=headers(body))
        retry = await client.put(seg_url(base), content=body, headers=headers(body))
    assert retry.status_code == 412
    assert stored_sha256(retry.headers) == hashlib.sha256(body).hexdigest()
    assert backend.segment_stats.created[(DEVICE, SEG)] == 1


async def test_down_refuses_connections_then_comes_back_on_the_same_port(
    served: tuple[Backend, str],
) -> None:
    backend, base = served
    backend.faults.down = True
    await until(lambda: not backend.faults.listening)
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{base}/healthz")
        backend.faults.down = False
        await until(lambda: backend.faults.listening)
        assert (await client.get(f"{base}/healthz")).status_code == 200


async def test_injected_statuses(served: tuple[Backend, str]) -> None:
    backend, base = served
    body = b"y" * 1000
    backend.faults.unavailable = 2
    backend.faults.retry_after = 7
    backend.faults.wrong_status = 1
    backend.faults.wrong_status_code = 418
    async with httpx.AsyncClient() as client:
        got = [await client.put(seg_url(base), content=body, headers=headers(body))
               for _ in range(4)]
    assert [r.status_code for r in got] == [503, 503, 418, 201]
    assert got[0].headers["retry-after"] == "7"
