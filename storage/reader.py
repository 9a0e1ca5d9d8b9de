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

import threading
import time
import weakref
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
    "plain_dataset",
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
    coalesce_rows: int = 0,
) -> Iterator[pa.RecordBatch]:
    """Arrow batches of the rows that match every filter, ascending by seq.

    ``coalesce_rows`` reads consecutive files in one scan while together they
    hold at most that many rows (see :func:`_scan_units`); 0 reads each file
    (or group of overlapping files) on its own, which is what ``verify``'s
    diagnosis of a failed scan relies on to name the file.

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
    for unit in _scan_units(_file_groups(dt, from_seq, to_seq, since_dt, until_dt), coalesce_rows):
        table = plain_dataset(dt, unit).to_table(filter=expr, columns=wanted)
        if table.num_rows == 0:
            continue
        if not _ascending(table.column("seq")):
            table = table.take(pc.sort_indices(table.column("seq")))
        if columns is not None and "seq" not in columns:
            table = table.drop_columns(["seq"])
        yield from table.to_batches(max_chunksize=batch_rows)


#: A pruning predicate no data file matches (seq starts at 1 in every table here): a dataset without fragments.
_NO_FILE = "seq < 1"
#: id(table) -> (a weak reference to it, its version, the dataset without fragments); DeltaTable is not hashable
_bases: dict[int, tuple[weakref.ref[DeltaTable], int, pads.FileSystemDataset]] = {}
_bases_lock = threading.Lock()


def plain_dataset(dt: DeltaTable, paths: Iterable[str] | None = None) -> pads.FileSystemDataset:
    """A dataset of ``paths`` (default: every file of ``dt``), without delta-rs's per-file statistics.

    ``dt.to_pyarrow_dataset()`` builds a fragment and a statistics
    expression per file in Python: about 65 ms for the 160 files of a
    million-event log, more with many small files, on every read, where the
    readers here prune files themselves (``_file_groups``) or read small
    tables whole. The table's format, schema and filesystem (which knows
    each file's size from the Delta log) are taken once per table object
    and version, with no fragment, and fragments are made for the files
    wanted (microseconds each).
    """
    version, key = dt.version(), id(dt)
    with _bases_lock:
        known = _bases.get(key)
    if known is None or known[0]() is not dt or known[1] != version:
        gone = lambda _: _forget_base(key)  # noqa: E731
        known = (weakref.ref(dt, gone), version, dt.to_pyarrow_dataset(file_pruning_predicate=_NO_FILE))
        with _bases_lock:
            _bases[key] = known
    base = known[2]
    files = pa.table(dt.get_add_actions(flatten=False)).column("path").to_pylist() if paths is None else paths
    fragments = [base.format.make_fragment(path, filesystem=base.filesystem) for path in files]
    return pads.FileSystemDataset(fragments, base.schema, base.format, base.filesystem)


def _forget_base(key: int) -> None:
    with _bases_lock:
        entry = _bases.get(key)
        if entry is not None and entry[0]() is None:
            del _bases[key]


def _scan_units(groups: list[tuple[list[str], int]], coalesce_rows: int) -> Iterator[list[str]]:
    """The files of each scan: a group alone, or consecutive groups together while they hold few rows.

    Each scan has a fixed cost (about half a millisecond); a log restarted
    often has a small file per commit of each short run, hundreds of them
    between snapshots. Groups are disjoint in seq and in order, so files
    read together still come out sorted (checked, and sorted if not).
    """
    unit: list[str] = []
    rows = 0
    for paths, n in groups:
        if unit and (coalesce_rows <= 0 or rows + n > coalesce_rows):
            yield unit
            unit, rows = [], 0
        unit.extend(paths)
        rows += n
    if unit:
        yield unit


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
) -> list[tuple[list[str], int]]:
    """Paths of the files that may hold matching rows, grouped so groups are disjoint in seq, with their rows."""
    adds = pa.table(dt.get_add_actions(flatten=True))
    if adds.num_rows == 0:
        return []
    cols = adds.column_names
    paths = adds.column("path").to_pylist()
    mins = adds.column("min.seq").to_pylist() if "min.seq" in cols else [None] * len(paths)
    maxs = adds.column("max.seq").to_pylist() if "max.seq" in cols else [None] * len(paths)
    tmin = adds.column("min.ts").to_pylist() if "min.ts" in cols else [None] * len(paths)
    tmax = adds.column("max.ts").to_pylist() if "max.ts" in cols else [None] * len(paths)
    counts = adds.column("num_records").to_pylist() if "num_records" in cols else [None] * len(paths)
    files: list[tuple[int, int, str, int]] = []
    for path, lo, hi, t_lo, t_hi, n in zip(paths, mins, maxs, tmin, tmax, counts, strict=True):
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
        # a file without a row count is never read together with others
        files.append(
            (lo if lo is not None else -1, hi if hi is not None else 2**63 - 1, path, 2**62 if n is None else n)
        )
    files.sort()
    groups: list[tuple[list[str], int]] = []
    group_hi = None
    for lo, hi, path, n in files:
        if groups and group_hi is not None and lo <= group_hi:
            groups[-1][0].append(path)
            groups[-1] = (groups[-1][0], groups[-1][1] + n)
            group_hi = max(group_hi, hi)
        else:
            groups.append(([path], n))
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


#: Rows of consecutive files recovery reads in one scan (about one batch).
_COALESCE_ROWS = 65_536


def read_seq_events(uri: DeltaTable | str, **filters: Any) -> Iterator[tuple[int, Event]]:
    """``(seq, event)`` in seq order: what recovery needs, and nothing else.

    Recovery reads every event of a stream once and keeps none of the row
    around it, so it asks the scan for four columns instead of eight and
    skips building a StoredEvent per row (a million rows: about a second).

    Two passes when the filters pick rows by stream, key or type: the first
    reads only ``seq`` to find the matching range, the second reads the
    payloads within it. Arrow decodes every projected column before it
    filters, so a stream that was quiet since its snapshot would otherwise
    decode the payloads of all other streams' events since then (50,000
    rows: about 0.2 s of a start) to find none.
    """
    selective = any(filters.get(name) is not None for name in ("streams", "keys", "types"))
    if selective and filters.get("version") is None:
        source = uri if isinstance(uri, DeltaTable) else open_table(uri, filters.get("storage_options"))
        lo = hi = None
        for batch in read_batches(source, columns=["seq"], coalesce_rows=_COALESCE_ROWS, **filters):
            if batch.num_rows:
                lo = batch.column("seq")[0].as_py() if lo is None else lo
                hi = batch.column("seq")[-1].as_py()
        if lo is None:
            return
        # the same table object and filters, narrowed to the rows just found: exactly those rows
        uri, filters = source, {**filters, "from_seq": lo, "to_seq": hi}
    for batch in read_batches(uri, columns=["seq", "type", "v", "payload"], coalesce_rows=_COALESCE_ROWS, **filters):
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
