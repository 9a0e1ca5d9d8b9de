"""Durable means on disk: no receipt resolves before its commit's files and directories are fsynced.

The sync is observed through :func:`storage.durability.fsync` (the one place
the storage layer calls ``os.fsync``), recorded only once each call has
returned; what each commit needed is read from its commit file independently.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from deltalake import DeltaTable

import storage.durability as durability
from events.queue import ItemEnqueued
from storage.event_log import CommitBatch, EventLog, LogFailedError
from storage.snapshots import SnapshotStore
from storage.tables import LogConfig
from tests.conftest import TEST_LOG_CONFIG
from tests.support import wait_until


def enqueued(i: int) -> ItemEnqueued:
    return ItemEnqueued(item_id=i, conid=i, priority=2, enqueued_us=i)


def needed_by(table: Path, version: int) -> set[Path]:
    """What commit ``version`` needs on disk: its data files, their directory, the commit file and ``_delta_log``."""
    commit = table / "_delta_log" / f"{version:020d}.json"
    added = [
        table / unquote(json.loads(line)["add"]["path"])
        for line in commit.read_text().splitlines()
        if line.strip() and "add" in json.loads(line)
    ]
    return {*added, *(p.parent for p in added), table, commit, commit.parent}


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    done: list[Path] = []
    real = durability.fsync

    def recording(path: str | Path) -> None:
        real(path)
        done.append(Path(path))

    monkeypatch.setattr(durability, "fsync", recording)
    return done


def test_no_receipt_resolves_before_its_commit_is_fsynced(
    data_dir: Path, synced: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    at_resolve: dict[int, set[Path]] = {}
    real_resolve = CommitBatch._resolve

    def noting(batch: CommitBatch, error: BaseException | None) -> None:
        at_resolve[batch.seqs[0]] = set(synced)  # what had been fsynced when the receipts were released
        real_resolve(batch, error)

    monkeypatch.setattr(CommitBatch, "_resolve", noting)
    with EventLog.open(data_dir, config=TEST_LOG_CONFIG) as log:
        for i in range(1, 6):
            assert log.append(enqueued(i), stream="queue", key=str(i)).wait(10) == i
    table = data_dir / "events"
    assert DeltaTable(str(table)).version() == 5  # maintenance off: batch i is version i
    for seq in range(1, 6):
        missing = needed_by(table, seq) - at_resolve[seq]
        assert not missing, f"seq {seq} acknowledged before these were fsynced: {sorted(map(str, missing))}"
    assert needed_by(table, 0) | {data_dir} <= set(synced), "the new table itself was not made durable"


def test_an_fsync_error_fails_the_receipt_and_stops_the_log(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with EventLog.open(data_dir, config=TEST_LOG_CONFIG) as log:
        log.append(enqueued(1), stream="queue", key="1").wait(10)

        def failing(path: str | Path) -> None:
            raise OSError(errno.EIO, "Input/output error", str(path))

        monkeypatch.setattr(durability, "fsync", failing)
        doomed = log.append(enqueued(2), stream="queue", key="2")
        with pytest.raises(LogFailedError, match="Input/output error"):
            doomed.wait(10)
        assert log.durable_seq == 1
        with pytest.raises(LogFailedError):
            log.append(enqueued(3), stream="queue", key="3")


def test_without_fsync_nothing_is_synced(data_dir: Path, synced: list[Path]) -> None:
    """The switch benchmarks use to measure the cost: off really means off."""
    config = LogConfig(flush_ms=2.0, maintenance=False, fsync=False)
    with EventLog.open(data_dir, config=config) as log:
        log.append(enqueued(1), stream="queue", key="1").wait(10)
    assert synced == []


def test_a_snapshot_is_fsynced_before_save_returns(data_dir: Path, synced: list[Path]) -> None:
    store = SnapshotStore(str(data_dir))
    store.save("queue", 1, b"{}")
    store.save("queue", 2, b"{}")
    table = data_dir / "snapshots"
    assert needed_by(table, 0) | needed_by(table, 1) | {data_dir} <= set(synced)


def test_discarding_snapshots_beyond_the_log_is_fsynced(data_dir: Path, synced: list[Path]) -> None:
    """A power cut must not bring back a snapshot recovery discarded: the log may grow past its seq again."""
    store = SnapshotStore(str(data_dir))
    store.save("queue", 1, b"{}")
    store.save("queue", 9, b"{}")
    store.discard_after("queue", 1)
    table = data_dir / "snapshots"
    commit = table / "_delta_log" / f"{DeltaTable(str(table)).version():020d}.json"
    assert commit in synced
    assert store.latest("queue") is not None
    assert store.latest("queue").seq == 1  # type: ignore[union-attr]


def test_close_while_appending_leaves_no_receipt_unresolved(data_dir: Path) -> None:
    """Every append close() let in is committed; every later one is refused: none is left hanging."""
    import threading

    from storage.event_log import LogClosedError

    log = EventLog.open(data_dir, config=TEST_LOG_CONFIG)
    receipts: list[list[Any]] = [[] for _ in range(4)]
    started = threading.Barrier(5)

    def produce(t: int) -> None:
        started.wait()
        i = 0
        while True:
            i += 1
            try:
                receipts[t].append(log.append(enqueued(t * 1_000_000 + i), stream="queue", key="k"))
            except LogClosedError:
                return

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    started.wait()
    wait_until(lambda: sum(map(len, receipts)) >= 2_000, timeout=30, interval=0.001, what="appends to flow")
    log.close()
    for thread in threads:
        thread.join(10)
    every = [r for chunk in receipts for r in chunk]
    hanging = [r.seq for r in every if not r.batch.done]
    assert not hanging, f"{len(hanging)} receipts neither committed nor failed, from seq {hanging[0]}"
    assert all(r.durable for r in every)
    with EventLog.open(data_dir, config=TEST_LOG_CONFIG) as reopened:
        assert [e.seq for e in reopened.read()] == sorted(r.seq for r in every)


def test_a_positions_flush_is_fsynced_before_append_returns(data_dir: Path, synced: list[Path]) -> None:
    from datetime import UTC, datetime

    from storage.positions_table import PositionsTable

    table = PositionsTable(str(data_dir), maintenance=LogConfig(maintenance=False))
    row = {"conid": 1, "symbol": "X", "position": 1.0, "mark": 1.0, "source": "stream", "ts": datetime.now(UTC)}
    table.append(PositionsTable.to_arrow([row]))
    table.close()
    positions = data_dir / "positions"
    version = DeltaTable(str(positions)).version()
    assert needed_by(positions, 0) | needed_by(positions, version) | {data_dir} <= set(synced)


def test_a_checkpoint_is_fsynced_before_older_commit_files_are_cleaned(
    data_dir: Path, synced: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from storage.maintenance import checkpoint_then_clean

    with EventLog.open(data_dir, config=TEST_LOG_CONFIG) as log:
        for i in range(1, 4):
            log.append(enqueued(i), stream="queue", key=str(i)).wait(10)
    table = data_dir / "events"
    at_cleanup: list[set[Path]] = []
    real_cleanup = DeltaTable.cleanup_metadata

    def cleaning(self: DeltaTable, *args: Any, **kwargs: Any) -> None:
        at_cleanup.append(set(synced))
        real_cleanup(self, *args, **kwargs)

    monkeypatch.setattr(DeltaTable, "cleanup_metadata", cleaning)
    dt = DeltaTable(str(table))
    checkpoint_then_clean(dt, LogConfig())
    log_dir = table / "_delta_log"
    checkpoint = log_dir / f"{dt.version():020d}.checkpoint.parquet"
    assert checkpoint.exists()
    assert {checkpoint, log_dir / "_last_checkpoint", log_dir} <= at_cleanup[0]


def test_a_maintenance_commit_between_two_appends_is_synced_before_the_next_ack(
    data_dir: Path, synced: list[Path]
) -> None:
    """An unsynced commit file below an acknowledged one could be empty after a power cut: the table unreadable."""
    from deltalake.transaction import CommitProperties

    from storage.maintenance import WRITER_KEY

    with EventLog.open(data_dir, config=TEST_LOG_CONFIG) as log:
        log.append(enqueued(1), stream="queue", key="1").wait(10)
        maintenance = DeltaTable(log.uri)  # as the maintenance thread's handle: tagged with this writer's id
        maintenance.alter.set_table_properties(
            {"delta.checkpointInterval": "77"}, commit_properties=CommitProperties(custom_metadata={WRITER_KEY: log.writer_id})
        )
        between = maintenance.version()
        synced.clear()
        log.append(enqueued(2), stream="queue", key="2").wait(10)
    assert data_dir / "events" / "_delta_log" / f"{between:020d}.json" in synced


def test_a_positions_flush_syncs_the_commits_since_the_last_one(data_dir: Path, synced: list[Path]) -> None:
    from datetime import UTC, datetime

    from storage.positions_table import PositionsTable

    table = PositionsTable(str(data_dir), maintenance=LogConfig(maintenance=False))
    row = {"conid": 1, "symbol": "X", "position": 1.0, "mark": 1.0, "source": "stream", "ts": datetime.now(UTC)}
    table.append(PositionsTable.to_arrow([row]))
    table.append(PositionsTable.to_arrow([row]))
    other = DeltaTable(table.uri)  # a commit that is not a flush: maintenance's compaction, as from its thread
    other.optimize.compact()
    assert other.version() == 3
    synced.clear()
    table.append(PositionsTable.to_arrow([row]))
    table.close()
    assert data_dir / "positions" / "_delta_log" / f"{other.version():020d}.json" in synced


def test_a_table_written_a_row_a_commit_is_checkpointed_so_opens_stay_cheap(data_dir: Path, synced: list[Path]) -> None:
    """Every start opens the snapshots and checkpoints tables, and an open replays each commit since the
    newest Delta checkpoint: delta-rs makes one only every 100 commits, so they get one every 10, fsynced."""
    from storage.maintenance import ROW_TABLE_CHECKPOINT_EVERY, commits_since_checkpoint

    store = SnapshotStore(str(data_dir))
    for seq in range(1, 3 * ROW_TABLE_CHECKPOINT_EVERY + 2):
        store.save("queue", seq, b"{}")
        assert commits_since_checkpoint(DeltaTable(store.uri)) < ROW_TABLE_CHECKPOINT_EVERY
    log_dir = Path(store.uri) / "_delta_log"
    checkpoints = sorted(log_dir.glob("*.checkpoint.parquet"))
    assert len(checkpoints) == 3
    assert set(checkpoints) <= set(synced)  # on disk before an open relies on it
    assert max(s.seq for s in store.all("queue")) == 3 * ROW_TABLE_CHECKPOINT_EVERY + 1  # and nothing lost
