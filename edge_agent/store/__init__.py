"""Where finished recordings go: the `Store` protocol, `LocalStore` and `HttpStore`.

`AudioRecorder.stop()` uploads each recording to a store under a key its
`key_builder` made from the caller's prefixes and a unique id. The stores are the
agent's own machinery, not a second copy of it:

* `LocalStore` writes through the spool's `FileOps` the way the spool seals a
  segment: a private temp file, fsync, rename, fsync of the directory. A crash
  leaves either the old object or the new one, never half of one. Keys are checked
  part by part, so no key can name a path outside the root.
* `HttpStore` speaks the uploader's idempotent protocol: `PUT` with the SHA-256 in
  `Content-Digest` and `If-None-Match: *`, judged by `uploader.judge_response`. A
  lost acknowledgement costs one more request, never a second object; a different
  body under an existing key is refused, never written over.
* The server side of that protocol is `reference.objects.store_routes`: the
  reference backend serves a `LocalStore` under `/v1/objects`, so `HttpStore` is
  tested against a real server.

Keys are ``/``-separated parts of letters, digits and ``._@=+,-`` (a part never
starts with ``.``), at most 1024 characters: safe as file paths and URL paths.

Just above ``config``: imports only the bottom layer, never a stage or the agent.
"""

from .base import (
    Body,
    KeyBuilder,
    Store,
    StoredObject,
    StoreError,
    StoreStats,
    check_key,
)
from .local import LocalStore
from .remote import HttpStore

__all__ = [
    "Body",
    "HttpStore",
    "KeyBuilder",
    "LocalStore",
    "Store",
    "StoreError",
    "StoreStats",
    "StoredObject",
    "check_key",
]
