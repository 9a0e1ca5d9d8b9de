"""The event-sourced actor base: recovery, persist-before-effect, no commit wait per command."""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec
import pytest

from actors.base import EventSourcedActor
from actors.messaging import ask, ask_async, reject
from events.base import Command, Event, Reply
from storage.event_log import EventLog
from storage.snapshots import SnapshotStore
from tests.conftest import TEST_LOG_CONFIG


class Bump(Command, tag="test.bump", frozen=True, kw_only=True):
    by: int


class Bumped(Event, tag="test.bumped", frozen=True, kw_only=True):
    by: int


class Total(Reply, tag="test.total", frozen=True, kw_only=True):
    total: int
    durable_seq: int


class CounterState:
    def __init__(self) -> None:
        self.total = 0

    def apply(self, event: Event) -> None:
        assert isinstance(event, Bumped)
        self.total += event.by

    def dump(self) -> bytes:
        return msgspec.json.encode({"total": self.total})

    @classmethod
    def load(cls, data: bytes) -> CounterState:
        state = cls()
        state.total = msgspec.json.decode(data)["total"]
        return state


class Counter(EventSourcedActor[CounterState]):
    stream: ClassVar[str] = "counter"
    state_type: ClassVar[type[Any]] = CounterState

    def handle_command(self, command: Any) -> Any:
        if command.by == 0:
            raise reject(command, "invalid", "by must not be 0", field="by")
        self.persist(Bumped(by=command.by))
        seq = self.last_seq
        return _LazyTotal(self, seq)


class _LazyTotal:
    """Reply evaluated when released, to observe what was durable at that moment."""

    def __init__(self, actor: Counter, seq: int) -> None:
        self.actor, self.seq = actor, seq


def test_reply_only_after_event_is_durable(event_log: EventLog) -> None:
    ref = Counter.start(event_log)
    reply = ask(ref, Bump(by=3))
    assert event_log.durable_seq >= reply.seq


def test_bad_command_is_rejected_and_logs_nothing(event_log: EventLog) -> None:
    from actors.messaging import CommandRejected

    ref = Counter.start(event_log)
    with pytest.raises(CommandRejected) as info:
        ask(ref, Bump(by=0))
    assert info.value.rejected.field == "by"
    assert event_log.last_seq == 0


def test_ten_thousand_commands_share_few_commits(event_log: EventLog) -> None:
    ref = Counter.start(event_log)
    futures = [ask_async(ref, Bump(by=1)) for _ in range(10_000)]
    for future in futures:
        future.get(timeout=60)
    assert event_log.durable_seq == 10_000
    assert event_log.commits < 1_000, event_log.commits


def test_recovery_from_snapshot_and_replay(data_dir: Any) -> None:
    log = EventLog.open(data_dir, config=TEST_LOG_CONFIG)
    snaps = SnapshotStore(str(data_dir))
    ref = Counter.start(log, snaps, snapshot_every=7)
    for i in range(1, 31):
        ask(ref, Bump(by=i))
    ref.stop()
    log.close()
    log = EventLog.open(data_dir, config=TEST_LOG_CONFIG)
    try:
        proxy = Counter.start(log, snaps).proxy()
        assert proxy.state.get().total == sum(range(1, 31))
        assert proxy.recovered_from_seq.get() == 31  # clean stop wrote a final snapshot
        # without snapshots the same state comes from replay alone
        proxy2 = Counter.start(log, None).proxy()
        assert proxy2.state.get().total == sum(range(1, 31))
        assert proxy2.recovered_events.get() == 30
    finally:
        pykka_stop_all()
        log.close()


def pykka_stop_all() -> None:
    import pykka

    pykka.ActorRegistry.stop_all()


class Announcing(Counter):
    def handle_command(self, command: Any) -> Any:
        self.persist(Bumped(by=command.by))
        self.announce("WARNING", "bumped by {}", command.by)
        return None


def test_announcements_wait_for_durability(data_dir: Any) -> None:
    import threading

    from loguru import logger

    gate = threading.Event()
    log = EventLog.open(data_dir, config=TEST_LOG_CONFIG, fault_hook=lambda _batch: gate.wait(10))
    lines: list[str] = []
    seen = threading.Event()
    sink = logger.add(
        lambda m: (lines.append(m.record["message"]), seen.set()),
        level="WARNING",
        filter=lambda r: "bumped" in r["message"],
    )
    try:
        reply = ask_async(Announcing.start(log), Bump(by=7))
        assert not seen.wait(0.3)  # the commit is held: nothing may be announced yet
        assert lines == []
        gate.set()
        reply.get(timeout=10)
        assert seen.wait(10)
        assert lines == ["bumped by 7"]
    finally:
        gate.set()
        logger.remove(sink)
        pykka_stop_all()
        log.close()


class CappedState(CounterState):
    """Refuses a total over 100, after changing part of itself (as a real ``apply`` might)."""

    def apply(self, event: Event) -> None:
        super().apply(event)
        if self.total > 100:
            raise ValueError(f"total {self.total} over 100")


class Capped(Counter):
    stream: ClassVar[str] = "capped"
    state_type: ClassVar[type[Any]] = CappedState


def test_an_event_apply_refuses_is_rejected_not_stored_and_changes_nothing(event_log: EventLog) -> None:
    from actors.messaging import CommandRejected

    ref = Capped.start(event_log)
    ask(ref, Bump(by=60))
    with pytest.raises(CommandRejected) as info:
        ask(ref, Bump(by=50))
    assert info.value.rejected.code == "inapplicable"
    assert "over 100" in info.value.rejected.message
    assert event_log.last_seq == 1, "the refused event was appended"
    assert ref.proxy().state.get(timeout=10).total == 60
    ask(ref, Bump(by=40))
    assert ref.proxy().state.get(timeout=10).total == 100
    ref.stop()
    assert Capped.start(event_log).proxy().state.get(timeout=10).total == 100  # recovery is not poisoned


def test_recovery_stops_at_an_event_it_cannot_apply_and_names_its_seq(event_log: EventLog) -> None:
    from actors.base import RecoveryError

    event_log.append(Bumped(by=60), stream="capped", key="capped")
    event_log.append(Bumped(by=70), stream="capped", key="capped")  # stored by some older, laxer code
    event_log.append(Bumped(by=1), stream="capped", key="capped")
    event_log.flush()
    with pytest.raises(RecoveryError, match=r"capped cannot recover: event seq 2 \(test.bumped\)"):
        Capped(event_log).recover()


def test_rebuilding_after_a_refused_event_keeps_the_snapshots_this_run_wrote(data_dir: Any) -> None:
    """This run's snapshots lie past the log's end at open, and are valid: the rebuild starts from them.

    (The log's end at open is what a start compares with; in the middle of a run everything flushed is
    durable, and calling this run's snapshots stale discarded every one of them.)
    """
    from tests.support import wait_until

    log = EventLog.open(data_dir, config=TEST_LOG_CONFIG)
    snaps = SnapshotStore(str(data_dir))
    try:
        ref = Capped.start(log, snaps, snapshot_every=5)
        for _ in range(10):
            ask(ref, Bump(by=1))
        wait_until(lambda: len(list(snaps.all("capped"))) == 2, timeout=10, what="two snapshots (written off the actor's thread)")
        written = sorted(s.seq for s in snaps.all("capped"))
        assert written == [5, 10]
        from actors.messaging import CommandRejected

        with pytest.raises(CommandRejected):
            ask(ref, Bump(by=95))  # 105: refused, state rebuilt from the log
        proxy = ref.proxy()
        assert proxy.state.get(timeout=10).total == 10
        assert proxy.recovered_from_seq.get(timeout=10) == 11  # from the snapshot at seq 10, not a full replay
        assert sorted(s.seq for s in snaps.all("capped")) == written
    finally:
        pykka_stop_all()
        log.close()


class _FailingDiscard(SnapshotStore):
    def discard_after(self, stream: str, seq: int) -> None:
        raise OSError("read-only file system")


def test_a_stale_snapshot_that_cannot_be_discarded_refuses_the_start_and_nothing_is_appended(data_dir: Any) -> None:
    """Kept, it would look valid once the log grew past its seq: the actor must not let the log grow."""
    from actors.base import StaleSnapshotsKept

    log = EventLog.open(data_dir, config=TEST_LOG_CONFIG)
    try:
        ask(Counter.start(log), Bump(by=1))
        pykka_stop_all()
        SnapshotStore(str(data_dir)).save("counter", 7, msgspec.json.encode({"total": 99}))  # past seq 1
    finally:
        log.close()
    log = EventLog.open(data_dir, config=TEST_LOG_CONFIG)
    try:
        ref = Counter.start(log, _FailingDiscard(str(data_dir)))
        error = ref.proxy().recovery_error.get(timeout=10)
        assert isinstance(error, StaleSnapshotsKept)
        assert "past seq 1" in str(error)
        assert "read-only file system" in str(error)
        with pytest.raises(StaleSnapshotsKept):  # every request is refused with the reason
            ask(ref, Bump(by=1))
        pykka_stop_all()
        assert log.last_seq == 1, "the refused actor appended"
    finally:
        log.close()
    assert [s.seq for s in SnapshotStore(str(data_dir)).all("counter")] == [7]  # the next start tries again
