"""Reading the event log: filters pushed into the Delta/Arrow scan, rows in seq order.

A million events never become one Python list: files are pruned by their
Delta statistics on ``seq`` and ``ts``, the remaining filters go into the
Parquet scan (row-group statistics), and results stream out as Arrow record
batches in seq order. Each commit writes a contiguous seq range and
compaction keeps file order, so files normally cover disjoint ranges and are
read one at a time; if ranges ever overlap, the overlapping files are read
together and sorted, so order holds regardless.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from deltalake import DeltaTable
from deltalake.exceptions import DeltaError

from events.base import Event
from events.codec import decode_events

_STATS_SLACK = timedelta(milliseconds=1)

__all__ = [
    "StoredEvent",
    "max_seq",
    "open_table",
    "read_batches",
    "read_events",
    "read_seq_events",
    "table_exists",
    "to_utc",
]


class StoredEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One row of the log: the stored record around a domain event."""

    seq: int
    ts_us: int
    type: str
    stream: str
    key: str
    v: int
    hash: str
    event: Event


def table_exists(uri: str, storage_options: dict[str, str] | None = None) -> bool:
    return DeltaTable.is_deltatable(uri, storage_options=storage_options)


_OPEN_ATTEMPTS = 3


def open_table(uri: str, storage_options: dict[str, str] | None = None, version: int | None = None) -> DeltaTable:
    """The table, read while a runtime may be writing and maintaining it.

    A running runtime deletes commit files and checkpoints once they are
    past ``log.log_retention_minutes`` and below its newest checkpoint. A
    reader that listed ``_delta_log`` just before such a cleanup finds a file
    gone (:func:`log_file_vanished`); listing again finds the newer
    checkpoint, so that is retried before it counts as an error.
    """
    attempt = 1
    while True:
        try:
            return DeltaTable(uri, version=version, storage_options=storage_options)
        except (FileNotFoundError, DeltaError) as exc:
            if attempt >= _OPEN_ATTEMPTS or not log_file_vanished(exc):
                raise
        time.sleep(0.05 * attempt)
        attempt += 1


def log_file_vanished(exc: BaseException) -> bool:
    """Whether ``exc`` says a file of ``_delta_log`` was gone when delta-rs went to read it.

    delta-rs reports it as ``FileNotFoundError`` on some paths and, through
    delta-kernel, as ``DeltaError("Kernel error: Arrow error: External: Object
    at location .../_delta_log/...checkpoint.parquet not found ...")`` on
    others (seen with a reader racing a writer that checkpoints and cleans).
    """
    if isinstance(exc, FileNotFoundError):
        return True
    text = str(exc)
    return isinstance(exc, DeltaError) and "_delta_log/" in text and "not found" in text


def to_utc(value: datetime | str) -> datetime:
    """An aware UTC datetime from a datetime or ISO-8601 text (naive means UTC)."""
    dt = datetime.fromisoformat(value.replace("Z", "+00:00")) if isinstance(value, str) else value
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _filter(
    from_seq: int | None,
    to_seq: int | None,
    since: datetime | None,
    until: datetime | None,
    streams: Iterable[str] | None,
    keys: Iterable[str] | None,
    types: Iterable[str] | None,
) -> pc.Expression | None:
    parts: list[pc.Expression] = []
    ts_type = pa.timestamp("us", tz="UTC")
    if from_seq is not None:
        parts.append(pc.field("seq") >= from_seq)
    if to_seq is not None:
        parts.append(pc.field("seq") <= to_seq)
    if since is not None:
        parts.append(pc.field("ts") >= pa.scalar(since, ts_type))
    if until is not None:
        parts.append(pc.field("ts") <= pa.scalar(until, ts_type))
    for column, values in (("stream", streams), ("key", keys), ("type", types)):
        if values is not None:
            values = list(values)
            parts.append(pc.field(column).isin(pa.array(values, pa.string())))
    if not parts:
        return None
    expr = parts[0]
    for part in parts[1:]:
        expr = expr & part
    return expr


def read_batches(
    source: DeltaTable | str,
    *,
    from_seq: int | None = None,
    to_seq: int | None = None,
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    streams: Iterable[str] | None = None,
    keys: Iterable[str] | None = None,
    types: Iterable[str] | None = None,
    version: int | None = None,
    columns: list[str] | None = None,
    storage_options: dict[str, str] | None = None,
    batch_rows: int = 65_536,
) -> Iterator[pa.RecordBatch]:
    """Arrow batches of the rows that match every filter, ascending by seq.

    ``version`` reads the table as of that Delta version (time travel, within
    the log retention); ``since``/``until`` filter on the ``ts`` column, which
    answers "as of" for the whole history regardless of retention.
    """
    dt = source if isinstance(source, DeltaTable) else open_table(source, storage_options, version)
    if isinstance(source, DeltaTable) and version is not None:
        dt = open_table(source.table_uri, storage_options, version)
    since_dt = to_utc(since) if since is not None else None
    until_dt = to_utc(until) if until is not None else None
    expr = _filter(from_seq, to_seq, since_dt, until_dt, streams, keys, types)
    wanted = None if columns is None else list(dict.fromkeys([*columns, "seq"]))
    dataset = dt.to_pyarrow_dataset()
    fragments = {frag.path: frag for frag in dataset.get_fragments()}
    for group in _file_groups(dt, from_seq, to_seq, since_dt, until_dt):
        frags = [fragments[p] for p in group if p in fragments]
        if not frags:
            continue
        part = pads.FileSystemDataset(frags, dataset.schema, dataset.format, dataset.filesystem)
        table = part.to_table(filter=expr, columns=wanted)
        if table.num_rows == 0:
            continue
        if len(frags) > 1 or not _ascending(table.column("seq")):
            table = table.take(pc.sort_indices(table.column("seq")))
        if columns is not None and "seq" not in columns:
            table = table.drop_columns(["seq"])
        yield from table.to_batches(max_chunksize=batch_rows)


def _ascending(column: pa.ChunkedArray) -> bool:
    if len(column) < 2:
        return True
    flat = column.combine_chunks()
    return bool(pc.all(pc.greater(flat.slice(1), flat.slice(0, len(flat) - 1))).as_py())


def _file_groups(
    dt: DeltaTable,
    from_seq: int | None,
    to_seq: int | None,
    since: datetime | None,
    until: datetime | None,
) -> list[list[str]]:
    """Paths of the files that may hold matching rows, grouped so groups are disjoint in seq."""
    adds = pa.table(dt.get_add_actions(flatten=True))
    if adds.num_rows == 0:
        return []
    cols = adds.column_names
    paths = adds.column("path").to_pylist()
    mins = adds.column("min.seq").to_pylist() if "min.seq" in cols else [None] * len(paths)
    maxs = adds.column("max.seq").to_pylist() if "max.seq" in cols else [None] * len(paths)
    tmin = adds.column("min.ts").to_pylist() if "min.ts" in cols else [None] * len(paths)
    tmax = adds.column("max.ts").to_pylist() if "max.ts" in cols else [None] * len(paths)
    files: list[tuple[int, int, str]] = []
    for path, lo, hi, t_lo, t_hi in zip(paths, mins, maxs, tmin, tmax, strict=True):
        if lo is not None and hi is not None:
            if from_seq is not None and hi < from_seq:
                continue
            if to_seq is not None and lo > to_seq:
                continue
        # Delta keeps timestamp statistics at millisecond precision: allow for it
        if since is not None and t_hi is not None and _aware(t_hi) + _STATS_SLACK < since:
            continue
        if until is not None and t_lo is not None and _aware(t_lo) - _STATS_SLACK > until:
            continue
        files.append((lo if lo is not None else -1, hi if hi is not None else 2**63 - 1, path))
    files.sort()
    groups: list[list[str]] = []
    group_hi = None
    for lo, hi, path in files:
        if groups and group_hi is not None and lo <= group_hi:
            groups[-1].append(path)
            group_hi = max(group_hi, hi)
        else:
            groups.append([path])
            group_hi = hi
    return groups


def _aware(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return to_utc(str(value))


def max_seq(dt: DeltaTable) -> int:
    """The highest seq in the table (0 if empty), from Delta's file statistics.

    Every file the writer or compaction writes has statistics on ``seq``;
    only if one does not are the seq columns read.
    """
    adds = pa.table(dt.get_add_actions(flatten=True))
    if adds.num_rows == 0:
        return 0
    if "max.seq" in adds.column_names and adds.column("max.seq").null_count == 0:
        return int(pc.max(adds.column("max.seq")).as_py())
    best = 0
    for batch in read_batches(dt, columns=["seq"]):
        if batch.num_rows:
            best = max(best, pc.max(batch.column("seq")).as_py())
    return best


def read_events(uri: DeltaTable | str, **filters: Any) -> Iterator[StoredEvent]:
    """Decoded events in seq order (decode errors raise, naming the seq)."""
    for batch in read_batches(uri, **filters):
        yield from stored_events(batch)


def read_seq_events(uri: DeltaTable | str, **filters: Any) -> Iterator[tuple[int, Event]]:
    """``(seq, event)`` in seq order: what recovery needs, and nothing else.

    Recovery reads every event of a stream once and keeps none of the row
    around it, so it asks the scan for four columns instead of eight and
    skips building a StoredEvent per row (a million rows: about a second).
    """
    for batch in read_batches(uri, columns=["seq", "type", "v", "payload"], **filters):
        seqs = batch.column("seq").to_pylist()
        types = batch.column("type").to_pylist()
        vs = batch.column("v").to_pylist()
        payloads = batch.column("payload").to_pylist()
        yield from zip(seqs, decode_events(types, vs, payloads, seqs), strict=True)


def stored_events(batch: pa.RecordBatch) -> Iterator[StoredEvent]:
    seqs = batch.column("seq").to_pylist()
    tss = batch.column("ts").cast(pa.int64()).to_pylist()
    types = batch.column("type").to_pylist()
    streams = batch.column("stream").to_pylist()
    keys = batch.column("key").to_pylist()
    payloads = batch.column("payload").to_pylist()
    vs = batch.column("v").to_pylist()
    hashes = batch.column("hash").to_pylist()
    events = decode_events(types, vs, payloads, seqs)
    for seq, ts, tag, stream, key, v, hash_, event in zip(
        seqs, tss, types, streams, keys, vs, hashes, events, strict=True
    ):
        yield StoredEvent(seq=seq, ts_us=ts, type=tag, stream=stream, key=key, v=v, hash=hash_, event=event)
