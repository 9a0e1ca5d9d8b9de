"""The hash chain over the event log.

Each row's hash is sha256 over the previous row's hash and this row's
canonical bytes, so editing, dropping or reordering any row changes every
hash after it. The writer and ``verify`` share this one function.
"""

from __future__ import annotations

import hashlib

__all__ = ["GENESIS_HASH", "row_hash"]

GENESIS_HASH = "0" * 64
_SEP = "\x1f"


def row_hash(prev: str, seq: int, ts_us: int, type_: str, stream: str, key: str, v: int, payload: bytes) -> str:
    """sha256(prev | seq | ts | type | stream | key | v | payload), hex."""
    head = f"{prev}{_SEP}{seq}{_SEP}{ts_us}{_SEP}{type_}{_SEP}{stream}{_SEP}{key}{_SEP}{v}{_SEP}".encode()
    return hashlib.sha256(head + payload).hexdigest()
