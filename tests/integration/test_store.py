"""The stores recordings are uploaded to: LocalStore on real files, HttpStore against
the reference backend on loopback (real Hypercorn, real connection faults)."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from edge_agent import AudioConfig, AudioRecorder, SampleFormat, SystemClock, ToneSource
from edge_agent.audio.pcm import read_wav
from edge_agent.fs import FileOps
from edge_agent.reference import Backend
from edge_agent.store import HttpStore, KeyBuilder, LocalStore, Store, StoreError, check_key

from support.faults import Faults, run_backend

KEY = "session-123/segment/20261124T053000.000Z-3f9a1c2b"


# ----------------------------------------------------------------------------
# Keys


def test_key_builder_joins_prefixes_and_id() -> None:
    assert KeyBuilder().build("session-123", "segment", "abc") == "session-123/segment/abc"
    assert KeyBuilder().build("a/b", "c") == "a/b/c"


@pytest.mark.parametrize("key", [
    "../outside", "a/../../x", "/etc/passwd", "a//b", "a/./b", ".hidden", "a/.meta/x",
    "a\\b", "a/b/", "", "sp ace", "nul\0byte", "x" * 2000,
])
def test_keys_that_could_escape_or_hide_are_refused(key: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="store key"):
        check_key(key)
    with pytest.raises(ValueError):
        KeyBuilder().build(*key.split("/"))


async def test_a_symlink_cannot_lead_a_key_out_of_the_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside)
    store = LocalStore(root)
    with pytest.raises(ValueError, match="outside the store root"):
        await store.upload(b"x", "link/file")
    assert list(outside.iterdir()) == []


# ----------------------------------------------------------------------------
# LocalStore


async def test_local_store_round_trip(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "objects")
    assert isinstance(store, Store)
    body = os.urandom(3 * 1024 * 1024 + 17)  # several copy chunks
    assert await store.upload(body, KEY, {"content_type": "audio/wav", "rate": 16000}) == KEY
    await store.upload(io.BytesIO(b"second"), "session-123/other")
    await store.upload(b"third", "session-9/x")
    assert await store.download(KEY) == body
    assert await store.exists(KEY)
    assert not await store.exists("session-123/nothing")
    obj = await store.stat(KEY)
    assert (obj.bytes, obj.sha256) == (len(body), hashlib.sha256(body).hexdigest())
    assert obj.metadata == {"content_type": "audio/wav", "rate": 16000}
    assert await store.list() == sorted([KEY, "session-123/other", "session-9/x"])
    assert await store.list("session-123/") == sorted([KEY, "session-123/other"])
    assert await store.list("session-1") == sorted([KEY, "session-123/other"])
    assert await store.list("session-123/seg") == [KEY]
    await store.delete(KEY)
    await store.delete(KEY)  # deleting what is gone is not an error
    assert not await store.exists(KEY)
    with pytest.raises(KeyError):
        await store.download(KEY)
    assert await store.list("session-123/") == ["session-123/other"]


async def test_local_store_refuses_metadata_json_cannot_hold(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(ValueError, match="JSON"):
        await store.upload(b"x", "k", {"when": object()})
    assert await store.list() == []


class FailAt(FileOps):
    """Fails (or 'kills the process' at) the n-th call of one operation."""

    def __init__(self, op: str, exc: BaseException) -> None:
        self.op, self.exc = op, exc

    def before(self, op: str, path: str) -> None:
        if op == self.op and ".meta" not in path:
            raise self.exc


class Killed(BaseException):
    """The process died here: no except clause below it may tidy up."""


@pytest.mark.parametrize("op", ["write", "fsync", "rename"])
async def test_a_failed_write_leaves_the_old_object_whole(tmp_path: Path, op: str) -> None:
    await LocalStore(tmp_path).upload(b"old version", "a/b", {"v": 1})
    store = LocalStore(tmp_path, fs=FailAt(op, OSError(5, "injected EIO")))
    with pytest.raises(OSError, match="injected"):
        await store.upload(b"new version", "a/b", {"v": 2})
    fresh = LocalStore(tmp_path)
    assert await fresh.download("a/b") == b"old version"
    assert await fresh.metadata("a/b") == {"v": 1}
    assert await fresh.list() == ["a/b"]
    # The failed attempt leaves no temp file behind.
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b"]


async def test_a_crash_mid_upload_never_shows_a_partial_object(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, fs=FailAt("rename", Killed()))
    with pytest.raises(Killed):
        await store.upload(b"x" * 100_000, "a/b")
    fresh = LocalStore(tmp_path)
    assert not await fresh.exists("a/b")
    assert await fresh.list() == []  # the orphaned temp file is hidden, not an object


# ----------------------------------------------------------------------------
# HttpStore against the reference backend


async def with_backend(tmp_path: Path, fn: Any, **store_kw: Any) -> Backend:
    backend = Backend(tmp_path / "backend", faults=Faults())
    async with trio.open_nursery() as nursery:
        url = await nursery.start(run_backend, backend, "127.0.0.1:0")
        store = HttpStore(f"{url}/v1/objects", backoff_initial=0.01, backoff_max=0.05,
                          timeout=10.0, **store_kw)
        await fn(backend, store)
        nursery.cancel_scope.cancel()
    return backend


async def test_http_store_round_trip(tmp_path: Path) -> None:
    body = os.urandom(200_000)

    async def scenario(backend: Backend, store: HttpStore) -> None:
        assert isinstance(store, Store)
        meta = {"content_type": "audio/wav", "duration_ms": 1234, "note": "caf\u00e9"}
        assert await store.upload(body, KEY, meta) == KEY
        await store.upload(io.BytesIO(b"from a file"), "session-123/other")
        assert await store.download(KEY) == body
        assert await store.exists(KEY)
        assert not await store.exists("session-123/missing")
        assert await store.metadata(KEY) == meta
        assert await store.list("session-123/") == sorted([KEY, "session-123/other"])
        await store.delete("session-123/other")
        assert await store.list() == [KEY]
        with pytest.raises(KeyError):
            await store.download("session-123/other")
        # What the backend holds is the same object, with its digest.
        held = LocalStore(backend.data_dir / "objects")
        obj = await held.stat(KEY)
        assert obj.sha256 == hashlib.sha256(body).hexdigest()
        assert obj.metadata == meta

    await with_backend(tmp_path, scenario)


async def test_http_store_upload_survives_a_lost_acknowledgement(tmp_path: Path) -> None:
    """The backend stores the object but the response is lost: the retry is answered
    412 with the same digest, which is success, and there is one object."""

    async def scenario(backend: Backend, store: HttpStore) -> None:
        backend.faults.drop_response = 1
        await store.upload(b"recording bytes", KEY, {"content_type": "audio/wav"})
        assert backend.faults.drop_response == 0
        assert store.stats.retries == 1
        assert store.stats.already_present == 1
        assert await store.download(KEY) == b"recording bytes"

    await with_backend(tmp_path, scenario)


async def test_http_store_retries_a_reset_mid_body(tmp_path: Path) -> None:
    body = os.urandom(100_000)

    async def scenario(backend: Backend, store: HttpStore) -> None:
        backend.faults.reset_mid_body = 1
        await store.upload(io.BytesIO(body), KEY)
        assert store.stats.retries == 1
        assert await store.download(KEY) == body

    await with_backend(tmp_path, scenario)


async def test_http_store_never_overwrites_another_body(tmp_path: Path) -> None:
    async def scenario(backend: Backend, store: HttpStore) -> None:
        await store.upload(b"first", KEY)
        with pytest.raises(StoreError, match="different body"):
            await store.upload(b"second", KEY)
        assert await store.download(KEY) == b"first"

    await with_backend(tmp_path, scenario)


async def test_http_store_gives_up_after_its_retries(tmp_path: Path) -> None:
    async def scenario(backend: Backend, store: HttpStore) -> None:
        backend.faults.down = True
        await trio.sleep(0.1)  # the front closes its listener
        with pytest.raises(StoreError, match="failed after 3 attempt"):
            await store.upload(b"x", KEY)
        backend.faults.down = False

    await with_backend(tmp_path, scenario, retries=2)


async def test_a_recorder_uploads_to_the_backend_through_http_store(tmp_path: Path) -> None:
    async def scenario(backend: Backend, store: HttpStore) -> None:
        source = ToneSource(16000, 1, SampleFormat.INT16, SystemClock())
        async with AudioRecorder(store, AudioConfig(rate=16000), source=source) as rec:
            key = await rec.start("device-7", "call")
            await trio.sleep(0.3)
            seg = await rec.stop()
        assert seg.key == key
        data = await store.download(key)
        audio, rate = read_wav(io.BytesIO(data))
        assert rate == 16000
        assert audio.tobytes() == seg.frames
        meta = await store.metadata(key)
        assert (meta["frames"], meta["content_type"]) == (len(audio), "audio/wav")

    await with_backend(tmp_path, scenario)
