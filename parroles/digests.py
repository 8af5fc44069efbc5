"""The digests the ledger relies on: SHA-256 of canonical JSON, and what a content digest looks like.

An output's digest is the SHA-256 of its canonical JSON (sorted keys, no
spaces, UTF-8), so the same output has the same digest in every process;
the ledger stores it, handoffs are checked against it. Worker-side code
imports this module too: it imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from parroles.errors import InvalidDigest

_DIGEST = re.compile(r"[0-9a-f]{64}")


def content_digest(data: bytes) -> str:
    """SHA-256 of ``data`` as 64 lowercase hex characters."""
    return hashlib.sha256(data).hexdigest()


def validate_digest(digest: object) -> str:
    """Return ``digest`` if it is 64 lowercase hex characters, else raise InvalidDigest."""
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise InvalidDigest(f"not a content digest (64 lowercase hex characters): {digest!r}")
    return digest


def canonical_json(value: Any) -> str:
    """The one JSON form parroles hashes and stores: sorted keys, no spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
