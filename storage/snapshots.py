"""The snapshot store: Delta table ``snapshots``, newest state per stream.

An event-sourced actor writes its whole state here every N events and at a
clean shutdown, tagged with the seq of the last event it includes; recovery
loads the newest snapshot of its stream and replays only later events. A
snapshot is written only after that seq is durable in the log, so a snapshot
never runs ahead of the events it summarises. Snapshots are an optimisation:
losing the table loses nothing but replay time, and ``verify`` checks each
one against a replay of the events.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, write_deltalake
from loguru import logger

from storage.durability import sync_commit, sync_new_table
from storage.maintenance import keep_opens_cheap
from storage.reader import plain_dataset
from storage.tables import SNAPSHOTS_SCHEMA, is_local, table_uri

__all__ = ["SnapshotStore", "StoredSnapshot"]


class StoredSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    stream: str
    seq: int
    ts_us: int
    v: int
    state: bytes
    sha256: str


class SnapshotStore:
    """Append-only store of actor snapshots; thread-safe; one commit per snapshot."""

    def __init__(self, data_dir: str, storage_options: dict[str, str] | None = None, *, preload: bool = False) -> None:
        """``preload``: the first :meth:`latest` reads the newest snapshot of every stream at once (see there)."""
        self.uri = table_uri(str(data_dir), "snapshots")
        self.storage_options = storage_options
        self._lock = threading.Lock()
        self.saved = 0
        self._preload = preload
        #: stream -> its newest intact snapshot, read once for the start; dropped at the first write
        self._newest: dict[str, StoredSnapshot] | None = None
        #: streams whose newest snapshot was corrupt: read the usual way, which skips to an older one
        self._unsure: set[str] = set()

    def save(self, stream: str, seq: int, state: bytes, v: int = 1) -> None:
        """Store ``state`` as the state of ``stream`` after event ``seq`` (which must be durable)."""
        row = pa.Table.from_arrays(
            [
                pa.array([stream], pa.string()),
                pa.array([seq], pa.int64()),
                pa.array([time.time_ns() // 1000], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
                pa.array([v], pa.int32()),
                pa.array([state], pa.binary()),
                pa.array([hashlib.sha256(state).hexdigest()], pa.string()),
            ],
            schema=SNAPSHOTS_SCHEMA,
        )
        with self._lock:
            self._forget_newest()
            write_deltalake(self.uri, row, mode="append", storage_options=self.storage_options)
            if is_local(self.uri):  # on disk before recovery may rely on it and skip the events it covers
                dt = DeltaTable(self.uri)
                version = dt.version()
                (sync_new_table if version == 0 else sync_commit)(self.uri, version)
                keep_opens_cheap(dt)  # a commit a snapshot: every start's preload opens this table
            self.saved += 1
        logger.debug("snapshot of {} at seq {} ({} bytes)", stream, seq, len(state))

    def discard_after(self, stream: str, seq: int) -> None:
        """Delete ``stream``'s snapshots past ``seq``: they name events the log does not hold.

        Raises if they cannot be deleted: recovery has not loaded them, but once
        the log grows past ``seq`` a later start would, so the caller must not
        let it grow (the actor refuses to start; the next start tries again).
        """
        if not stream.isidentifier():
            raise ValueError(f"not a stream name: {stream!r}")
        with self._lock:
            self._forget_newest()
            dt = self._table()
            if dt is None:
                return
            metrics = dt.delete(f"stream = '{stream}' AND seq > {int(seq)}")
            if is_local(self.uri) and metrics.get("num_deleted_rows"):
                # on disk before the log grows past ``seq`` again: a power cut must not bring them back
                sync_commit(self.uri, DeltaTable(self.uri).version())
        logger.warning("discarded {} snapshot(s) of {} past seq {}", metrics.get("num_deleted_rows"), stream, seq)

    def latest(self, stream: str, at_or_before: int | None = None) -> StoredSnapshot | None:
        """The newest intact snapshot of ``stream`` (optionally not after seq ``at_or_before``).

        Reads the ``seq`` column to choose, then only that snapshot's state:
        recovery must not read every state ever saved. A store made with
        ``preload`` answers the start's calls (one per actor, all at once) from
        one read of every stream's newest snapshot instead of an open of the
        table and two scans each, until anything is written.
        """
        if self._preload:
            known, snap = self._preloaded(stream)
            if known and (snap is None or at_or_before is None or snap.seq <= at_or_before):
                return snap
        dt = self._table()
        if dt is None:
            return None
        expr = self._filter(stream, at_or_before)
        seqs = plain_dataset(dt).to_table(filter=expr, columns=["seq"]).column("seq").to_pylist()
        for seq in sorted(set(seqs), reverse=True):
            for snap in self._read(dt, expr & (pc.field("seq") == seq)):
                return snap  # the newest intact one; a corrupt one was skipped with a warning
        return None

    def _preloaded(self, stream: str) -> tuple[bool, StoredSnapshot | None]:
        """(whether the preload knows ``stream``'s newest snapshot, that snapshot or None if it has none)."""
        with self._lock:
            if not self._preload:
                return False, None
            if self._newest is None:
                self._newest, self._unsure = self._read_newest()
            if stream in self._unsure:
                return False, None
            return True, self._newest.get(stream)

    def _read_newest(self) -> tuple[dict[str, StoredSnapshot], set[str]]:
        """Every stream's newest snapshot, reading as few of the table's files as its Delta statistics allow.

        Each save is a one-row file, so the table grows a file per snapshot
        and reading every file cost 0.1-0.15 s of a start. A file whose
        statistics say it holds one stream names that stream's seq without
        being read; only files of several streams (or without statistics)
        are scanned for heads, and the states come only from files whose
        statistics may hold a wanted (stream, seq).
        """
        dt = self._table()
        if dt is None:
            return {}, set()
        files = _statistics(dt)  # the add actions, read once for both uses below
        known, scan = _heads_from_statistics(files)
        best = dict(known)
        if scan is None or scan:
            source = plain_dataset(dt, scan)
            heads = source.to_table(columns=["stream", "seq"]).group_by("stream").aggregate([("seq", "max")])
            for stream, seq in zip(heads.column("stream").to_pylist(), heads.column("seq_max").to_pylist(), strict=True):
                best[stream] = max(seq, best.get(stream, seq))
        wanted = sorted(best.items())
        if not wanted:
            return {}, set()
        expr = pc.scalar(False)
        for stream, seq in wanted:
            expr = expr | ((pc.field("stream") == stream) & (pc.field("seq") == seq))
        newest: dict[str, StoredSnapshot] = {}
        for snap in self._read(dt, expr, _files_holding(files, wanted) if files is not None else None):
            newest.setdefault(snap.stream, snap)
        return newest, {stream for stream, _ in wanted} - set(newest)

    def streams_past(self, seq: int) -> list[str]:
        """Streams whose newest intact snapshot is past ``seq`` (the log's durable end): stale ones to discard.

        From the start's preload when there is one (already read for the actors' recovery), else one read.
        """
        with self._lock:
            if self._preload and self._newest is None:
                self._newest, self._unsure = self._read_newest()
            newest = dict(self._newest) if self._preload and self._newest is not None else None
            unsure = set(self._unsure) if newest is not None else set()
        if newest is None:
            dt = self._table()
            if dt is None:
                return []
            rows = plain_dataset(dt).to_table(filter=pc.field("seq") > seq, columns=["stream"])
            return sorted(set(rows.column("stream").to_pylist()))
        past = {stream for stream, snap in newest.items() if snap.seq > seq}
        for stream in unsure:  # its newest is corrupt: the newest intact one, read the usual way
            snap = self.latest(stream)
            if snap is not None and snap.seq > seq:
                past.add(stream)
        return sorted(past)

    def _forget_newest(self) -> None:
        self._preload, self._newest = False, None

    def all(self, stream: str | None = None, at_or_before: int | None = None) -> Iterator[StoredSnapshot]:
        """Every intact snapshot (verify compares each with the events)."""
        dt = self._table()
        if dt is None:
            return iter(())
        return self._read(dt, self._filter(stream, at_or_before))

    def _table(self) -> DeltaTable | None:
        if not DeltaTable.is_deltatable(self.uri, storage_options=self.storage_options):
            return None
        return DeltaTable(self.uri, storage_options=self.storage_options)

    @staticmethod
    def _filter(stream: str | None, at_or_before: int | None) -> pc.Expression:
        expr = pc.scalar(True)
        if stream is not None:
            expr = expr & (pc.field("stream") == stream)
        if at_or_before is not None:
            expr = expr & (pc.field("seq") <= at_or_before)
        return expr

    @staticmethod
    def _read(dt: DeltaTable, expr: pc.Expression, paths: list[str] | None = None) -> Iterator[StoredSnapshot]:
        table = plain_dataset(dt, paths).to_table(filter=expr)
        table = table.set_column(2, "ts", table.column("ts").cast(pa.int64()))
        for row in table.to_pylist():
            snap = StoredSnapshot(
                stream=row["stream"],
                seq=row["seq"],
                ts_us=row["ts"],
                v=row["v"],
                state=row["state"],
                sha256=row["sha256"],
            )
            if hashlib.sha256(snap.state).hexdigest() != snap.sha256:
                logger.warning("snapshot of {} at seq {} is corrupt: ignored, replaying instead", snap.stream, snap.seq)
                continue
            yield snap


#: Delta keeps string statistics only up to a prefix; a stream name this long may have been cut
_STATS_PREFIX = 32
_STATS = ("path", "min.stream", "max.stream", "min.seq", "max.seq")


def _statistics(dt: DeltaTable) -> list[tuple[str, str, str, int, int]] | None:
    """``(path, min stream, max stream, min seq, max seq)`` of every file; None if a file lacks them."""
    adds = pa.table(dt.get_add_actions(flatten=True))
    if adds.num_rows and any(c not in adds.column_names or adds.column(c).null_count for c in _STATS):
        return None
    return list(zip(*(adds.column(c).to_pylist() for c in _STATS), strict=True)) if adds.num_rows else []


def _heads_from_statistics(
    files: list[tuple[str, str, str, int, int]] | None,
) -> tuple[dict[str, int], list[str] | None]:
    """(stream -> newest seq, from the files that hold one stream; the other files, to scan; None: scan all)."""
    if files is None:
        return {}, None
    known: dict[str, int] = {}
    scan: list[str] = []
    for path, lo_stream, hi_stream, _lo, hi in files:
        if lo_stream == hi_stream and len(lo_stream) < _STATS_PREFIX:
            known[lo_stream] = max(hi, known.get(lo_stream, hi))
        else:
            scan.append(path)
    return known, scan


def _files_holding(files: list[tuple[str, str, str, int, int]], wanted: list[tuple[str, int]]) -> list[str]:
    """The files whose statistics allow one of the ``(stream, seq)`` rows in ``wanted``."""
    return [
        path
        for path, lo_stream, hi_stream, lo, hi in files
        if any(lo <= seq <= hi and _may_hold(lo_stream, hi_stream, stream) for stream, seq in wanted)
    ]


def _may_hold(lo: str, hi: str, stream: str) -> bool:
    """Whether a file with these ``stream`` statistics may hold ``stream``, if either was cut to a prefix.

    Compared on the prefix Delta keeps: cutting keeps the order of the prefixes, so this never rules out
    a file that holds the stream (a cut maximum is below the true one, so an uncut comparison could).
    """
    n = _STATS_PREFIX
    return lo[:n] <= stream[:n] <= hi[:n]
