"""The durable spool: wall-clock aligned segments on local disk until the backend has them.

This is the part of the agent that must never lose audio, so every step is ordered
for crashes and power cuts:

* The **segmenter** (a supervised Trio task) reads the ring from its own cursor and
  encodes segments of ``segments.seconds`` aligned to multiples of that length on the
  wall clock (the first one is partial). Pages are appended to ``tmp/<id>/audio.*``
  as the encoder produces them and fsynced every ``segments.fsync_seconds``.
* **Sealing** publishes audio and metadata together with one rename::

      tmp/<id>/{open.json, audio.*}       while recording (open.json: what recovery needs)
      tmp/<id>/{meta.json, audio.*}       audio fsynced, meta written and fsynced
      sealed/<id>/                        rename, then fsync of both parent directories

  A segment is listed (and uploaded) only once it sits in ``sealed/``. State changes
  are renames too: ``sealed/<id>`` -> ``synced/<id>`` (the uploader's acknowledgement)
  or -> ``quarantine/<id>`` with a ``reason.txt`` (never uploaded). Deletion renames
  into ``trash/`` first, so a crash never leaves half a segment in a listed state.
* **Recovery** (once at start) seals whatever a crash left in ``tmp/``: complete seals
  are finished; otherwise the audio is salvaged: every complete, CRC-valid Ogg page
  (Opus: pages after damage are spliced on and the hole becomes a gap; Ogg FLAC: up
  to the first damage) or up to the last whole durable frame (WAV), and sealed with
  ``recovered=True``; nothing salvageable is removed; anything unreadable goes to
  quarantine with a reason.
* **Quota**: ``max_spool_mb`` and ``min_free_mb`` bound the spool. Synced segments go
  first (expired ones after ``retain_synced_hours`` regardless), then quarantined ones,
  and unsynced audio only when it alone exceeds the quota, oldest first, each such
  eviction logged and counted as loss.

Decisions worth knowing:

* A capture gap inside a segment does not cut it: the audio continues after the gap
  and the gap is listed in ``meta.gaps`` (so ``end_ts - start_ts`` may exceed
  ``frames / rate``). A wall-clock *step* does cut it, so each segment has one
  consistent time mapping and its id matches its start time; the step is noted in the
  ``clock_steps`` of the segment it starts.
* FLAC is written as Ogg FLAC (``audio/ogg; codecs=flac``, ``.oga``) with libFLAC's
  own encoder (bound by pyogg, no extra dependency): in an Ogg container a file cut by
  a crash is salvaged exactly like Opus, page by page with CRCs. WAV has no checksums,
  so after each fsync its header is patched with the length that fsync made durable,
  and recovery keeps only that much: a torn tail is never sealed as audio.
* What a crash costs: Opus, the page the encoder was filling (<= 1 s), plus after a
  power cut what came since the last fsync; Ogg FLAC, one ~4 KB page (seconds of
  near-silence compress into one page) plus the 4096-sample frame being filled; WAV,
  up to one fsync interval, two after a power cut. Gaps inside a segment salvaged by
  recovery are not known (its end time is computed from the frames it holds).
* Out of space (ENOSPC, EDQUOT) while a segment is open: the segment is set aside as
  it is, the quota is enforced (synced audio goes first), and once there is room it is
  salvaged like a crashed one and recording goes on from its first missing frame, which
  the ring still holds. Any other error (EIO, EROFS, a failed fsync, which is never
  retried on the same descriptor) abandons the file and writes the segment again from
  the ring after a backoff. Either way, audio the ring no longer holds by then is
  counted as lost, and the spool reports itself degraded meanwhile. At shutdown a
  segment that cannot be sealed is left in ``tmp/`` for the next start's recovery.
* ``bytes_used`` counts the audio bytes of sealed, synced and quarantined segments;
  metadata files (~1 KB each) and the one open segment are not counted.

Everything that touches the disk goes through ``edge_agent.fs.FileOps``, so tests can
make any single call fail or "kill the process" at that point. The synchronous core
(:class:`Spool`, :class:`SegmentWriter`, :class:`SegmentCutter`) needs no Trio;
:class:`Segmenter` moves data from the ring to it through a ``ThreadRunner``.

The package, bottom to top (each module imports only the bottom layer and the
modules listed before it; never agent or another stage):

* ``model``: file and directory names, `SegmentHeader`, `SpoolStats`,
  `RecoveryReport`, `SpoolError`;
* ``salvage``: how much of a cut file is intact (pure functions on bytes);
* ``quota``: which segments to evict (pure decisions on sizes, ages and states);
* ``cutter``: where a segment ends and what to write next (pure decisions);
* ``files``: paths of the layout and the durable steps on them;
* ``index``: the in-memory index, its lock and the current sizes;
* ``writer``: `SegmentWriter`, the open segment (encoders from
  ``audio.encoders.make_encoder``);
* ``recovery``: `Recovery`, run at start and for a segment set aside;
* ``core``: `Spool`, composing the above;
* ``segmenter``: `Segmenter`, the Trio task.

Imports only the bottom layer; never agent or another stage.
"""

from .core import Spool
from .cutter import NextWrite, SegmentCutter
from .model import RecoveryReport, SegmentHeader, SpoolError, SpoolStats
from .segmenter import Segmenter, SegmenterStats
from .writer import SegmentWriter

__all__ = [
    "NextWrite",
    "RecoveryReport",
    "SegmentCutter",
    "SegmentHeader",
    "SegmentWriter",
    "Segmenter",
    "SegmenterStats",
    "Spool",
    "SpoolError",
    "SpoolStats",
]
