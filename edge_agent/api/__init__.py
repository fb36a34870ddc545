"""The device HTTP API: the one door into the device, for the backend and for installers.

An ASGI app (Starlette routes inside a small ASGI wrapper) served by Hypercorn's
Trio worker as a supervised stage of the agent. It reads the ring, the spool,
the transcript log and health in process, through what the agent passes in
(`DeviceApi`'s arguments, `seams`): no second process, no copy of the ring.
README.md ("HTTP API") lists every route, parameter, status and header.

A stage: imports only the bottom layer; never agent, another stage, metrics or
systemd. Its modules: `auth` (token, bearer check), `params` (query parameters,
`ApiError`), `plan` (`plan_audio`), `cut` (one cut of a range, shared with the
fleet's answers and ``fleet get``), `decode` (spooled segments, `open_under`),
`render` (encoding, streamed responses), `conditional` (If-None-Match/Range),
`counters` (`ApiStats`), `seams` (Protocols of what it reads), `media`
(/v1/audio, /v1/live) and `app` (`DeviceApi`).

Decisions worth knowing:

* **Auth.** Every route but ``/healthz`` wants ``Authorization: Bearer <token>``,
  compared with `hmac.compare_digest`. The media routes (``/v1/audio``,
  ``/v1/live``) also take ``?access_token=`` because an ``<audio>`` element cannot
  send headers. The token comes from ``api.token_file``; without one (allowed on
  loopback only) a random token is kept in ``<data_dir>/api-token`` (mode 0600).
  Unauthenticated requests to unknown paths get 401 too, so routes are not probed.
* **Bad input** is a 4xx with a JSON body ``{"error": ..., "parameter": ...}``
  naming what is wrong and what was expected. Unknown query parameters are
  errors (a typo must not silently change a request). No request may carry a body.
* **Segment ids** are matched against `SEGMENT_ID_PATTERN` (whole string) before
  the spool is asked; the file is then opened component by component below the
  spool root with ``O_NOFOLLOW`` (`open_under`), so neither ``..`` nor a symlink
  anywhere below the root can lead outside it.
* **/v1/audio** plans the whole response from metadata before the first byte
  (`plan_audio`): ring where held, spooled segments where older, gaps between
  them. So the gaps go into a header, and WAV/PCM bodies have an exact
  ``Content-Length``. The body is then produced block by block in worker threads
  (at most one decoded segment in memory) under a concurrency cap. If audio
  planned from the ring is evicted before it is sent (a very long request on a
  slow device), or a segment cannot be decoded, the response is cut off: the
  client sees an incomplete body, never silently wrong audio.
* **Gaps header.** ``X-Audio-Gaps: <utc>/<seconds>@<offset>, ...``: each hole
  starts at ``<utc>`` (ISO 8601), lasts ``<seconds>``, and sits ``<offset>``
  seconds into the returned audio (where silence starts with ``fill=silence``).
  Holes shorter than the ring's gap tolerance (jitter) are not holes.
* **Stalled clients** never hold a scarce slot: the body is produced in its own
  task and a client that takes nothing for ``request_timeout_seconds`` is dropped,
  releasing the slot even while the server's write to the socket is still stuck;
  the kernel then closes that connection (`edge_agent.http`, TCP_USER_TIMEOUT).
"""

from .app import DeviceApi
from .auth import TOKEN_FILE_NAME, check_bearer, load_token
from .conditional import RangeDecision, decide_range
from .counters import ApiCollector, ApiStats
from .decode import SegmentUnreadable, decode_segment, open_under
from .media import AUDIO_FORMATS, GAPS_HEADER
from .params import ApiError, parse_utc
from .plan import AudioGap, AudioPlan, RingPiece, SegmentPiece, Silence, plan_audio
from .seams import ComponentState, HealthFn, SpoolView, StatusFn, TranscriptReader

__all__ = [
    "AUDIO_FORMATS",
    "GAPS_HEADER",
    "TOKEN_FILE_NAME",
    "ApiCollector",
    "ApiError",
    "ApiStats",
    "AudioGap",
    "AudioPlan",
    "ComponentState",
    "DeviceApi",
    "HealthFn",
    "RangeDecision",
    "RingPiece",
    "SegmentPiece",
    "SegmentUnreadable",
    "Silence",
    "SpoolView",
    "StatusFn",
    "TranscriptReader",
    "check_bearer",
    "decide_range",
    "decode_segment",
    "load_token",
    "open_under",
    "parse_utc",
    "plan_audio",
]
