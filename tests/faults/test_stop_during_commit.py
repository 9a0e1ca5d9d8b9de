"""A stop while a commit is in flight, and the commit then fails: nothing acknowledged is lost after restart.

The race this guards: ``EventLog.flush()`` used to return while the writer
was committing a batch outside the lock, so the snapshot an actor writes at
stop could name a seq whose commit then failed. The restarted log hands
that seq out again, and loading the snapshot would skip the new,
acknowledged event at it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pykka
import pytest

from actors.messaging import ask, ask_async
from actors.registry import RegistryActor
from events.registry import AddActive
from storage.event_log import CommitBatch, EventLog
from storage.snapshots import SnapshotStore
from tests.conftest import TEST_LOG_CONFIG


class HeldCommit:
    """A fault hook that holds the next commit until released, then fails it."""

    def __init__(self) -> None:
        self.armed = threading.Event()
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, _batch_no: int) -> None:
        if not self.armed.is_set():
            return
        self.entered.set()
        self.release.wait(30)
        raise OSError("the disk went away under the commit")


@pytest.fixture
def held() -> Iterator[HeldCommit]:
    hook = HeldCommit()
    yield hook
    hook.release.set()


def _active(log: EventLog, snaps: SnapshotStore) -> frozenset[int]:
    ref = RegistryActor.start(log, snaps)
    try:
        return ref.proxy().all_active().get(timeout=10)
    finally:
        ref.stop(timeout=10)


def test_a_snapshot_at_stop_never_names_a_commit_that_failed(
    data_dir: Path, held: HeldCommit, monkeypatch: pytest.MonkeyPatch
) -> None:
    snaps = SnapshotStore(str(data_dir))
    config = TEST_LOG_CONFIG.__class__(flush_ms=1, maintenance=False, commit_retries=0)
    log = EventLog.open(data_dir, config=config, fault_hook=held)
    registry = RegistryActor.start(log, snaps)
    ask(registry, AddActive(conid=1, strategy="s"))  # acknowledged
    held.armed.set()
    doomed = ask_async(registry, AddActive(conid=2, strategy="s"))
    assert held.entered.wait(10), "the commit never started"

    # Release the failing commit once the stop is either waiting for it (the fix) or
    # has already written its snapshot (the race): either way the test goes on at once.
    real_wait, real_save = CommitBatch.wait, snaps.save

    def waiting(batch: CommitBatch, timeout: float | None = None) -> int:
        held.release.set()
        return real_wait(batch, timeout)

    def saving(*args: Any, **kwargs: Any) -> None:
        real_save(*args, **kwargs)
        held.release.set()

    monkeypatch.setattr(CommitBatch, "wait", waiting)
    monkeypatch.setattr(snaps, "save", saving)
    registry.stop(timeout=30)
    monkeypatch.undo()
    log.close()

    log = EventLog.open(data_dir, config=TEST_LOG_CONFIG)
    try:
        assert _active(log, snaps) == {1}  # the unacknowledged add is gone, not resurrected by a snapshot
        registry = RegistryActor.start(log, snaps)
        ask(registry, AddActive(conid=3, strategy="s"))  # acknowledged: takes the seq the failed add had
        registry.stop(timeout=10)
    finally:
        pykka.ActorRegistry.stop_all(timeout=10)
        log.close()
    log = EventLog.open(data_dir, config=TEST_LOG_CONFIG)
    try:
        assert _active(log, snaps) == {1, 3}
    finally:
        log.close()
    with pytest.raises(Exception, match="disk went away"):  # the asker of the lost add was told
        doomed.get(timeout=10)


def test_recovery_ignores_and_discards_a_snapshot_beyond_the_log(data_dir: Path) -> None:
    snaps = SnapshotStore(str(data_dir))
    log = EventLog.open(data_dir, config=TEST_LOG_CONFIG)
    try:
        registry = RegistryActor.start(log, snaps)
        ask(registry, AddActive(conid=1, strategy="s"))
        registry.stop(timeout=10)
    finally:
        log.close()
    good = snaps.latest("registry")
    assert good is not None
    # a snapshot claiming events the log never got (as the race above wrote it)
    stale = RegistryActor.state_type()
    snaps.save("registry", good.seq + 5, stale.dump())
    log = EventLog.open(data_dir, config=TEST_LOG_CONFIG)
    try:
        proxy = RegistryActor.start(log, snaps).proxy()
        assert proxy.all_active().get(timeout=10) == {1}
        assert proxy.recovered_from_seq.get(timeout=10) == good.seq + 1
    finally:
        pykka.ActorRegistry.stop_all(timeout=10)
        log.close()
    assert all(s.seq <= good.seq + 1 for s in snaps.all("registry")), "the stale snapshot was kept"


def _runtime_config(data_dir: Path) -> Any:
    from actors.config import Config, DemoSettings, RuntimeSettings
    from storage.tables import LogConfig

    return Config(
        runtime=RuntimeSettings(data_dir=str(data_dir), max_lines=20, snapshot_every=100),
        log=LogConfig(flush_ms=2.0, maintenance=False),
        demo=DemoSettings(stocks=20, option_strategies=4, active_strategies=2, portfolio_interval_s=0),
    )


def test_a_stale_snapshot_that_cannot_be_discarded_refuses_the_start_before_anything_is_appended(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kept, a snapshot past the log's end looks valid once the log grows past it: no start may grow it.

    Every actor ignores it; the runtime deletes it before the run's first append, and refuses the start
    when it cannot. Before, only the actor that found it refused, while the others and RuntimeStarted
    appended, so repeated refused starts walked the log towards the stale seq.
    """
    from runtime import Runtime, StartRefused
    from storage.reader import read_events

    first = Runtime(_runtime_config(data_dir), demo=True)
    first.start()
    first.stop()
    last = max(s.seq for s in read_events(str(data_dir / "events")))
    snaps = SnapshotStore(str(data_dir))
    good = snaps.latest("queue")
    assert good is not None
    snaps.save("queue", last + 40, good.state, good.v)  # past the log's end (a restored older events table)

    def refuse(self: SnapshotStore, stream: str, seq: int) -> None:
        raise OSError("read-only file system")

    with monkeypatch.context() as patch:
        patch.setattr(SnapshotStore, "discard_after", refuse)
        refused = Runtime(_runtime_config(data_dir), demo=True)
        with pytest.raises(StartRefused, match=r"snapshots of queue past the log's end .* could not be discarded"):
            refused.start()
        refused.stop()
    assert max(s.seq for s in read_events(str(data_dir / "events"))) == last, "a refused start appended"
    again = Runtime(_runtime_config(data_dir), demo=True)
    again.start()  # the next start deletes it and goes on
    again.stop()
    assert last + 40 not in {s.seq for s in SnapshotStore(str(data_dir)).all("queue")}
