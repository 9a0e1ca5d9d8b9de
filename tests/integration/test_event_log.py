"""The Delta event log against a real Delta table: order, chain, group commit, idempotence, fencing, reads."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import DeltaError

from events.queue import ItemEnqueued, ItemSucceeded
from events.registry import LegAdded
from storage.event_log import EventLog, LogClosedError, LogFailedError, LogFencedError
from storage.lock import DataDirLocked
from storage.maintenance import run_maintenance
from storage.reader import read_batches, read_events
from storage.tables import EVENTS_SCHEMA, LogConfig
from storage.verify import verify_log
from tests.conftest import TEST_LOG_CONFIG
from tests.support import wait_until


def enqueued(i: int, conid: int | None = None) -> ItemEnqueued:
    return ItemEnqueued(item_id=i, conid=conid or i, priority=2, enqueued_us=i)


def test_seq_starts_at_one_without_gaps_and_chain_verifies(event_log: EventLog) -> None:
    receipts = [event_log.append(enqueued(i), stream="queue", key=str(i)) for i in range(1, 101)]
    assert [r.seq for r in receipts] == list(range(1, 101))
    receipts[-1].wait(10)
    report = verify_log(event_log.uri)
    assert report.ok, report
    assert report.events == 100


def test_reopen_continues_seq_and_chain(data_dir: Path) -> None:
    with EventLog.open(data_dir, config=TEST_LOG_CONFIG) as log:
        log.append(enqueued(1), stream="queue", key="1").wait(10)
    with EventLog.open(data_dir, config=TEST_LOG_CONFIG) as log:
        assert log.append(enqueued(2), stream="queue", key="2").wait(10) == 2
    assert verify_log(str(data_dir / "events")).ok


def test_group_commit_from_many_threads(event_log: EventLog) -> None:
    per_thread = 5_000
    seqs: list[list[int]] = [[] for _ in range(4)]

    def produce(t: int) -> None:
        receipts = [
            event_log.append(enqueued(t * per_thread + i + 1), stream="queue", key="k") for i in range(per_thread)
        ]
        for r in receipts:
            seqs[t].append(r.wait(30))

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    every = sorted(s for chunk in seqs for s in chunk)
    assert every == list(range(1, 4 * per_thread + 1))
    assert event_log.commits < 4 * per_thread / 10, f"{event_log.commits} commits for {4 * per_thread} events"
    assert verify_log(event_log.uri).ok


def test_receipt_callback_runs_when_durable(event_log: EventLog) -> None:
    seen = threading.Event()
    receipt = event_log.append(enqueued(1), stream="queue", key="1")
    receipt.batch.add_done_callback(lambda batch: seen.set())
    assert seen.wait(10)
    assert receipt.durable


def test_ambiguous_commit_failure_is_not_written_twice(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The commit lands but its answer is lost: the retry must find the batch in the table and not write it again.

    Wraps the writer's one commit call (whichever Delta entry point it uses), so the failure is really injected.
    """
    real_append = EventLog._append_table
    calls = {"n": 0}

    def commit_then_lose_the_answer(self: EventLog, table: pa.Table, batch_no: int) -> None:
        real_append(self, table, batch_no)
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("connection reset after the commit landed")

    monkeypatch.setattr(EventLog, "_append_table", commit_then_lose_the_answer)
    with EventLog.open(data_dir, config=TEST_LOG_CONFIG) as log:
        log.append(enqueued(1), stream="queue", key="1").wait(10)
        log.append(enqueued(2), stream="queue", key="2").wait(10)
    assert calls["n"] >= 1, "the injected failure never ran"
    rows = sum(b.num_rows for b in read_batches(str(data_dir / "events")))
    assert rows == 2
    assert verify_log(str(data_dir / "events")).ok


def test_a_commit_that_keeps_failing_stops_the_log_and_loses_nothing_acknowledged(data_dir: Path) -> None:
    failing = threading.Event()

    def hook(batch_no: int) -> None:
        if failing.is_set():
            raise OSError("disk full")

    config = LogConfig(flush_ms=1, maintenance=False, commit_retries=2, retry_backoff_s=0.01)
    log = EventLog.open(data_dir, config=config, fault_hook=hook)
    failures: list[LogFailedError] = []
    log.add_failure_listener(failures.append)
    acked = [log.append(enqueued(i), stream="queue", key=str(i)).wait(10) for i in range(1, 6)]
    failing.set()
    doomed = log.append(enqueued(6), stream="queue", key="6")
    with pytest.raises(LogFailedError):
        doomed.wait(10)
    with pytest.raises(LogFailedError):
        log.append(enqueued(7), stream="queue", key="7")
    assert failures
    assert "disk full" in repr(failures[0].__cause__)
    log.close()
    with EventLog.open(data_dir, config=TEST_LOG_CONFIG) as reopened:
        assert reopened.last_seq == 5
        assert [e.seq for e in reopened.read()] == acked
    with pytest.raises(LogClosedError):
        log.append(enqueued(8), stream="queue", key="8")


def test_a_second_writer_on_the_table_fences_this_one(event_log: EventLog) -> None:
    event_log.append(enqueued(1), stream="queue", key="1").wait(10)
    write_deltalake(DeltaTable(event_log.uri), _intruder_row(2), mode="append")
    with pytest.raises(LogFencedError):
        event_log.append(enqueued(2), stream="queue", key="2").wait(10)
    with pytest.raises(LogFailedError):
        event_log.append(enqueued(3), stream="queue", key="3")


def _intruder_row(seq: int) -> pa.Table:
    """A row committed by another writer than the log's."""
    row = {"seq": seq, "ts": datetime.now(UTC), "type": "x", "stream": "x", "key": "x", "payload": "{}", "v": 1, "hash": "0"}
    return pa.Table.from_pylist([row], schema=EVENTS_SCHEMA)


def test_second_opener_fails_at_once_naming_the_holder(event_log: EventLog, data_dir: Path) -> None:
    with pytest.raises(DataDirLocked, match=r"pid \d+"):
        EventLog.open(data_dir, config=TEST_LOG_CONFIG)
    code = (
        "import sys; sys.path.insert(0, '.');"
        "from storage.event_log import EventLog; from storage.lock import DataDirLocked\n"
        f"try:\n    EventLog.open({str(data_dir)!r})\nexcept DataDirLocked as e:\n    print(e); sys.exit(3)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 3, proc.stderr
    assert "in use by another Slotwise process" in proc.stdout


def test_reads_filter_by_seq_time_stream_key_type_and_version(event_log: EventLog) -> None:
    event_log.append_many([(enqueued(i, conid=100 + i % 3), "queue", str(100 + i % 3)) for i in range(1, 31)])
    event_log.flush()
    version_after_30 = DeltaTable(event_log.uri).version()
    cut = datetime.now(UTC)
    event_log.append(LegAdded(conid=101, strategy="s"), stream="registry", key="101")
    event_log.append(ItemSucceeded(item_id=1, conid=101), stream="queue", key="101")
    event_log.flush()
    uri = event_log.uri
    assert [e.seq for e in read_events(uri, from_seq=5, to_seq=8)] == [5, 6, 7, 8]
    assert {e.key for e in read_events(uri, keys=["101"])} == {"101"}
    assert len(list(read_events(uri, keys=["101"]))) == 12
    assert [e.type for e in read_events(uri, streams=["registry"])] == ["registry.leg_added"]
    assert [e.seq for e in read_events(uri, types=["queue.item_succeeded"])] == [32]
    assert [e.seq for e in read_events(uri, since=cut)] == [31, 32]
    assert len(list(read_events(uri, until=cut))) == 30
    assert len(list(read_events(uri, version=version_after_30))) == 30
    seqs = [e.seq for e in read_events(uri)]
    assert seqs == sorted(seqs) == list(range(1, 33))


def test_reads_stream_in_arrow_batches(event_log: EventLog) -> None:
    event_log.append_many([(enqueued(i), "queue", str(i)) for i in range(1, 2001)])
    event_log.flush()
    batches = list(read_batches(event_log.uri, batch_rows=500))
    assert all(isinstance(b, pa.RecordBatch) and b.num_rows <= 500 for b in batches)
    assert sum(b.num_rows for b in batches) == 2000


def test_maintenance_never_removes_an_event(data_dir: Path) -> None:
    config = LogConfig(flush_ms=1, maintenance=False, vacuum_retention_hours=0)
    with EventLog.open(data_dir, config=config) as log:
        for i in range(1, 121):
            log.append(enqueued(i), stream="queue", key=str(i)).wait(10)
        uri = log.uri
        before = [e.seq for e in read_events(uri)]
        files_before = len(DeltaTable(uri).file_uris())
        result = run_maintenance(DeltaTable(uri), config, log.writer_id, vacuum=True)
        # the writer keeps appending after maintenance moved the table under it
        log.append(enqueued(121), stream="queue", key="121").wait(10)
    after = [e.seq for e in read_events(uri)]
    assert result["files_removed"] >= 100
    assert result["vacuumed"] >= 100
    assert len(DeltaTable(uri).file_uris()) < files_before
    assert after == [*before, 121]
    assert verify_log(uri).ok


def test_background_maintenance_runs_while_appending(data_dir: Path) -> None:
    config = LogConfig(flush_ms=1, compact_every_commits=20, vacuum_every_compactions=1, vacuum_retention_hours=0)
    with EventLog.open(data_dir, config=config) as log:
        for i in range(1, 201):
            log.append(enqueued(i), stream="queue", key=str(i)).wait(10)
        uri = log.uri
        maintenance = log.stats()["maintenance"]
    assert maintenance["rounds"] >= 1
    assert maintenance["errors"] == 0
    assert [e.seq for e in read_events(uri)] == list(range(1, 201))
    assert verify_log(uri).ok


def test_the_fast_delta_append_path_is_in_use(event_log: EventLog) -> None:
    """The writer calls deltalake's Rust writer directly; an upgrade that breaks it must be noticed."""
    assert event_log._fast_append is not None
    event_log.append(enqueued(1), stream="queue", key="1").wait(10)
    assert event_log._fast_append is not None
    assert DeltaTable(event_log.uri).transaction_version(event_log.writer_id) == 1


def test_old_commit_files_are_cleaned_so_commits_stay_cheap(data_dir: Path) -> None:
    """Each commit lists the log directory: maintenance keeps it short, and never loses an event."""
    config = LogConfig(flush_ms=0, checkpoint_interval=20, compact_every_commits=50, log_retention_minutes=0.01)
    seq = 0

    def commit_one() -> None:
        nonlocal seq
        seq += 1
        log.append(enqueued(seq), stream="queue", key=str(seq)).wait(10)

    def age_commit_files() -> None:
        """Make every commit file so far older than the retention, however fast this machine committed them."""
        past = time.time() - 3600
        for path in (data_dir / "events" / "_delta_log").glob("0*"):  # commits and checkpoints
            with contextlib.suppress(FileNotFoundError):  # cleaned meanwhile
                os.utime(path, (past, past))

    with EventLog.open(data_dir, config=config) as log:
        while seq < 300:
            commit_one()
        before = log.stats()["maintenance"]["checkpoints"]

        def two_rounds_after_aging() -> bool:
            age_commit_files()
            commit_one()
            # the first round counted may have started before this aging; the second one surely did not
            return log.stats()["maintenance"]["checkpoints"] >= before + 2

        wait_until(two_rounds_after_aging, timeout=120, interval=0, what="two checkpoint rounds after aging")
        uri = log.uri
    versions = _commit_versions(data_dir)
    assert before >= 5, f"{before} checkpoints in 300 commits at an interval of 20"
    assert min(versions) > 300, f"commit files from version {min(versions)} kept, though all had expired"
    assert len(versions) < 150, f"{len(versions)} commit files kept for {seq} commits"
    assert DeltaTable(uri).metadata().configuration["delta.logRetentionDuration"] == "interval 1 seconds"
    assert [e.seq for e in read_events(uri)] == list(range(1, seq + 1))
    assert verify_log(uri).ok


def _commit_versions(data_dir: Path) -> set[int]:
    return {int(p.stem) for p in (data_dir / "events" / "_delta_log").iterdir() if p.suffix == ".json"}


def test_appends_leave_log_cleanup_to_maintenance(data_dir: Path) -> None:
    """With maintenance on, an append must not list and clean ``_delta_log`` (delta-rs's default does, per commit)."""
    config = LogConfig(flush_ms=0, checkpoint_interval=10_000, compact_every_commits=10_000, log_retention_minutes=0.01)
    with EventLog.open(data_dir, config=config) as log:
        for i in range(1, 21):
            log.append(enqueued(i), stream="queue", key=str(i)).wait(10)
        DeltaTable(log.uri).create_checkpoint()  # a checkpoint to clean below, as maintenance would leave
        expired = _commit_versions(data_dir)
        time.sleep(1.5)  # let every file so far pass the 1 s retention
        for i in range(21, 41):
            log.append(enqueued(i), stream="queue", key=str(i)).wait(10)
        uri = log.uri
        # before the close, whose checkpoint cleans (test_a_clean_close_leaves_the_table_checkpointed)
        assert expired <= _commit_versions(data_dir), "an append cleaned expired commit files"
    assert [e.seq for e in read_events(uri)] == list(range(1, 41))


def _last_checkpoint(data_dir: Path, table: str = "events") -> int | None:
    """The version of the table's newest Delta checkpoint (None: never checkpointed)."""
    versions = [int(p.name.split(".")[0]) for p in (data_dir / table / "_delta_log").glob("*.checkpoint.parquet")]
    return max(versions, default=None)


#: maintenance on, but no round of its own during these tests: only the checkpoint at stop
_QUIET_MAINTENANCE = LogConfig(flush_ms=0, checkpoint_interval=10_000, compact_every_commits=10_000)


def test_a_clean_close_leaves_the_table_checkpointed(data_dir: Path) -> None:
    """A runtime restarted often commits far fewer times a run than the checkpoint interval: without a
    checkpoint at close its table would never get one, and every open would replay every commit file."""
    with EventLog.open(data_dir, config=_QUIET_MAINTENANCE) as log:
        for i in range(1, 6):
            log.append(enqueued(i), stream="queue", key=str(i)).wait(10)
        assert _last_checkpoint(data_dir) is None
        uri = log.uri
    newest = DeltaTable(uri).version()
    assert _last_checkpoint(data_dir) == newest
    with EventLog.open(data_dir, config=_QUIET_MAINTENANCE):
        pass  # nothing committed: no new checkpoint
    assert _last_checkpoint(data_dir) == newest == DeltaTable(uri).version()
    assert [e.seq for e in read_events(uri)] == list(range(1, 6))


def test_a_clean_close_merges_the_small_files_of_the_run(data_dir: Path) -> None:
    """A run that stops before its compaction is due leaves a file per commit: the close merges them."""
    with EventLog.open(data_dir, config=_QUIET_MAINTENANCE) as log:
        for i in range(1, 31):
            log.append(enqueued(i), stream="queue", key=str(i)).wait(10)
        uri = log.uri
        assert len(DeltaTable(uri).file_uris()) == 30
    assert len(DeltaTable(uri).file_uris()) == 1
    assert _last_checkpoint(data_dir) == DeltaTable(uri).version()  # of the compacted table
    assert [e.seq for e in read_events(uri)] == list(range(1, 31))
    assert verify_log(uri).ok


def test_a_close_that_signs_nothing_keeps_the_files_a_signed_checkpoint_lists(data_dir: Path) -> None:
    """Merged files would send the next signed start to a full verify: without a signer, a signed log keeps them."""
    write_deltalake(str(data_dir / "checkpoints"), pa.table({"seq": [1]}))  # the log was signed before
    with EventLog.open(data_dir, config=_QUIET_MAINTENANCE) as log:
        for i in range(1, 31):
            log.append(enqueued(i), stream="queue", key=str(i)).wait(10)
        uri = log.uri
    assert len(DeltaTable(uri).file_uris()) == 30
    assert _last_checkpoint(data_dir) == DeltaTable(uri).version()  # checkpointed all the same


def test_commits_an_earlier_run_left_uncheckpointed_count_towards_the_interval(data_dir: Path) -> None:
    """A run that crashed never reached its checkpoint at close: the next run's maintenance counts its commits."""
    with EventLog.open(data_dir, config=TEST_LOG_CONFIG) as log:  # no maintenance: nothing checkpoints 12 commits
        for i in range(1, 13):
            log.append(enqueued(i), stream="queue", key=str(i)).wait(10)
    assert _last_checkpoint(data_dir) is None
    with EventLog.open(data_dir, config=LogConfig(flush_ms=0, checkpoint_interval=10, compact_every_commits=10_000)) as log:
        log.append(enqueued(13), stream="queue", key="13").wait(10)  # one commit: the earlier ones make it due
        wait_until(lambda: _last_checkpoint(data_dir) is not None, timeout=30, what="a checkpoint of the earlier commits")


def test_a_run_that_commits_nothing_writes_nothing_to_the_table(data_dir: Path) -> None:
    """A start the start-up check refuses closes the log without a commit: not even a checkpoint may appear."""
    config = LogConfig(flush_ms=0, checkpoint_interval=10, compact_every_commits=10_000)
    with EventLog.open(data_dir, config=msgspec.structs.replace(config, maintenance=False)) as log:
        for i in range(1, 13):
            log.append(enqueued(i), stream="queue", key=str(i)).wait(10)
    delta_log = data_dir / "events" / "_delta_log"
    for path in [*delta_log.glob("*.checkpoint.parquet"), delta_log / "_last_checkpoint"]:
        path.unlink()  # as if no run had checkpointed: 13 commits pending, past the interval of 10
    before = sorted(p.name for p in delta_log.iterdir())
    with EventLog.open(data_dir, config=config) as log:
        maintenance = log._maintenance
        assert maintenance is not None
        assert not maintenance._due()  # what its thread waits on: no round before this run's first commit
    assert sorted(p.name for p in delta_log.iterdir()) == before


def test_a_failed_log_writes_no_checkpoint_at_close(data_dir: Path) -> None:
    """A writer fenced off by another one writes nothing more to the table, not even a checkpoint."""
    with EventLog.open(data_dir, config=_QUIET_MAINTENANCE) as log:
        log.append(enqueued(1), stream="queue", key="1").wait(10)
        write_deltalake(DeltaTable(log.uri), _intruder_row(2), mode="append")
        with pytest.raises(LogFencedError):
            log.append(enqueued(2), stream="queue", key="2").wait(10)
    assert _last_checkpoint(data_dir) is None


def test_without_maintenance_appends_checkpoint_and_clean_at_the_interval(data_dir: Path) -> None:
    """Without the maintenance thread an append cleans only with the checkpoint Delta takes every 10 versions."""
    config = LogConfig(flush_ms=0, maintenance=False, checkpoint_interval=10, log_retention_minutes=0.01)
    with EventLog.open(data_dir, config=config) as log:
        seq = 0

        def commit_one() -> int:
            nonlocal seq
            seq += 1
            log.append(enqueued(seq), stream="queue", key=str(seq)).wait(10)
            assert log._dt is not None
            return log._dt.version()

        while commit_one() < 12:  # a checkpoint at version 9; nothing had expired then
            pass
        time.sleep(1.5)  # versions 0..12 pass the 1 s retention
        before = _commit_versions(data_dir)
        version = commit_one()
        assert (version + 1) % 10 != 0
        assert _commit_versions(data_dir) == before | {version}, "an append that took no checkpoint cleaned"
        while (version + 1) % 10 != 0:
            version = commit_one()
        after = _commit_versions(data_dir)
        uri = log.uri
    # delta-rs keeps everything from the newest checkpoint that precedes the oldest unexpired commit:
    # the one at 9 while 13..18 are younger than 1 s (the usual case), else the one at 19
    assert min(after) in (9, version), "the checkpointing append did not clean the expired commit files"
    checkpoints = sorted(int(p.name.split(".")[0]) for p in (data_dir / "events" / "_delta_log").glob("*.checkpoint.parquet"))
    assert checkpoints[-1] == version
    assert set(checkpoints) <= {9, version}
    assert [e.seq for e in read_events(uri)] == list(range(1, seq + 1))
    assert verify_log(uri).ok


@pytest.mark.parametrize(
    "vanished",
    [
        # what delta-rs 1.6 raised for a reader racing a writer that checkpoints and cleans every commit
        lambda uri: DeltaError(
            "Kernel error: Arrow error: External: Object at location "
            f"{uri}/_delta_log/00000000000000000002.checkpoint.parquet not found: No such file or directory (os error 2)"
        ),
        lambda uri: FileNotFoundError(f"Object at location {uri}/_delta_log/00000000000000000001.json not found"),
    ],
    ids=["kernel-error", "file-not-found"],
)
def test_a_reader_retries_a_log_file_cleaned_under_it(
    event_log: EventLog, monkeypatch: pytest.MonkeyPatch, vanished: Callable[[str], Exception]
) -> None:
    """A CLI reading while the runtime's maintenance deletes expired log files lists again."""
    import storage.reader as reader

    for i in range(1, 4):
        event_log.append(enqueued(i), stream="queue", key=str(i)).wait(10)
    real_init = DeltaTable.__init__
    calls: list[int] = []
    failures = 2

    def vanishing(self: DeltaTable, uri: str, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) <= failures:
            raise vanished(uri)
        real_init(self, uri, *args, **kwargs)

    monkeypatch.setattr(DeltaTable, "__init__", vanishing)
    assert [e.seq for e in read_events(event_log.uri)] == [1, 2, 3]
    assert len(calls) == 3
    calls.clear()
    failures = 3
    with pytest.raises(type(vanished(event_log.uri))):
        reader.open_table(event_log.uri)


def test_a_reader_does_not_retry_other_errors(data_dir: Path) -> None:
    import storage.reader as reader

    with pytest.raises(DeltaError):  # no table at all: fails at once, not after retries
        reader.open_table(str(data_dir / "nothing-here"))
    assert not reader.log_file_vanished(DeltaError("Generic delta kernel error: Expected contiguous commit files"))
