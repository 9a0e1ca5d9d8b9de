"""Background maintenance of an append-only table (events, positions): compaction, checkpoints, vacuum.

A log that commits for days accumulates one small file and one JSON log
entry per commit, and commit cost grows with both (DESIGN.md, delta-rs
facts). The writer's appends skip the post-commit checkpoint (it
would stall the commit it runs after); this thread checkpoints every
``checkpoint_interval`` commits instead, compacts small files every
``compact_every_commits`` commits (or ``compact_every_s``), checkpoints right
after, and now and then vacuums the files compaction replaced once they are
older than the retention. Compaction rewrites rows without changing them
(``dataChange=false``) and vacuum only deletes files no version newer than
the retention needs, so maintenance never removes a row.

When it stops (the writer closing cleanly), it checkpoints the table if any
commit came after the newest checkpoint: a runtime restarted often commits
far fewer than ``checkpoint_interval`` times a run, and without this its
table would never be checkpointed, so every open (several per start) would
replay every commit file since the table was made (262 JSON commits: ~0.1 s
an open, against ~0.01 s from a checkpoint).

Its commits are tagged with the writer's id, so the writer recognises them
as its own when its compare-and-swap commit finds the table moved.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from deltalake import DeltaTable
from deltalake.transaction import CommitProperties, PostCommitHookProperties
from loguru import logger

from storage.durability import local_dir, sync_checkpoint, sync_commit
from storage.tables import LogConfig, table_properties

#: Commit metadata key naming the writer; the event log's fencing reads it.
WRITER_KEY = "slotwise.writer"

__all__ = [
    "WRITER_KEY",
    "Maintenance",
    "append_hooks",
    "commits_since_checkpoint",
    "compact",
    "keep_opens_cheap",
    "keep_table_properties",
    "run_maintenance",
]


def append_hooks(config: LogConfig, dt: DeltaTable) -> PostCommitHookProperties:
    """What delta-rs does after an append to ``dt``: checkpoint and log cleanup only if nobody else does.

    With maintenance on, its thread checkpoints and cleans, so the append
    does neither. Left at ``None``, delta-rs would clean expired log files
    after *every* commit: a full listing of ``_delta_log`` per append, and a
    reload of the whole table state whenever a file had just expired.
    Without maintenance the append checkpoints at Delta's interval, and
    cleans only with that checkpoint (cleaning stops below the newest one
    anyway).
    """
    if config.maintenance:
        return PostCommitHookProperties(create_checkpoint=False, cleanup_expired_logs=False)
    committing = dt.version() + 1  # the version this append will most likely get
    due = (committing + 1) % config.checkpoint_interval == 0  # delta-rs's own test for a checkpoint
    return PostCommitHookProperties(create_checkpoint=True, cleanup_expired_logs=due)


def keep_table_properties(dt: DeltaTable, config: LogConfig, writer_id: str) -> dict[str, str]:
    """Bring ``dt``'s retention and checkpoint properties to ``config``; a commit only if they differ.

    Returns what changed. Run at every open, so a changed setting reaches an
    existing table at the next start.
    """
    wanted = table_properties(config)
    current = dt.metadata().configuration
    changed = {k: v for k, v in wanted.items() if current.get(k) != v}
    if changed:
        dt.alter.set_table_properties(changed, commit_properties=CommitProperties(custom_metadata={WRITER_KEY: writer_id}))
    return changed


def run_maintenance(dt: DeltaTable, config: LogConfig, writer_id: str, *, vacuum: bool = False) -> dict[str, Any]:
    """One round: compact, checkpoint, and vacuum if asked. Returns what it did."""
    meta = _maintenance_commit(writer_id)
    started = time.perf_counter()
    metrics = compact(dt, config, writer_id, config.compact_target_mb * 1024 * 1024)
    checkpoint_then_clean(dt, config)
    removed: list[str] = []
    if vacuum:
        removed = dt.vacuum(
            retention_hours=int(config.vacuum_retention_hours),
            dry_run=False,
            enforce_retention_duration=False,
            commit_properties=meta,
        )
    return {
        "files_added": metrics.get("numFilesAdded", 0),
        "files_removed": metrics.get("numFilesRemoved", 0),
        "vacuumed": len(removed),
        "seconds": time.perf_counter() - started,
    }


def _maintenance_commit(writer_id: str) -> CommitProperties:
    # a busy writer commits every few tens of ms, and compaction's commit must find a gap between
    # them: 15 tries (delta-rs's default) lost that race once in a 100k-commit growth run
    return CommitProperties(
        custom_metadata={WRITER_KEY: writer_id, "slotwise.op": "maintenance"}, max_commit_retries=100
    )


def compact(dt: DeltaTable, config: LogConfig, writer_id: str, target_bytes: int) -> dict[str, Any]:
    """Merge the files below ``target_bytes`` (rows unchanged, ``dataChange=false``); durable before it returns."""
    dt.update_incremental()
    before = dt.version()
    metrics: dict[str, Any] = dt.optimize.compact(
        target_size=target_bytes, commit_properties=_maintenance_commit(writer_id)
    )
    table_dir = synced_dir(dt, config)
    if dt.version() != before and table_dir is not None:
        sync_commit(table_dir, dt.version())  # the compacted files, before a checkpoint names them
    return metrics


def synced_dir(dt: DeltaTable, config: LogConfig) -> Path | None:
    """The table's directory where this module must fsync what it wrote (local, ``fsync`` on), else None."""
    return local_dir(dt.table_uri) if config.fsync else None


def checkpoint_then_clean(dt: DeltaTable, config: LogConfig) -> None:
    """Checkpoint, make it durable, then drop commit files past the retention (what keeps commits cheap).

    The order matters on a local disk: cleaning deletes commit files below the
    checkpoint, so the checkpoint must be on disk first, or a power cut could
    keep the deletions and lose the checkpoint (and with it those events).
    """
    dt.create_checkpoint()
    table_dir = synced_dir(dt, config)
    if table_dir is not None:
        sync_checkpoint(table_dir, dt.version())
    dt.cleanup_metadata()


def commits_since_checkpoint(dt: DeltaTable) -> int:
    """How many commits of ``dt`` an open replays as JSON after the newest checkpoint (0 if not known).

    Read from ``_delta_log/_last_checkpoint`` of a local table; for an object
    store 0 (one more request at every open is not worth it there: the
    commits of this run are counted anyway).
    """
    table_dir = local_dir(dt.table_uri)
    if table_dir is None:
        return 0
    try:
        last = int(json.loads((table_dir / "_delta_log" / "_last_checkpoint").read_text())["version"])
    except FileNotFoundError:
        last = -1  # never checkpointed: every commit from version 0
    except (OSError, ValueError, KeyError, TypeError):
        return 0  # unreadable hint: delta-rs lists the log itself; maintenance checkpoints at its interval
    return max(0, dt.version() - last)


#: A table written a commit a row (snapshots, signed checkpoints) is checkpointed every this many commits:
#: every open replays the JSON commits after its newest checkpoint, and delta-rs checkpoints only every 100
#: (the restart benchmark's checkpoints table: 57 commits, ~30 ms an open, opened twice a start).
ROW_TABLE_CHECKPOINT_EVERY = 10


def keep_opens_cheap(dt: DeltaTable) -> None:
    """Checkpoint ``dt`` (local) once an open would replay ROW_TABLE_CHECKPOINT_EVERY commits, and fsync it.

    Only an optimisation: a failure is logged and the table stays as it was (opens replay the commits).
    """
    if commits_since_checkpoint(dt) < ROW_TABLE_CHECKPOINT_EVERY:
        return
    try:
        dt.create_checkpoint()
        table_dir = local_dir(dt.table_uri)
        if table_dir is not None:
            sync_checkpoint(table_dir, dt.version())
    except Exception as exc:  # noqa: BLE001 - see the docstring
        logger.warning("could not checkpoint {}: {!r}", dt.table_uri, exc)


#: At a clean stop, files below this are merged. A run commits a file per batch (a few KB each when it
#: is quiet) and compacts only every ``compact_every_commits`` commits, which a runtime restarted often
#: never reaches: its table kept hundreds of such files, and every start's reads and start-up check
#: paid for each (on the restart benchmark's log, 600 of them cost ~0.15-0.2 s of CPU a start). Far
#: below ``compact_target_mb``, so a stop rewrites at most about this much, never the large files.
STOP_COMPACT_BYTES = 1 << 20


class Maintenance:
    """Runs :func:`run_maintenance` on a schedule, in its own thread, with its own table handle."""

    def __init__(
        self,
        uri: str,
        config: LogConfig,
        writer_id: str,
        storage_options: dict[str, str] | None,
        *,
        table: str = "events",
        pending_commits: int = 0,
    ) -> None:
        """``pending_commits``: commits already in the table past its newest checkpoint (see
        :func:`commits_since_checkpoint`). They count only once the writer has committed in this run:
        before that nothing is written to the table at all, not even a checkpoint (a start whose log the
        start-up check refuses must leave it as it was, and the writer's first commit waits for the verdict).
        """
        self.uri = uri
        self.config = config
        self.writer_id = writer_id
        self.storage_options = storage_options
        self._commits_since = 0
        self._commits_since_checkpoint = pending_commits
        #: commits of this run: none, and this thread writes nothing (see __init__)
        self._run_commits = 0
        self.checkpoints = 0
        self._last_run = time.monotonic()
        self._rounds = 0
        self._wake = threading.Condition()
        self._stopping = False
        self.table = table
        self._thread = threading.Thread(target=self._loop, name=f"{table}-maintenance", daemon=True)
        self.last: dict[str, Any] = {}
        self.errors = 0
        self._dt: DeltaTable | None = None  # the thread's handle, kept for the checkpoint at stop

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0, *, checkpoint: bool = True, merge_small_files: bool = True) -> None:
        """Stop the thread; then, if ``checkpoint``, checkpoint the table if a commit came after its newest checkpoint,
        first merging the run's small files if ``merge_small_files`` (see :data:`STOP_COMPACT_BYTES`).

        Called once the table's writer has stopped committing, so the
        checkpoint is of the newest version and the next open reads it
        instead of the commit files since the last one. A writer that
        failed passes ``checkpoint=False``: it may have been fenced off by
        another writer, and writes nothing more to the table.
        """
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(timeout)
        if not checkpoint or not self._run_commits or self._thread.is_alive() or self._commits_since_checkpoint <= 0:
            return  # nothing committed or to checkpoint, or a round still running owns the table (the next run catches up)
        try:
            dt = self._dt if self._dt is not None else DeltaTable(self.uri, storage_options=self.storage_options)
            if merge_small_files and self._commits_since > 0:
                # this run's commits were never compacted: merge the small files they left (see STOP_COMPACT_BYTES)
                compact(dt, self.config, self.writer_id, STOP_COMPACT_BYTES)
            dt.update_incremental()
            checkpoint_then_clean(dt, self.config)
            self.checkpoints += 1
            self._commits_since_checkpoint = 0
        except Exception as exc:  # noqa: BLE001 - the table is intact; the next open only reads more commit files
            logger.warning("{} table checkpoint at stop failed: {!r}", self.table, exc)

    def note_commit(self) -> None:
        """Called by the writer after each commit (cheap: a counter and maybe a notify)."""
        with self._wake:
            self._run_commits += 1
            self._commits_since += 1
            self._commits_since_checkpoint += 1
            if (
                self._commits_since >= self.config.compact_every_commits
                or self._commits_since_checkpoint >= self.config.checkpoint_interval
            ):
                self._wake.notify()

    def stats(self) -> dict[str, Any]:
        return {"rounds": self._rounds, "checkpoints": self.checkpoints, "errors": self.errors, "last": self.last}

    def _due(self) -> bool:
        if not self._run_commits:
            return False
        if self._commits_since_checkpoint >= self.config.checkpoint_interval:
            return True
        if self._commits_since >= self.config.compact_every_commits:
            return True
        return self._commits_since > 0 and time.monotonic() - self._last_run >= self.config.compact_every_s

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._due():
                    self._wake.wait(timeout=min(self.config.compact_every_s, 5.0))
                if self._stopping:
                    return
                compact = self._commits_since >= self.config.compact_every_commits or (
                    self._commits_since > 0 and time.monotonic() - self._last_run >= self.config.compact_every_s
                )
                if compact:
                    self._commits_since = 0
                self._commits_since_checkpoint = 0
            try:
                if self._dt is None:
                    self._dt = DeltaTable(self.uri, storage_options=self.storage_options)
                dt = self._dt
                if not compact:
                    # the writer's appends skip the post-commit checkpoint; it is taken here instead
                    dt.update_incremental()
                    checkpoint_then_clean(dt, self.config)
                    self.checkpoints += 1
                    continue
                self._last_run = time.monotonic()
                vacuum = (self._rounds + 1) % self.config.vacuum_every_compactions == 0
                self.last = run_maintenance(dt, self.config, self.writer_id, vacuum=vacuum)
                self._rounds += 1
                logger.debug("{} table maintenance: {}", self.table, self.last)
            except Exception as exc:  # noqa: BLE001 - maintenance failing must not stop the log
                self.errors += 1
                self._dt = None
                with self._wake:  # not checkpointed: the stop still owes one
                    self._commits_since_checkpoint = max(self._commits_since_checkpoint, 1)
                logger.warning("{} table maintenance failed (will retry next round): {!r}", self.table, exc)
