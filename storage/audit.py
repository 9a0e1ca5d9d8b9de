"""The audit timeline: events filtered in the Delta scan, printed as a table, JSON lines or CSV.

Filters (conid, type, time range) are pushed into the scan, so a contract's
story out of a million events reads only what matches. ``jsonl`` prints one
event a line with ``seq``, ``ts``, ``type``, ``stream``, ``key`` and the
payload's fields; ``csv`` has the same columns with the payload as JSON;
``table`` is for people.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec

from storage.reader import StoredEvent, read_events, table_exists
from storage.tables import table_uri

__all__ = ["AUDIT_FORMATS", "audit_events", "write_audit"]

AUDIT_FORMATS = ("table", "jsonl", "csv")


def audit_events(
    data_dir: str,
    *,
    conid: list[int] | None = None,
    types: list[str] | None = None,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    storage_options: dict[str, str] | None = None,
) -> Iterator[StoredEvent]:
    uri = table_uri(data_dir, "events")
    if not table_exists(uri, storage_options):
        return iter(())
    return read_events(
        uri,
        keys=[str(c) for c in conid] if conid else None,
        types=types or None,
        since=since,
        until=until,
        storage_options=storage_options,
    )


def _iso(ts_us: int) -> str:
    return datetime.fromtimestamp(ts_us / 1_000_000, tz=UTC).isoformat(timespec="microseconds")


def _record(stored: StoredEvent) -> dict[str, Any]:
    payload = msgspec.to_builtins(stored.event)
    payload.pop("type", None)
    return {"seq": stored.seq, "ts": _iso(stored.ts_us), "type": stored.type, "stream": stored.stream, "key": stored.key, **payload}


def write_audit(events: Iterator[StoredEvent], fmt: str, out: TextIO) -> int:
    """Print ``events`` in format ``fmt``; returns how many were printed."""
    count = 0
    if fmt == "jsonl":
        for stored in events:
            out.write(json.dumps(_record(stored), default=str) + "\n")
            count += 1
    elif fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(["seq", "ts", "type", "stream", "key", "payload"])
        for stored in events:
            payload = msgspec.to_builtins(stored.event)
            payload.pop("type", None)
            writer.writerow([stored.seq, _iso(stored.ts_us), stored.type, stored.stream, stored.key, json.dumps(payload)])
            count += 1
    elif fmt == "table":
        out.write(f"{'seq':>8}  {'ts (UTC)':26}  {'type':30}  {'key':>10}  details\n")
        for stored in events:
            payload = msgspec.to_builtins(stored.event)
            payload.pop("type", None)
            details = " ".join(f"{k}={v}" for k, v in payload.items() if v not in (None, "", [], {}))
            out.write(f"{stored.seq:>8}  {_iso(stored.ts_us)[:26]:26}  {stored.type:30}  {stored.key:>10}  {details}\n")
            count += 1
    else:
        raise ValueError(f"unknown format {fmt!r} (use one of {', '.join(AUDIT_FORMATS)})")
    return count
