"""The capture thread's path into the ring (`BlockHandoff`, `QueuedBlocks`,
`AudioRing.wait_for`): every block arrives once, in order, exact; a reader whose
wait is met is always woken, and Trio is woken per reader batch, not per block.

The model test interleaves the producer's puts, the capture task's drains, reader
waits with their own thresholds and cancelled waits in any order hypothesis finds;
the thread test runs a real producer thread against a real Trio consumer."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.capture.handoff import BlockHandoff, QueuedBlocks
from edge_agent.capture.source import SourceStats
from edge_agent.ring import AudioRing

RATE = 1000
SLOTS = 8
BLOCK = 40


def frames_of(start: int, n: int) -> np.ndarray[Any, Any]:
    return (np.arange(start, start + n) % 30000).astype(np.int16).reshape(-1, 1)


ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.integers(1, BLOCK)),
    st.tuples(st.just("drain")),
    st.tuples(st.just("wait"), st.integers(1, 6 * BLOCK)),
    st.tuples(st.just("cancel")),
), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(schedule=ops, max_hold=st.integers(1, 4 * BLOCK))
def test_interleavings_lose_no_block_and_no_wake_up(schedule: list[tuple[Any, ...]],
                                                    max_hold: int) -> None:
    async def main() -> None:
        ring = AudioRing(rate=RATE, channels=1, dtype="int16", seconds=2.0)
        stats = SourceStats()
        handoff = BlockHandoff(slots=SLOTS, block_frames=BLOCK, channels=1, dtype="int16",
                               stats=stats, demand=ring, max_hold_frames=max_hold)
        blocks = QueuedBlocks(handoff, lambda: True)
        sent: list[np.ndarray[Any, Any]] = []  # what was put and not dropped
        put_frames = 0
        waiters: list[tuple[int, trio.CancelScope, list[bool]]] = []

        async def wait(target: int, scope: trio.CancelScope, woke: list[bool]) -> None:
            with scope:
                await ring.wait_for(target)
                woke.append(True)

        async with trio.open_nursery() as nursery:
            for op in schedule:
                if op[0] == "put":
                    data = frames_of(put_frames, op[1])
                    wakes, drops = handoff.wakes, stats.queue_drops
                    handoff.put(data, 1e9 + put_frames / RATE, put_frames / RATE)
                    if stats.queue_drops == drops:
                        sent.append(data)
                        put_frames += op[1]
                    queued = put_frames - ring.head
                    # No lost wake-up: a reader whose wait the queued frames would meet,
                    # or a hold past its limit, or a queue half full, woke Trio.
                    due = ((ring.wake_at is not None and ring.head + queued >= ring.wake_at)
                           or queued >= max_hold or 2 * handoff.queued >= SLOTS)
                    assert (handoff.wakes > wakes) == due
                elif op[0] == "drain":
                    while (block := handoff.take()) is not None:
                        ring.write(block.frames, utc=block.utc, mono=block.mono)
                elif op[0] == "wait":
                    scope, woke = trio.CancelScope(), []
                    waiters.append((ring.head + op[1], scope, woke))
                    nursery.start_soon(wait, ring.head + op[1], scope, woke)
                elif waiters:  # cancel the oldest waiter still waiting
                    for _target, scope, woke in waiters:
                        if not woke and not scope.cancel_called:
                            scope.cancel()
                            break
                await trio.testing.wait_all_tasks_blocked()
                # The ring woke exactly the waits it met, and holds what was sent.
                for target, scope, woke in waiters:
                    if not scope.cancel_called:
                        assert bool(woke) == (ring.head >= target)
                live = [t for t, s, w in waiters if not w and not s.cancel_called]
                assert ring.wake_at == (min(live) if live else None)
            nursery.cancel_scope.cancel()
        for block in blocks.flush():  # a stop writes what is still queued
            ring.write(block.frames, utc=block.utc, mono=block.mono)
        expected = np.concatenate(sent) if sent else np.zeros((0, 1), np.int16)
        assert ring.head == len(expected) == stats.frames
        np.testing.assert_array_equal(ring.read(max(0, ring.head - ring.capacity), ring.head),
                                      expected[max(0, len(expected) - ring.capacity):])

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_a_real_capture_thread_wakes_trio_per_batch_and_delivers_every_block() -> None:
    ring = AudioRing(rate=48000, channels=1, dtype="int16", seconds=10.0)
    stats = SourceStats()
    handoff = BlockHandoff(slots=500, block_frames=960, channels=1, dtype="int16", stats=stats,
                           demand=ring, max_hold_frames=48000)
    blocks = QueuedBlocks(handoff, lambda: not (handoff.finished and not handoff.queued))
    total = 400  # 8 s of 20 ms blocks, produced 4x faster than real time

    def produce() -> None:
        for k in range(total):
            time.sleep(0.005)
            handoff.put(frames_of(k * 960, 960), 1e9 + k * 0.02, k * 0.02)
        handoff.finish()

    reader = ring.open_reader("segmenter")
    batch = 12000  # 0.25 s, as the segmenter asks
    got: list[np.ndarray[Any, Any]] = []

    async def consume() -> None:
        async for block in blocks:
            ring.write(block.frames, utc=block.utc, mono=block.mono)

    async def read() -> None:
        while len(np.concatenate(got) if got else []) < total * 960:
            with trio.move_on_after(1.0):
                await reader.wait(batch)
            got.append(reader.read().frames)

    thread = threading.Thread(target=produce)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            thread.start()
            nursery.start_soon(consume)
            nursery.start_soon(read)
    thread.join()
    np.testing.assert_array_equal(np.concatenate(got), frames_of(0, total * 960))
    assert stats.queue_drops == 0 and stats.blocks == total
    # One wake-up per reader batch (12.5 blocks), not one per block.
    assert handoff.wakes <= total / 10
    print(f"{total} blocks, {handoff.wakes} wake-ups of Trio")


@pytest.mark.parametrize("n", [0, 1])
def test_a_full_queue_drops_and_counts(n: int) -> None:
    async def main() -> None:
        stats = SourceStats()
        handoff = BlockHandoff(slots=2, block_frames=4, channels=1, dtype="int16", stats=stats,
                               demand=None, max_hold_frames=100)
        for k in range(3 + n):
            handoff.put(frames_of(k * 4, 4), 0.0, k * 0.004)
        assert stats.queue_drops == 1 + n and handoff.received == 3 + n
        assert [int(b.frames[0, 0]) for b in QueuedBlocks(handoff, lambda: True).flush()] == [0, 4]

    trio.run(main)
