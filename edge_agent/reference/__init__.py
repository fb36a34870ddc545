"""The reference backend: a real HTTP server that receives what agents send.

It accepts live STT chunks (the `openai`, `deepgram` and `raw` protocols;
`reference.stt`), durable segment uploads (idempotent ``PUT``;
`reference.segments`) and recordings through the object-store protocol
(`reference.objects`); `reference.app` puts them in one server. Tests make it
misbehave through the hook of `reference.hooks` (delays, 503 storms, wrong
statuses, garbage answers) and their own TCP proxy for connection faults. Run it
with ``edge-agent backend``; ``edge-agent demo`` starts one on loopback.

A stage: imports only the bottom layer (`audio`, `blocking`, `clock`, `fs`,
`http`, `store`, `supervisor`, `wire`); never agent, another stage, metrics or
systemd.
"""

from .app import Backend, build_app, run_backend
from .hooks import FaultHook, FaultSource, common_faults
from .objects import store_routes
from .segments import (
    MAX_SEGMENT_BYTES,
    SegmentStoreStats,
    StoredSegment,
    list_stored_segments,
    read_stored_segment,
    segment_routes,
)
from .stt import MAX_STT_CHUNK_BYTES, SttChunkRecord, SttReceiver, stt_routes, word_accuracy

__all__ = [
    "MAX_SEGMENT_BYTES",
    "MAX_STT_CHUNK_BYTES",
    "Backend",
    "FaultHook",
    "FaultSource",
    "SegmentStoreStats",
    "StoredSegment",
    "SttChunkRecord",
    "SttReceiver",
    "build_app",
    "common_faults",
    "list_stored_segments",
    "read_stored_segment",
    "run_backend",
    "segment_routes",
    "store_routes",
    "stt_routes",
    "word_accuracy",
]
