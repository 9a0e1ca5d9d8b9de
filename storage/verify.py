"""Integrity check of the event log: seq continuity, the hash chain, payloads that decode.

Shared by ``python runtime.py verify``, by ``run`` before it appends to an
existing log, and by the tests. It streams the table in seq order and stops
at the first problem, naming its seq.

A file of the events table rewritten in place (same path, so the Delta log
still points at it) usually has a different size from the one the Delta log
recorded, and the Parquet reader, which trusts that size, then fails before
any hash is checked. Such a failure is not the end of the diagnosis: the
file the walk was about to read is opened again on its own, by its real size,
and its rows continue the hash chain, so the report names the first edited
seq and the file, not merely "cannot read". A rewrite that keeps the size is
read normally and caught by the hash chain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable
from deltalake.fs import DeltaStorageHandler

from events.codec import EventDecodeError, decode_event
from storage.hashing import GENESIS_HASH, row_hash
from storage.reader import open_table, read_batches, table_exists

__all__ = ["DataDirReport", "VerifyReport", "verify_data_dir", "verify_log"]

_COLUMNS = ("seq", "type", "stream", "key", "payload", "v", "hash")


class VerifyReport(msgspec.Struct, kw_only=True):
    ok: bool
    events: int = 0
    last_seq: int = 0
    last_hash: str = GENESIS_HASH
    first_bad_seq: int | None = None
    problem: str = ""
    #: The data file of the events table that holds the first bad seq, when it is known.
    file: str | None = None


class _Broken(Exception):
    """Stops the walk at the first bad row."""

    def __init__(self, seq: int, problem: str) -> None:
        super().__init__(problem)
        self.seq = seq
        self.problem = problem


class _Chain:
    """The walk over the rows in seq order: continuity, hash chain, decoding, the caller's check."""

    def __init__(self, report: VerifyReport, on_event: Callable[[int, str, object], None] | None) -> None:
        self.report = report
        self.on_event = on_event
        self.expected = 1
        self.prev = GENESIS_HASH

    def check(self, batch: pa.RecordBatch | pa.Table) -> None:
        cols = {name: batch.column(name).to_pylist() for name in _COLUMNS}
        tss = batch.column("ts").cast(pa.int64()).to_pylist()
        for i, seq in enumerate(cols["seq"]):
            if seq != self.expected:
                what = "duplicate" if seq < self.expected else "gap"
                raise _Broken(min(seq, self.expected), f"{what}: expected seq {self.expected}, found {seq}")
            payload = cols["payload"][i]
            digest = row_hash(
                self.prev,
                seq,
                tss[i],
                cols["type"][i],
                cols["stream"][i],
                cols["key"][i],
                cols["v"][i],
                payload.encode(),
            )
            if digest != cols["hash"][i]:
                raise _Broken(seq, "hash chain broken: the row or one before it was changed")
            try:
                event = decode_event(cols["type"][i], cols["v"][i], payload, seq=seq)
            except EventDecodeError as exc:
                raise _Broken(seq, f"payload does not decode: {exc}") from exc
            if self.on_event is not None:
                try:
                    self.on_event(seq, cols["stream"][i], event)
                except Exception as exc:
                    raise _Broken(seq, f"the event does not apply to the {cols['stream'][i]} state: {exc}") from exc
            self.prev = digest
            self.expected = seq + 1
            self.report.events += 1
            self.report.last_seq = seq
            self.report.last_hash = digest


def verify_log(
    uri: str,
    storage_options: dict[str, str] | None = None,
    *,
    on_event: Callable[[int, str, object], None] | None = None,
    after: tuple[int, str] | None = None,
) -> VerifyReport:
    """Check every row; ``on_event(seq, stream, event)`` sees each decoded event (e.g. to check snapshots).

    ``after=(seq, hash)`` continues the chain from a head already proven
    (a signed checkpoint whose files are checked): only later rows are read.
    """
    report = VerifyReport(ok=True)
    if not table_exists(uri, storage_options):
        return report
    chain = _Chain(report, on_event)
    if after is not None:
        chain.expected, chain.prev = after[0] + 1, after[1]
        report.last_seq, report.last_hash = after
    try:
        dt = open_table(uri, storage_options)
    except Exception as exc:  # noqa: BLE001 - a damaged Delta log shows up as many error types
        return _bad(report, 1, f"the Delta log of the events table cannot be read: {exc}")
    try:
        for batch in read_batches(dt, from_seq=None if after is None else chain.expected):
            chain.check(batch)
    except _Broken as broken:
        return _bad(report, broken.seq, broken.problem, _file_of(dt, broken.seq))
    except Exception as exc:  # noqa: BLE001 - a corrupt or rewritten file shows up as many error types
        return _diagnose(report, chain, dt, exc, storage_options)
    return report


def _bad(report: VerifyReport, seq: int, problem: str, file: str | None = None) -> VerifyReport:
    report.ok = False
    report.first_bad_seq = seq
    report.problem = problem if file is None else f"{problem} (file {file})"
    report.file = file
    return report


class _DataFile(msgspec.Struct, frozen=True):
    path: str
    size: int | None
    min_seq: int | None
    max_seq: int | None


def _data_files(dt: DeltaTable) -> list[_DataFile]:
    """The files the Delta log lists, by their first seq, with the size the log recorded."""
    adds = pa.table(dt.get_add_actions(flatten=True))
    if adds.num_rows == 0:
        return []
    n = adds.num_rows

    def col(name: str) -> list[Any]:
        return adds.column(name).to_pylist() if name in adds.column_names else [None] * n

    files = [
        _DataFile(path, size, lo, hi)
        for path, size, lo, hi in zip(col("path"), col("size_bytes"), col("min.seq"), col("max.seq"), strict=True)
    ]
    return sorted(files, key=lambda f: (f.min_seq if f.min_seq is not None else -1, f.path))


def _file_of(dt: DeltaTable, seq: int) -> str | None:
    """The data file whose statistics say it holds ``seq`` (None if unknown)."""
    try:
        files = _data_files(dt)
    except Exception:  # noqa: BLE001 - naming the file is a courtesy; the seq is the verdict
        return None
    for f in files:
        if f.min_seq is not None and f.max_seq is not None and f.min_seq <= seq <= f.max_seq:
            return f.path
    return None


def _diagnose(
    report: VerifyReport,
    chain: _Chain,
    dt: DeltaTable,
    error: Exception,
    storage_options: dict[str, str] | None,
) -> VerifyReport:
    """The scan failed at ``chain.expected``: find the file, read it by its real size, continue the chain."""
    seq = chain.expected
    try:
        files = [f for f in _data_files(dt) if f.max_seq is None or f.max_seq >= seq]
        # a handler of its own: the table's handler knows each file's size from the Delta log and
        # would read a rewritten file at the old size, failing again for the same reason
        filesystem = pafs.PyFileSystem(DeltaStorageHandler(dt.table_uri, storage_options))
    except Exception:  # noqa: BLE001
        return _bad(report, seq, f"the events table cannot be read past seq {seq - 1}: {error}")
    if not files:
        return _bad(report, seq, f"the events table cannot be read past seq {seq - 1}: {error}")
    suspect = files[0]
    first = suspect.min_seq if suspect.min_seq is not None else seq
    info = filesystem.get_file_info(suspect.path)
    if info.size is None:
        return _bad(report, first, "a data file the Delta log lists is missing", suspect.path)
    resized = (
        f"rewritten after it was committed: the Delta log records {suspect.size} bytes, the file has {info.size}"
        if suspect.size is not None and info.size != suspect.size
        else None
    )
    try:
        table = pq.read_table(filesystem.open_input_file(suspect.path))
        table = table.take(pc.sort_indices(table.column("seq")))
        chain.check(table)
    except _Broken as broken:
        problem = broken.problem if resized is None else f"{broken.problem}; the file was {resized}"
        return _bad(report, broken.seq, problem, suspect.path)
    except Exception as exc:  # noqa: BLE001
        return _bad(report, first, f"a data file cannot be read: {exc}", suspect.path)
    # every row of the file checks out on its own, yet the table scan failed: still not intact
    return _bad(report, first, f"the file cannot be read through the Delta log ({resized or error})", suspect.path)


class DataDirReport(VerifyReport, kw_only=True):
    detail: str = ""
    snapshots_checked: int = 0


def verify_data_dir(data_dir: str, storage_options: dict[str, str] | None = None) -> DataDirReport:
    """Verify the events table, then that every snapshot equals a replay of the events it summarises.

    A snapshot of a stream "at seq S" is that stream's state after every
    event up to the global seq S, whichever stream event S belongs to (a
    snapshot taken at a flush point names the log's last seq, often another
    stream's event). It is compared once the walk has applied every event
    up to S, i.e. when the first event after S arrives, or at the end.
    A problem in the log itself is reported before a snapshot that disagrees:
    snapshots are an optimisation, the log is the record.
    """
    from actors.queue_state import QueueState
    from actors.reconciliation import ReconciliationState
    from actors.registry import RegistryState
    from storage.snapshots import SnapshotStore
    from storage.tables import table_uri

    state_types: dict[str, Any] = {
        "registry": RegistryState,
        "queue": QueueState,
        "reconciliation": ReconciliationState,
    }
    snapshots = sorted(
        (snap for snap in SnapshotStore(data_dir, storage_options).all() if snap.stream in state_types),
        key=lambda snap: (snap.seq, snap.stream),
    )
    states = {name: state_types[name]() for name in {snap.stream for snap in snapshots}}
    problem: list[tuple[int, str]] = []
    checked = 0
    next_snap = 0

    def compare_through(seq: int) -> None:
        """Compare every snapshot taken at or before ``seq`` (all events up to it are applied)."""
        nonlocal checked, next_snap
        while next_snap < len(snapshots) and snapshots[next_snap].seq <= seq:
            snap = snapshots[next_snap]
            next_snap += 1
            checked += 1
            if not problem and msgspec.json.decode(snap.state) != msgspec.json.decode(states[snap.stream].dump()):
                problem.append(
                    (snap.seq, f"the {snap.stream} snapshot at seq {snap.seq} differs from a replay of the events")
                )

    def on_event(seq: int, stream: str, event: object) -> None:
        compare_through(seq - 1)
        state = states.get(stream)
        if state is not None:
            state.apply(event)

    report = verify_log(table_uri(data_dir, "events"), storage_options, on_event=on_event)
    out = DataDirReport(**msgspec.structs.asdict(report))
    if not out.ok:
        out.snapshots_checked = checked
        return out
    compare_through(out.last_seq)
    out.snapshots_checked = checked
    if problem:
        out.ok, out.first_bad_seq, out.problem = False, problem[0][0], problem[0][1]
        return out
    if next_snap < len(snapshots):
        snap = snapshots[next_snap]
        out.ok, out.first_bad_seq = False, snap.seq
        out.problem = f"a {snap.stream} snapshot claims seq {snap.seq}, past the end of the log (seq {out.last_seq})"
        return out
    out.detail = f"; {checked} snapshots agree with the events" if checked else ""
    return out
