"""The thread that signs the event log's head: every N events, at start-up and at a clean close.

It hangs off the writer through two extension points of :class:`EventLog`:
a commit listener (told ``(seq, hash, version)`` once a commit is durable;
it only records the head and wakes this thread, so a commit never waits for
a signature) and a close listener (the final checkpoint, taken after the
writer and maintenance have stopped and before the lock is released, so
the file list it signs is the one the next start will find).

What it signs is read back from the table at the commit's Delta version:
the data files (sha256 of each, cached by path because Delta never reuses a
name, or taken from the signed list of files hashed before when a file is
unchanged since: ``storage.file_hashes``), and the ``hash`` column of the rows since the previous checkpoint,
whose last value must be the head the writer computed in memory. Rows that
no running writer vouches for (those before this process opened the log)
are re-hashed from the previous checkpoint first: the signer never signs a
chain it has not seen intact. After each checkpoint of a local log it
replaces that signed list with the files it just signed, so that the next
start need not read them again.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import pyarrow as pa
import pyarrow.compute as pc
from loguru import logger

from storage.checkpoints import (
    Checkpoint,
    CheckpointStore,
    DataFile,
    FileHasher,
    row_prefixes,
    sign_checkpoint,
    table_data_files,
)
from storage.event_log import EventLog
from storage.file_hashes import KnownFile, write_known
from storage.hashing import GENESIS_HASH, row_hash
from storage.reader import open_table, read_batches
from storage.signing import Signer
from storage.tables import is_local

__all__ = ["CheckpointError", "Checkpointer"]

_ROW_COLUMNS = ["seq", "ts", "type", "stream", "key", "v", "payload", "hash"]


class CheckpointError(RuntimeError):
    """The table does not hold what the checkpoint would sign; nothing was signed."""


class Checkpointer:
    """Signs the head of ``log`` every ``every`` events and at close (see the module docstring)."""

    def __init__(
        self,
        log: EventLog,
        signer: Signer,
        *,
        every: int,
        storage_options: dict[str, str] | None = None,
        newest: Checkpoint | None = None,
        known: Mapping[str, KnownFile] | None = None,
        keep_hashes: bool = True,
    ):
        """``newest``: the table's newest checkpoint, when the caller has just read it under the log's lock
        (the start-up check has; read again here otherwise). ``known``: the verified list of files hashed
        before (``storage.file_hashes.load_known``); ``keep_hashes``: write that list after each checkpoint
        (``[audit] hash_cache``; local logs only)."""
        self.log = log
        self.signer = signer
        self.every = every
        self.storage_options = storage_options
        self.store = CheckpointStore(log.data_dir, storage_options)
        self._hasher = FileHasher(log.uri, storage_options, cache=True, known=known)
        self._keep_hashes = keep_hashes and is_local(log.uri)
        self._cond = threading.Condition()
        self._head: tuple[int, str, int] | None = None
        self._stopping = False
        self._backlog = False
        self._thread: threading.Thread | None = None
        #: Why signing stopped for good (the table does not hold what the writer wrote), or None.
        self.stopped_because: str | None = None
        if newest is None:
            newest = self.store.newest()
        self.last_seq, self._last_hash = (newest.seq, newest.statement.hash) if newest else (0, GENESIS_HASH)
        self.written = 0

    def start(self) -> Checkpointer:
        """Listen to the log; sign at once what the log holds past the newest checkpoint (a crash tail, an old log)."""
        self._backlog = self.log.durable_seq > self.last_seq
        self.log.add_commit_listener(self._on_commit)
        self.log.add_close_listener(self._on_close, signs_files=True)
        self._thread = threading.Thread(target=self._loop, name="eventlog-checkpointer", daemon=True)
        self._thread.start()
        return self

    # ---------------------------------------------------------------- listeners (writer thread, closing thread)

    def _on_commit(self, seq: int, head: str, version: int) -> None:
        with self._cond:
            self._head = (seq, head, version)
            if self._due():
                self._cond.notify()

    def _on_close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(60)
        head = self._head
        if self.stopped_because is not None:
            return
        try:
            if self._backlog:
                self._checkpoint(None, "start")
            if head is not None and head[0] > self.last_seq:
                # maintenance has stopped: the newest version holds exactly these rows, and the next start finds its files
                self._checkpoint((head[0], head[1], None), "stop")
        except Exception as exc:  # noqa: BLE001 - the log is durable either way; the next start verifies in full
            logger.error("no signed checkpoint at stop: {}", exc)

    # ---------------------------------------------------------------- the thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._backlog and not self._due():
                    self._cond.wait()
                if self._stopping:
                    return
                backlog, head = self._backlog, self._head
            try:
                if backlog:
                    self._checkpoint(None, "start")
                elif head is not None:
                    self._checkpoint(head, "first" if self.last_seq == 0 else "every")
            except CheckpointError as exc:
                # never sign past rows that do not check out; 'verify' says what is wrong
                self.stopped_because = str(exc)
                logger.error("signed checkpoints stop for this run: {}", exc)
                return
            except Exception as exc:  # noqa: BLE001 - a missed checkpoint costs restart time, never data
                logger.error("signed checkpoint failed: {}", exc)
                with self._cond:
                    self._cond.wait(5.0)  # not in a tight loop; the next commit past the mark tries again

    def _due(self) -> bool:
        """Every ``every`` events; and at once for a log that has none yet, so ``digest`` has a head from the start."""
        if self._head is None:
            return False
        return self._head[0] - self.last_seq >= self.every or self.last_seq == 0

    def _checkpoint(self, head: tuple[int, str, int | None] | None, reason: str) -> None:
        """Sign ``head`` (seq, hash, Delta version; None: the table's newest state, re-hashed)."""
        version = None if head is None else head[2]
        dt = open_table(self.log.uri, self.storage_options, version)
        files = table_data_files(dt)
        seq = max((f[3] for f in files), default=0)
        if seq <= self.last_seq:
            with self._cond:
                self._backlog = False
            return
        if head is not None and seq != head[0]:
            raise CheckpointError(f"Delta version {dt.version()} ends at seq {seq}, the writer committed {head[0]}")
        if head is None:
            hashes = self._rehash(dt, seq)
        else:
            hashes = self._stored_hashes(dt, seq)
            if hashes[-1] != head[1]:
                raise CheckpointError(f"the table's hash at seq {seq} is not the one the writer computed")
        described = self._hasher.describe(files)
        self._hasher.forget_except(f[0] for f in files)
        checkpoint = sign_checkpoint(
            self.signer,
            table_id=dt.metadata().id,
            seq=seq,
            head=hashes[-1],
            delta_version=dt.version(),
            prev_seq=self.last_seq,
            files=described,
            row_hashes=row_prefixes(hashes),
            reason=reason,
        )
        self.store.append(checkpoint)
        if self._keep_hashes:
            self._keep_file_hashes(checkpoint.statement.table_id, seq, described)
        with self._cond:
            self.last_seq, self._last_hash = seq, hashes[-1]
            if head is None:
                self._backlog = False
        self.written += 1
        logger.debug("signed checkpoint at seq {} ({}, {} files)", seq, reason, len(described))

    def _keep_file_hashes(self, table_id: str, seq: int, files: list[DataFile]) -> None:
        """The signed list of these files with their identities when hashed, for the next start (never fails the checkpoint)."""
        entries = []
        for f in files:
            ident = self._hasher.identity_of(f.path)
            if ident is not None and ident[2] == f.size:
                entries.append((f.path, f.size, f.sha256, ident))
        try:
            write_known(self.log.data_dir, self.signer, table_id=table_id, seq=seq, files=entries)
        except OSError as exc:  # a cache: the next start hashes every file instead
            logger.warning("the signed list of file hashes was not written ({}): the next start hashes every file", exc)

    def _stored_hashes(self, dt: object, seq: int) -> list[str]:
        """The ``hash`` column of seq last_seq+1 .. seq, checked to be exactly those rows."""
        hashes: list[str] = []
        expected = self.last_seq + 1
        for batch in read_batches(dt, from_seq=expected, to_seq=seq, columns=["seq", "hash"]):  # type: ignore[arg-type]
            seqs = batch.column("seq")
            if seqs[0].as_py() != expected or seqs[-1].as_py() != expected + batch.num_rows - 1:
                raise CheckpointError(f"seq {expected}.. is not contiguous in the table")
            hashes.extend(batch.column("hash").to_pylist())
            expected += batch.num_rows
        if expected != seq + 1:
            raise CheckpointError(f"the table holds seq up to {expected - 1}, not {seq}")
        return hashes

    def _rehash(self, dt: object, seq: int) -> list[str]:
        """Recompute the chain from the newest checkpoint to ``seq``; the stored hashes must agree."""
        prev, expected = self._last_hash, self.last_seq + 1
        hashes: list[str] = []
        for batch in read_batches(dt, from_seq=expected, to_seq=seq, columns=_ROW_COLUMNS):  # type: ignore[arg-type]
            cols = {name: batch.column(name).to_pylist() for name in _ROW_COLUMNS if name != "ts"}
            tss = pc.cast(batch.column("ts"), pa.int64()).to_pylist()
            for i, row_seq in enumerate(cols["seq"]):
                digest = row_hash(
                    prev, row_seq, tss[i], cols["type"][i], cols["stream"][i], cols["key"][i], cols["v"][i],
                    cols["payload"][i].encode(),
                )
                if row_seq != expected or digest != cols["hash"][i]:
                    raise CheckpointError(f"the hash chain does not hold at seq {expected}: run 'verify'")
                hashes.append(digest)
                prev, expected = digest, expected + 1
        if expected != seq + 1:
            raise CheckpointError(f"the table holds seq up to {expected - 1}, not {seq}")
        return hashes
