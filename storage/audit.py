"""The audit timeline: events filtered in the Delta scan, printed as a table, JSON lines or CSV.

Filters (conid, type, time range) are pushed into the scan
(:func:`storage.reader.read_batches`): files are pruned by their Delta
statistics and the rest of the predicate goes into the Parquet scan, so a
contract's story out of a million events reads only what matches. Every
event about a contract (registry, router, queue items) is keyed by its conid,
so ``--conid`` alone tells the whole story.

Every payload is decoded through the codec, so a row stored under an older
schema version prints in today's shape (the stored version stays visible in
``v``). ``jsonl`` prints one event a line: ``seq``, ``ts``, ``type``,
``stream``, ``key``, ``v`` and the payload's fields; ``csv`` has the same
envelope with the payload as one JSON column; ``table`` is for people.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec

from events.codec import EVENT_TYPES
from storage.reader import StoredEvent, read_events, table_exists, to_utc
from storage.tables import table_uri

__all__ = ["AUDIT_FORMATS", "NoEventLog", "audit_events", "audit_record", "write_audit"]

AUDIT_FORMATS = ("table", "jsonl", "csv")
#: The stored row's own columns; a payload field of the same name is printed as ``payload.<name>``.
_ENVELOPE = ("seq", "ts", "type", "stream", "key", "v")
_encoder = msgspec.json.Encoder()


class NoEventLog(FileNotFoundError):
    """The data directory holds no events table (a typo in ``--data-dir`` must not look like an empty log)."""


def audit_events(
    data_dir: str,
    *,
    conid: Iterable[int] | None = None,
    types: Iterable[str] | None = None,
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    storage_options: dict[str, str] | None = None,
) -> Iterator[StoredEvent]:
    """Events matching every filter, in seq order; bad filters raise ValueError before anything is read."""
    keys = [str(c) for c in conid] if conid else None
    type_list = list(types) if types else None
    unknown = sorted(set(type_list or ()) - set(EVENT_TYPES))
    if unknown:
        # a typo would otherwise print an empty timeline, which reads as "nothing happened"
        raise ValueError(f"unknown event type {', '.join(unknown)} (known: {', '.join(sorted(EVENT_TYPES))})")
    since_dt = to_utc(since) if since is not None else None
    until_dt = to_utc(until) if until is not None else None
    if since_dt is not None and until_dt is not None and since_dt > until_dt:
        raise ValueError(f"--since {since_dt.isoformat()} is after --until {until_dt.isoformat()}")
    uri = table_uri(data_dir, "events")
    if not table_exists(uri, storage_options):
        raise NoEventLog(f"no event log at {uri}")
    return read_events(uri, keys=keys, types=type_list, since=since_dt, until=until_dt, storage_options=storage_options)


def _iso(ts_us: int) -> str:
    return datetime.fromtimestamp(ts_us / 1_000_000, tz=UTC).isoformat(timespec="microseconds")


def _payload(stored: StoredEvent) -> dict[str, Any]:
    payload = msgspec.to_builtins(stored.event)
    payload.pop("type", None)
    return payload


def audit_record(stored: StoredEvent) -> dict[str, Any]:
    """One event as a flat dict: the envelope first, then the payload's fields (today's schema)."""
    record: dict[str, Any] = {
        "seq": stored.seq,
        "ts": _iso(stored.ts_us),
        "type": stored.type,
        "stream": stored.stream,
        "key": stored.key,
        "v": stored.v,
    }
    for name, value in _payload(stored).items():
        record[f"payload.{name}" if name in record else name] = value
    return record


def write_audit(events: Iterable[StoredEvent], fmt: str, out: TextIO) -> int:
    """Print ``events`` in format ``fmt``; returns how many were printed."""
    if fmt not in AUDIT_FORMATS:
        raise ValueError(f"unknown format {fmt!r} (use one of {', '.join(AUDIT_FORMATS)})")
    count = 0
    if fmt == "jsonl":
        for stored in events:
            out.write(_encoder.encode(audit_record(stored)).decode() + "\n")
            count += 1
    elif fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([*_ENVELOPE, "payload"])
        for stored in events:
            payload = _encoder.encode(_payload(stored)).decode()
            writer.writerow([stored.seq, _iso(stored.ts_us), stored.type, stored.stream, stored.key, stored.v, payload])
            count += 1
    else:
        out.write(f"{'seq':>8}  {'ts (UTC)':26}  {'type':30}  {'key':>10}  details\n")
        for stored in events:
            details = " ".join(f"{k}={v}" for k, v in _payload(stored).items() if v not in (None, "", [], {}))
            out.write(f"{stored.seq:>8}  {_iso(stored.ts_us)[:26]:26}  {stored.type:30}  {stored.key:>10}  {details}\n")
            count += 1
    return count
