"""The event log: one Delta table ``events``, one writer, group commit.

Every actor appends here; nothing outside an actor may depend on an event
before the log says it is durable (DESIGN.md section 3). The design choices:

* **Seq at append, hash at commit.** ``append`` assigns the next global seq
  under a lock and returns at once with a :class:`Receipt`; the writer thread
  computes the sha256 chain in seq order when it commits. Producers never
  wait for a commit unless they choose to.
* **Group commit.** Rows gather into the open :class:`CommitBatch`; the
  writer seals it when it is full or ``flush_ms`` after its first row, and
  writes it as one Delta commit. All receipts of a batch resolve together.
* **Idempotent commit.** Each batch carries the Delta app transaction
  ``(writer_id, batch_no)``. delta-rs does not reject a duplicate by itself,
  so before retrying an ambiguous failure the writer reads
  ``transaction_version(writer_id)`` and treats a batch already there as done.
* **Fencing.** Commits use ``max_commit_retries=0``: if the table moved since
  the writer's snapshot, the commit fails instead of interleaving. Moves made
  by this writer's own maintenance (tagged in commit metadata) are benign and
  retried at once; a move by anyone else stops the log (:class:`LogFencedError`).
* **Failure.** A commit that keeps failing is retried a bounded number of
  times; then the log refuses every further append and fails every receipt
  not yet durable. Nothing that was acknowledged is lost, because nothing is
  acknowledged before its commit.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
from deltalake import ColumnProperties, DeltaTable, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError
from deltalake.transaction import CommitProperties, PostCommitHookProperties, Transaction
from loguru import logger

from events.base import Event
from events.codec import encode_event
from storage.durability import sync_commit, sync_commit_files_between, sync_new_table
from storage.hashing import GENESIS_HASH, row_hash
from storage.lock import DirectoryLock
from storage.maintenance import WRITER_KEY, Maintenance, append_hooks, commits_since_checkpoint, keep_table_properties
from storage.object_fence import refuse_live_writer, release
from storage.permissions import private_dir
from storage.reader import StoredEvent, max_seq, open_table, read_batches, read_events, table_exists
from storage.tables import EVENTS_SCHEMA, LogConfig, is_local, table_properties, table_uri

__all__ = [
    "CommitBatch",
    "EventLog",
    "LogClosedError",
    "LogError",
    "LogFailedError",
    "LogFencedError",
    "Receipt",
]


#: payload and hash are never filtered on and never repeat: dictionaries and
#: min/max statistics for them are pure write cost (about 10% of a commit).
_WRITER_PROPERTIES = WriterProperties(
    column_properties={
        "payload": ColumnProperties(dictionary_enabled=False, statistics_enabled="NONE"),
        "hash": ColumnProperties(dictionary_enabled=False, statistics_enabled="NONE"),
    }
)


class LogError(RuntimeError):
    """Base of every event log failure."""


class LogFailedError(LogError):
    """The log stopped accepting appends because commits kept failing."""


class LogFencedError(LogFailedError):
    """Another writer committed to the table: this writer must stop."""


class LogClosedError(LogError):
    """Append after close."""


class CommitBatch:
    """Rows that become one Delta commit; every receipt of the batch resolves with it.

    Callbacks run on the writer thread: they must be quick and must not
    append to the log (tell an actor instead).
    """

    __slots__ = (
        "_callbacks",
        "_done",
        "error",
        "hashes",
        "keys",
        "last_seq",
        "payloads",
        "seqs",
        "streams",
        "tags",
        "tss",
        "vs",
    )

    def __init__(self) -> None:
        # columns, not row tuples: the writer hands them to Arrow as they are
        self.seqs: list[int] = []
        self.tss: list[int] = []
        self.tags: list[str] = []
        self.streams: list[str] = []
        self.keys: list[str] = []
        self.vs: list[int] = []
        self.payloads: list[bytes] = []
        self.hashes: list[str] = []
        self._done = threading.Event()
        self._callbacks: list[Callable[[CommitBatch], None]] = []
        self.error: BaseException | None = None
        self.last_seq = 0

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> int:
        """Block until durable; return the batch's last seq, or raise why it never will be."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"batch not durable after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.last_seq

    def add_done_callback(self, fn: Callable[[CommitBatch], None]) -> None:
        run_now = False
        with _CALLBACK_LOCK:
            if self._done.is_set():
                run_now = True
            else:
                self._callbacks.append(fn)
        if run_now:
            fn(self)

    def _resolve(self, error: BaseException | None) -> None:
        with _CALLBACK_LOCK:
            self.error = error
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # noqa: BLE001 - a callback's failure must not stop the writer
                logger.exception("durability callback failed")


_CALLBACK_LOCK = threading.Lock()


class Receipt(NamedTuple):
    """Where an appended event went: its seq, and the batch that makes it durable."""

    seq: int
    batch: CommitBatch

    def wait(self, timeout: float | None = None) -> int:
        self.batch.wait(timeout)
        return self.seq

    @property
    def durable(self) -> bool:
        return self.batch.done and self.batch.error is None


class EventLog:
    """The single writer of ``<data dir>/events``.

    Use :meth:`open`; append from any thread; :meth:`close` flushes and
    releases the lock. Reads are available on an open log and, through
    :mod:`storage.reader`, without one.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        config: LogConfig | None = None,
        storage_options: dict[str, str] | None = None,
        writer_id: str | None = None,
        fault_hook: Callable[[int], None] | None = None,
    ) -> None:
        self.data_dir = str(data_dir)
        self.config = config or LogConfig()
        self.storage_options = storage_options
        self.uri = table_uri(self.data_dir, "events")
        self.writer_id = writer_id or f"slotwise-{uuid.uuid4().hex[:12]}"
        self._fault_hook = fault_hook
        self._lock_file = DirectoryLock(self.data_dir) if is_local(self.data_dir) else None
        self._mutex = threading.Lock()
        self._wake = threading.Condition(self._mutex)
        self._room = threading.Condition(self._mutex)
        self._open_batch = CommitBatch()
        self._sealed: deque[CommitBatch] = deque()
        # the batch the writer took off the queue and is committing outside the lock
        self._in_flight: CommitBatch | None = None
        self._pending_rows = 0
        self._next_seq = 1
        self._last_ts = 0
        self._failed: LogFailedError | None = None
        self._closing = False
        self._closed = True
        self._writer: threading.Thread | None = None
        self._dt: DeltaTable | None = None
        self._known_version = -1
        #: The table's retention and checkpoint properties are still to be brought to this config (first commit).
        self._properties_pending = False
        self._synced_version = -1  # the newest version this writer made durable (or found at open)
        self._batch_no = 0
        self._chain_hash = GENESIS_HASH
        self.durable_seq = 0
        #: The last durable seq found at open: a snapshot past it came from a commit that never landed.
        self.opened_seq = 0
        self.commits = 0
        self.commit_latency_ms: deque[float] = deque(maxlen=1024)
        self._failure_listeners: list[Callable[[LogFailedError], None]] = []
        self._commit_listeners: list[Callable[[int, str, int], None]] = []
        self._close_listeners: list[Callable[[], None]] = []
        self._maintenance: Maintenance | None = None
        self._type_info: dict[type, tuple[str, int]] = {}
        self._fast_append: Callable[[pa.Table, CommitProperties, PostCommitHookProperties], None] | None = None
        # the start-up check's verdict: open (True) unless a check was announced and has not passed
        self._check_done = threading.Event()
        self._check_done.set()
        self._check_passed = True
        self._view_lock = threading.Lock()
        self._signed_at_close = False
        self._start_view: DeltaTable | None = None
        self._view_seq = -1

    # ------------------------------------------------------------------ open / close

    @classmethod
    def open(cls, data_dir: str | os.PathLike[str], **kwargs: Any) -> EventLog:
        log = cls(data_dir, **kwargs)
        log._open()
        return log

    def _open(self) -> None:
        if self._lock_file is not None:
            private_dir(Path(self.data_dir))  # 0700: the log and the P&L are nobody else's business
            self._lock_file.acquire()
        try:
            if table_exists(self.uri, self.storage_options):
                self._dt = DeltaTable(self.uri, storage_options=self.storage_options)
                if self._lock_file is None:  # object storage: no lock file, so look who committed last
                    refuse_live_writer(self._dt, self.data_dir, self.writer_id, self.config.takeover_after_s)
                self._recover_tail()
                # the table's settings reach this config with this run's first commit, not here: a start-up check
                # may yet refuse the log, and a refused start writes nothing (to a tampered table least of all)
                self._properties_pending = True
                if self._syncs:
                    # a run killed between a commit and its fsync left that tail in the page cache only; this
                    # run replays and builds on it, so it goes to disk before anything new is acknowledged
                    os.sync()
            else:
                self._dt = DeltaTable.create(
                    self.uri,
                    schema=EVENTS_SCHEMA,
                    mode="error",
                    name="events",
                    description="Slotwise event log (append-only, hash-chained)",
                    configuration=table_properties(self.config),
                    storage_options=self.storage_options,
                    commit_properties=CommitProperties(custom_metadata={WRITER_KEY: self.writer_id}),
                )
                if self._syncs:
                    sync_new_table(self.uri, self._dt.version())
            self._known_version = self._dt.version()
            self._synced_version = self._known_version
            self._fast_append = self._make_fast_append()
        except BaseException:
            if self._lock_file is not None:
                self._lock_file.release()
            raise
        self._closed = False
        self._writer = threading.Thread(target=self._writer_loop, name="eventlog-writer", daemon=True)
        self._writer.start()
        if self.config.maintenance:
            assert self._dt is not None
            pending = commits_since_checkpoint(self._dt)  # a log stopped uncleanly may not be checkpointed yet
            self._maintenance = Maintenance(
                self.uri, self.config, self.writer_id, self.storage_options, pending_commits=pending
            )
            self._maintenance.start()
        logger.info("event log open at {} (writer {}, next seq {})", self.uri, self.writer_id, self._next_seq)

    def _recover_tail(self) -> None:
        """Find the last durable seq and hash: appends continue the chain from there."""
        assert self._dt is not None
        last_seq = max_seq(self._dt)
        if last_seq == 0:
            return
        last = None
        for batch in read_batches(self._dt, from_seq=last_seq, to_seq=last_seq, columns=["seq", "ts", "hash"]):
            if batch.num_rows:
                last = batch.to_pylist()[-1]
        if last is None:
            raise LogError(f"the events table says seq {last_seq} exists but it cannot be read")
        self._next_seq = int(last["seq"]) + 1
        self.durable_seq = int(last["seq"])
        self.opened_seq = self.durable_seq
        self._chain_hash = str(last["hash"])
        ts = last["ts"]
        self._last_ts = int(ts.timestamp() * 1_000_000) if isinstance(ts, datetime) else 0

    def _apply_table_properties(self) -> None:
        """Bring the table's retention and checkpoint settings to this config (a commit only if they differ).

        Runs on the writer thread before the run's first commit. A failure
        here costs settings, not events: it is logged, and the next start
        tries again.
        """
        assert self._dt is not None
        self._properties_pending = False
        try:
            changed = keep_table_properties(self._dt, self.config, self.writer_id)
        except Exception as exc:  # noqa: BLE001 - Delta and OS errors alike; the events still go in
            logger.error("event log table properties could not be set ({}); the next start tries again", exc)
            self._dt.update_incremental()
            self._known_version = self._dt.version()
            return
        if changed:
            logger.info("event log table properties set: {}", changed)
            self._dt.update_incremental()
            self._known_version = self._dt.version()
            if self._syncs:
                sync_commit(self.uri, self._known_version)
                self._synced_version = self._known_version

    # ------------------------------------------------------------------ the start-up check

    def expect_start_check(self) -> None:
        """Announce a start-up check of what this log holds: :meth:`wait_start_check` waits for its verdict.

        The check only reads, and so does actors' recovery: both run at
        once. What an actor does after recovering (append, tell others) must
        wait until the check has accepted the log, so nothing is built on a
        log that turns out broken.
        """
        self._check_passed = False
        self._check_done.clear()

    def start_check_done(self, passed: bool) -> None:
        """The verdict of the announced check (the first one given counts)."""
        if not self._check_done.is_set():
            self._check_passed = passed
            self._check_done.set()

    def wait_start_check(self) -> bool:
        """Whether the start-up check accepted the log; True at once when none was announced."""
        self._check_done.wait()
        return self._check_passed

    def start_view(self) -> DeltaTable:
        """A read-only DeltaTable of ``events`` holding every event appended so far, shared by its readers.

        For the start: the check and every actor's recovery read the table
        at once, and each open re-reads the Delta log (about 60 ms on a
        million-event log, several times that when the opens compete for
        the CPU). delta-rs guards a table with a mutex, so threads may share
        one. It is handed out again only while nothing was appended since
        every event before it was durable at its open; otherwise a new one
        is opened (an actor started later recovers what was appended).
        """
        with self._view_lock:
            if self._start_view is None or self.last_seq != self._view_seq:
                seq = self.durable_seq  # before the open: the table holds at least this
                self._start_view, self._view_seq = open_table(self.uri, self.storage_options), seq
            return self._start_view

    def add_failure_listener(self, fn: Callable[[LogFailedError], None]) -> None:
        """``fn(error)`` runs once, on the writer thread, when the log gives up."""
        self._failure_listeners.append(fn)

    def add_commit_listener(self, fn: Callable[[int, str, int], None]) -> None:
        """``fn(last_seq, chain_hash, delta_version)`` runs on the writer thread after each commit is durable.

        The extension point of signed checkpoints (storage/checkpointer.py):
        it must be quick (hand work to another thread) and must not append.
        """
        self._commit_listeners.append(fn)

    def add_close_listener(self, fn: Callable[[], None], *, signs_files: bool = False) -> None:
        """``fn()`` runs in :meth:`close` once the writer and maintenance have stopped, before the lock is
        released, unless the log failed: the table is quiet and still ours (the clean-stop checkpoint).

        ``signs_files``: ``fn`` signs the table's data files as they are then, so the close may merge
        small files first (see :meth:`_compacts_at_close`).
        """
        self._close_listeners.append(fn)
        if signs_files:
            self._signed_at_close = True

    def _compacts_at_close(self) -> bool:
        """Whether the close may merge the run's small files: only if that cannot cost the next start its
        signed checkpoint. A signed checkpoint lists the data files; a start that finds them merged verifies
        the whole chain instead (seconds on a large log). So: when a close listener signs the merged files,
        or when there is no signed checkpoint to keep (a log that was never signed)."""
        if self._signed_at_close:
            return True
        try:
            return not table_exists(table_uri(self.data_dir, "checkpoints"), self.storage_options)
        except Exception:  # noqa: BLE001 - not known: keep the files
            return False

    def flush(self, timeout: float | None = 30.0) -> int:
        """Make everything appended so far durable; return the durable seq.

        Waits for the newest batch wherever it is: open, sealed, or already
        taken by the writer and being committed outside the lock. Returning
        while that last one is still in flight would let a caller (a snapshot
        at stop) name a seq the log may never hold.
        """
        with self._mutex:
            if self._failed is not None:
                raise self._failed
            batch = self._newest_batch_locked()
            self._wake.notify_all()
        if batch is not None:
            batch.wait(timeout)
        return self.durable_seq

    def _newest_batch_locked(self) -> CommitBatch | None:
        """Seal the open batch and return the one holding the last seq handed out (None if all are resolved)."""
        if len(self._open_batch):
            return self._seal_open_locked()
        if self._sealed:
            return self._sealed[-1]
        return self._in_flight

    def close(self, timeout: float = 30.0) -> None:
        """Refuse appends, commit what was appended, stop the writer and maintenance, release the lock.

        Appends are refused first, under the lock, and the batch holding the
        last seq is waited for; every row appended before that moment is
        either committed or failed, never left unresolved. Safe to call twice.
        """
        self.start_check_done(False)  # a check still running never accepts a closed log
        if self._closed:
            return
        with self._mutex:
            self._closing = True
            last = self._newest_batch_locked() if self._failed is None else None
            self._wake.notify_all()
            self._room.notify_all()
        try:
            if last is not None:
                last.wait(timeout)
        finally:
            if self._writer is not None:
                self._writer.join(timeout)
            with self._mutex:
                leftover = [*self._sealed, self._open_batch]
                self._sealed.clear()
                self._open_batch = CommitBatch()
            for batch in leftover:
                if len(batch):  # only if the writer did not finish in time: never silently unresolved
                    batch._resolve(LogClosedError("the event log closed before this batch was committed"))
            if self._maintenance is not None:  # it checkpoints the table: the next open reads no commit file before
                ok = self._failed is None
                self._maintenance.stop(checkpoint=ok, merge_small_files=ok and self._compacts_at_close())
            for fn in self._close_listeners if self._failed is None else ():
                try:
                    fn()
                except Exception:  # noqa: BLE001 - a listener's failure must not keep the lock held
                    logger.exception("event log close listener failed")
            if self._lock_file is None and self._failed is None and self._dt is not None:
                try:  # object storage: tell the next writer it need not wait out takeover_after_s
                    release(self._dt, self.writer_id, EVENTS_SCHEMA)
                except Exception as exc:  # noqa: BLE001 - then the next writer waits; nothing is lost
                    logger.warning("event log release commit failed: {!r}", exc)
            if self._lock_file is not None:
                self._lock_file.release()
            self._closed = True
            logger.info("event log closed at seq {}", self.durable_seq)

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ append

    @property
    def failed(self) -> LogFailedError | None:
        return self._failed

    @property
    def last_seq(self) -> int:
        """The last seq handed out (durable or not)."""
        return self._next_seq - 1

    def append(self, event: Event, *, stream: str, key: str) -> Receipt:
        """Append ``event``; returns at once. Wait on the receipt before anyone depends on it."""
        info = self._type_info.get(type(event))
        if info is None:
            info = self._learn_type(event)
        payload = encode_event(event)
        with self._mutex:
            self._check_open_locked()
            return self._append_locked(info[0], info[1], stream, key, payload)

    def append_many(self, items: Iterable[tuple[Event, str, str]]) -> list[Receipt]:
        """Append several ``(event, stream, key)`` at once, contiguous in seq."""
        prepared = []
        for event, stream, key in items:
            info = self._type_info.get(type(event)) or self._learn_type(event)
            prepared.append((info[0], info[1], stream, key, encode_event(event)))
        with self._mutex:
            self._check_open_locked()
            return [self._append_locked(*row) for row in prepared]

    def _learn_type(self, event: Event) -> tuple[str, int]:
        if not isinstance(event, Event):
            raise TypeError(f"only events are stored, not {type(event).__name__}")
        tag = type(event).__struct_config__.tag
        if not isinstance(tag, str):
            raise TypeError(f"{type(event).__name__} has no string tag")
        info = (tag, type(event).version)
        self._type_info[type(event)] = info
        return info

    def _check_open_locked(self) -> None:
        if self._closed or self._closing:
            raise LogClosedError("the event log is closed")
        if self._failed is not None:
            raise self._failed
        while self._pending_rows >= self.config.max_pending and self._failed is None and not self._closing:
            self._room.wait(1.0)  # backpressure: the writer is behind
        if self._failed is not None:
            raise self._failed
        if self._closing:  # close() began while this append waited for room
            raise LogClosedError("the event log is closed")

    def _append_locked(self, tag: str, v: int, stream: str, key: str, payload: bytes) -> Receipt:
        seq = self._next_seq
        self._next_seq = seq + 1
        ts = time.time_ns() // 1000
        if ts <= self._last_ts:  # ts never goes backwards along seq, so "as of" cuts are clean
            ts = self._last_ts
        self._last_ts = ts
        # The chain is extended here, where seq order is decided, so the writer's
        # critical path is only the Delta write (this is what keeps ack latency low).
        digest = row_hash(self._chain_hash, seq, ts, tag, stream, key, v, payload)
        self._chain_hash = digest
        batch = self._open_batch
        batch.seqs.append(seq)
        batch.tss.append(ts)
        batch.tags.append(tag)
        batch.streams.append(stream)
        batch.keys.append(key)
        batch.vs.append(v)
        batch.payloads.append(payload)
        batch.hashes.append(digest)
        self._pending_rows += 1
        size = len(batch.seqs)
        if size == 1:
            self._wake.notify()
        elif size >= self.config.max_batch:
            self._seal_open_locked()
            self._wake.notify()
        return Receipt(seq, batch)

    def _seal_open_locked(self) -> CommitBatch:
        batch = self._open_batch
        self._sealed.append(batch)
        self._open_batch = CommitBatch()
        return batch

    # ------------------------------------------------------------------ writer thread

    def _writer_loop(self) -> None:
        flush_s = self.config.flush_ms / 1000.0
        while True:
            with self._mutex:
                while not self._sealed and not len(self._open_batch) and not self._closing:
                    self._wake.wait()
                if not self._sealed and len(self._open_batch) and not self._closing:
                    # let a lone event's companions arrive, but never longer than flush_ms
                    self._wake.wait(flush_s)
                    if not self._sealed and len(self._open_batch):
                        self._seal_open_locked()
                if not self._sealed:
                    if self._closing:
                        return
                    continue
                batch = self._sealed.popleft()
                self._in_flight = batch
            if self._failed is not None:
                batch._resolve(self._failed)
            else:
                try:
                    self._commit_batch(batch)
                except BaseException as exc:  # noqa: BLE001 - whatever it is, the log must stop cleanly
                    self._give_up(batch, exc)
            with self._mutex:
                self._in_flight = None
                self._pending_rows -= len(batch)
                self._room.notify_all()

    def _commit_batch(self, batch: CommitBatch) -> None:
        if self._properties_pending:
            self._apply_table_properties()
        table = pa.Table.from_arrays(
            [
                pa.array(batch.seqs, pa.int64()),
                pa.array(batch.tss, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
                pa.array(batch.tags, pa.string()),
                pa.array(batch.streams, pa.string()),
                pa.array(batch.keys, pa.string()),
                pa.array(batch.payloads, pa.binary()).cast(pa.string()),
                pa.array(batch.vs, pa.int32()),
                pa.array(batch.hashes, pa.string()),
            ],
            schema=EVENTS_SCHEMA,
        )
        self._batch_no += 1
        started = time.perf_counter()
        version = self._write_with_retries(table, self._batch_no)
        self._make_durable(version)
        self.commit_latency_ms.append((time.perf_counter() - started) * 1000)
        self.commits += 1
        batch.last_seq = batch.seqs[-1]
        self.durable_seq = batch.last_seq
        batch._resolve(None)
        for fn in self._commit_listeners:
            try:
                fn(batch.last_seq, batch.hashes[-1], self._known_version)
            except Exception:  # noqa: BLE001 - the commit is durable; a listener must not fail the log
                logger.exception("event log commit listener failed")
        if self._maintenance is not None:
            self._maintenance.note_commit()

    @property
    def _syncs(self) -> bool:
        return self.config.fsync and self._lock_file is not None  # a local data dir (object stores: see durability)

    def _make_durable(self, version: int | None) -> None:
        """fsync the commit before its receipts resolve; an fsync error stops the log (no retry after one).

        Not retried: after a failed fsync the kernel may have dropped the
        dirty pages, so a second fsync that succeeds proves nothing.
        """
        if not self._syncs:
            return
        if version is None:  # found committed after an ambiguous failure: which version is not known
            os.sync()
            assert self._dt is not None
            self._synced_version = self._dt.version()
            return
        sync_commit_files_between(self.uri, self._synced_version, version)  # maintenance's commits before ours
        sync_commit(self.uri, version)
        self._synced_version = version

    def _write_with_retries(self, table: pa.Table, batch_no: int) -> int | None:
        """Commit ``table`` as batch ``batch_no``; the version it got, or None if a retry found it already there."""
        assert self._dt is not None
        failures = 0
        benign_moves = 0
        while True:
            try:
                if self._fault_hook is not None:
                    self._fault_hook(batch_no)
                self._append_table(table, batch_no)
                self._known_version = self._dt.version()
                return self._known_version
            except Exception as exc:
                if self._already_committed(batch_no):
                    logger.warning(
                        "commit of batch {} reported {!r} but it is in the table: not writing it twice", batch_no, exc
                    )
                    self._known_version = self._dt.version()
                    return None
                if isinstance(exc, CommitFailedError) and benign_moves < 1000:
                    mover = self._foreign_writer_since_known()
                    if mover is not None:
                        raise LogFencedError(
                            f"another writer ({mover}) committed to {self.uri}; this writer stops to keep one history"
                        ) from exc
                    benign_moves += 1
                    self._known_version = self._dt.version()
                    continue  # our own maintenance moved the table: retry at once
                failures += 1
                if failures > self.config.commit_retries:
                    raise
                delay = min(self.config.retry_backoff_s * (2 ** (failures - 1)), 2.0)
                logger.warning("commit of batch {} failed ({!r}); retry {} in {:.2f}s", batch_no, exc, failures, delay)
                time.sleep(delay)

    def _append_table(self, table: pa.Table, batch_no: int) -> None:
        """One Delta append commit, as a compare-and-swap, with the batch's app transaction.

        Checkpoints are left to the maintenance thread so no append pays for one.
        """
        assert self._dt is not None
        commit = CommitProperties(
            max_commit_retries=0,
            app_transactions=[Transaction(app_id=self.writer_id, version=batch_no)],
            custom_metadata={WRITER_KEY: self.writer_id},
        )
        hooks = append_hooks(self.config, self._dt)
        if self._fast_append is not None:
            try:
                self._fast_append(table, commit, hooks)
                return
            except (AttributeError, TypeError) as exc:  # the private API moved: use the public one from now on
                logger.warning("fast Delta append unavailable ({!r}); using write_deltalake", exc)
                self._fast_append = None
        write_deltalake(
            self._dt,
            table,
            mode="append",
            writer_properties=_WRITER_PROPERTIES,
            commit_properties=commit,
            post_commithook_properties=hooks,
        )

    def _make_fast_append(self) -> Callable[[pa.Table, CommitProperties, PostCommitHookProperties], None] | None:
        """``write_deltalake`` minus its per-call Python work (schema lookups and conversions).

        Under a busy GIL that wrapper costs several ms per commit, most of the
        writer's latency budget. This calls the same Rust entry point the
        wrapper calls, with the schema converted once. It uses deltalake's
        private API (pinned <2 in pyproject), so any mismatch falls back to
        ``write_deltalake``; ``tests/integration/test_event_log.py`` checks
        that the fast path is the one in use.
        """
        try:
            from arro3.core import RecordBatchReader
            from deltalake.writer._conversion import _convert_arro3_schema_to_delta

            assert self._dt is not None
            raw = self._dt._table
            delta_schema = _convert_arro3_schema_to_delta(
                RecordBatchReader.from_arrow(EVENTS_SCHEMA.empty_table()).schema, self._dt.schema().to_arrow()
            )
        except Exception as exc:  # noqa: BLE001 - any surprise means: use the public API
            logger.info("fast Delta append not available ({!r}); using write_deltalake", exc)
            return None

        def append(table: pa.Table, commit: CommitProperties, hooks: PostCommitHookProperties) -> None:
            raw.write(
                data=RecordBatchReader.from_arrow(table),
                batch_schema=delta_schema,
                partition_by=None,
                mode="append",
                schema_mode=None,
                predicate=None,
                target_file_size=None,
                name=None,
                description=None,
                configuration=None,
                writer_properties=_WRITER_PROPERTIES,
                commit_properties=commit,
                post_commithook_properties=hooks,
            )

        return append

    def _already_committed(self, batch_no: int) -> bool:
        assert self._dt is not None
        try:
            self._dt.update_incremental()
            applied = self._dt.transaction_version(self.writer_id)
        except Exception:  # noqa: BLE001 - unknown: treat as not committed and retry
            return False
        return applied is not None and applied >= batch_no

    def _foreign_writer_since_known(self) -> str | None:
        assert self._dt is not None
        newest = self._dt.version()
        if newest <= self._known_version:
            return None
        for entry in self._dt.history(limit=newest - self._known_version):
            if int(entry.get("version", -1)) > self._known_version and entry.get(WRITER_KEY) != self.writer_id:
                return str(entry.get(WRITER_KEY) or entry.get("engineInfo") or "unknown writer")
        return None

    def _give_up(self, batch: CommitBatch, exc: BaseException) -> None:
        error = exc if isinstance(exc, LogFailedError) else LogFailedError(f"event log commit failed for good: {exc!r}")
        if error is not exc:
            error.__cause__ = exc
        logger.error("event log refuses further appends: {}", error)
        with self._mutex:
            self._failed = error
            pending = [*self._sealed, self._open_batch]
            self._sealed.clear()
            self._open_batch = CommitBatch()
            self._room.notify_all()
        batch._resolve(error)
        for other in pending:
            if len(other):
                other._resolve(error)
        for fn in self._failure_listeners:
            try:
                fn(error)
            except Exception:  # noqa: BLE001
                logger.exception("log failure listener failed")

    # ------------------------------------------------------------------ reads

    def read(self, **filters: Any) -> Iterator[StoredEvent]:
        """Decoded events in seq order; see :func:`storage.reader.read_events` for filters."""
        return read_events(self.uri, storage_options=self.storage_options, **filters)

    def stats(self) -> dict[str, Any]:
        lat = sorted(self.commit_latency_ms)
        return {
            "last_seq": self.last_seq,
            "durable_seq": self.durable_seq,
            "commits": self.commits,
            "commit_ms_p50": lat[len(lat) // 2] if lat else None,
            "commit_ms_max": lat[-1] if lat else None,
            "failed": str(self._failed) if self._failed else None,
            "maintenance": self._maintenance.stats() if self._maintenance else None,
        }
