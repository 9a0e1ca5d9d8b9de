"""The QueueWorker with a real queue on a real log and the fake IB.

Cycles are started by asking ``Poll`` (``timer=False``), so each test decides
exactly when the worker claims; a cycle is over when the worker reports
itself not busy. Outcomes are read where they are stored: the queue's events
in the log, the fake IB's counters, and the handler inbox.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from actors.fake_ib import FakeIbActor, FakeIbSettings, SetNeverAnswer, SetSnapshotLatency, demo_positions
from actors.handlers import HandlerSet
from actors.messaging import ask
from actors.queue import QueueActor
from actors.worker import Poll, QueueWorker, WorkerSettings, WorkerStatus, WorkerStatusReply
from events.ib import (
    Connect,
    ConnectionState,
    ConnectionStateChanged,
    Disconnect,
    IbStats,
    IbStatsReply,
    MarketUpdate,
)
from events.queue import Enqueue, EnqueueMany, QueueStats, QueueStatsReply
from storage.event_log import EventLog
from storage.reader import StoredEvent
from tests.support import Inbox, wait_until

POSITIONS = demo_positions(30, 6, seed=7)
CONIDS = [p.conid for p in POSITIONS]


class Rig:
    """Queue + fake IB + one worker whose handlers feed ``inbox``."""

    def __init__(self, log: EventLog, *, timer: bool = False, **worker: Any) -> None:
        self.log = log
        self.inbox = Inbox.start()
        assert self.inbox.ref is not None
        self.queue = QueueActor.start(log, max_attempts=3, backoff_base_s=0.05, backoff_cap_s=0.1)
        self.ib = FakeIbActor.start(FakeIbSettings(positions=POSITIONS, line_limit=100), [self.inbox.ref])
        settings = {"poll_interval_s": 5.0, "batch_size": 50, "snapshot_reserve": 3, "snapshot_timeout_s": 2.0}
        settings.update(worker)
        self.settings = WorkerSettings(**settings)
        self.worker = QueueWorker.start(
            self.settings, queue=self.queue, ib=self.ib, handlers=HandlerSet([self.inbox.ref]), timer=timer
        )
        from actors.ib_base import AddSubscriber

        self.ib.tell(AddSubscriber(self.worker))
        self.ib.tell(Connect())
        self.inbox.wait_for(is_state(ConnectionState.CONNECTED))
        wait_until(lambda: self.status().connected, timeout=5)

    def enqueue(self, conids: list[int]) -> None:
        ask(self.queue, EnqueueMany(items=[Enqueue(conid=c, reason="test") for c in conids]))

    def status(self) -> WorkerStatusReply:
        return ask(self.worker, WorkerStatus(), timeout=5)

    def poll(self) -> WorkerStatusReply:
        """One cycle, started now; returns the worker's status once the cycle has finished."""
        ask(self.worker, Poll(), timeout=5)
        wait_until(lambda: not self.status().busy, timeout=10)
        return self.status()

    def queue_stats(self) -> QueueStatsReply:
        return ask(self.queue, QueueStats(), timeout=5)

    def ib_stats(self) -> IbStatsReply:
        return ask(self.ib, IbStats(), timeout=5)

    def queue_events(self, type_: str | None = None) -> list[StoredEvent]:
        self.log.flush()
        events = list(self.log.read(streams=["queue"]))
        return [e for e in events if type_ is None or e.type == f"queue.{type_}"]


def is_state(state: ConnectionState) -> Any:
    return lambda m: isinstance(m, ConnectionStateChanged) and m.state == state


@pytest.fixture
def rig_factory(log_factory: Callable[[], EventLog]) -> Callable[..., Rig]:
    return lambda **kwargs: Rig(log_factory(), **kwargs)


def test_one_cycle_claims_at_most_batch_size_publishes_and_succeeds(rig_factory: Any) -> None:
    rig = rig_factory(batch_size=4)
    rig.enqueue(CONIDS[:10])
    status = rig.poll()
    assert status.cycles == 1
    assert status.succeeded == 4
    assert status.updates_published == 4
    assert rig.queue_stats().pending == 6
    updates = rig.inbox.messages(MarketUpdate)
    assert len(updates) == 4
    assert {u.source for u in updates} == {"queue"}
    succeeded = {e.event.conid for e in rig.queue_events("item_succeeded")}  # type: ignore[attr-defined]
    assert succeeded == {u.conid for u in updates}
    rig.poll()
    rig.poll()
    status = rig.poll()
    assert status.succeeded == 10
    assert rig.queue_stats().pending == 0
    assert rig.poll().cycles == 5  # an empty queue is a cycle that claims nothing


def test_the_timer_polls_at_the_configured_interval(rig_factory: Any) -> None:
    rig = rig_factory(timer=True, poll_interval_s=0.1)
    started = time.monotonic()
    wait_until(lambda: rig.status().cycles >= 3, timeout=5)
    elapsed = time.monotonic() - started
    assert elapsed >= 0.25, f"3 cycles after {elapsed:.3f}s: faster than the 0.1s interval"
    assert rig.status().cycles <= 3 + int((time.monotonic() - started) / 0.1)


def test_snapshots_stay_within_the_reserve(rig_factory: Any) -> None:
    rig = rig_factory(batch_size=30, snapshot_reserve=3)
    rig.ib.tell(SetSnapshotLatency(seconds=0.01))  # snapshots hold their line for a while
    rig.enqueue(CONIDS[:30])
    status = rig.poll()
    assert status.succeeded == 30
    stats = rig.ib_stats()
    assert stats.streams == 0
    assert 1 <= stats.peak_lines <= 3


def test_failures_retry_with_backoff_then_dead_letter(rig_factory: Any) -> None:
    rig = rig_factory()
    unknown = 777  # the fake answers 200 (no contract) for a conid it does not hold
    rig.enqueue([unknown, CONIDS[0]])

    def dead() -> bool:
        rig.poll()
        return rig.queue_stats().failed == 1

    wait_until(dead, timeout=10)
    wait_until(lambda: len(rig.queue_events("item_retry_scheduled")) == 2, timeout=5)
    retries = rig.queue_events("item_retry_scheduled")
    assert len(retries) == 2
    assert {e.event.conid for e in retries} == {unknown}
    assert all(e.event.error.startswith("no_contract") and e.event.code == 200 for e in retries)  # type: ignore[attr-defined]
    # each retry waits longer than the one before (exponential backoff)
    delays = [e.event.not_before_us - e.ts_us for e in retries]  # type: ignore[attr-defined]
    assert delays[0] > 30_000
    assert delays[1] > delays[0] + 30_000
    (dead_letter,) = rig.queue_events("item_dead_lettered")
    assert dead_letter.event.conid == unknown  # type: ignore[attr-defined]
    claims = [e for e in rig.queue_events("item_claimed") if e.event.conid == unknown]  # type: ignore[attr-defined]
    assert len(claims) == 3  # max_attempts
    assert rig.status().failed == 3


def test_a_snapshot_that_times_out_fails_with_kind_timeout(rig_factory: Any) -> None:
    rig = rig_factory(snapshot_timeout_s=0.1)
    rig.ib.tell(SetNeverAnswer(conid=CONIDS[1]))
    rig.enqueue(CONIDS[:3])
    status = rig.poll()
    assert status.succeeded == 2
    assert status.failed == 1
    wait_until(lambda: len(rig.queue_events("item_retry_scheduled")) == 1, timeout=5)
    (retry,) = rig.queue_events("item_retry_scheduled")
    assert retry.event.conid == CONIDS[1]
    assert retry.event.error.startswith("timeout")
    assert rig.ib_stats().snapshots_in_flight == 0  # the timed-out snapshot gave its line back


def test_disconnect_releases_claimed_items_without_an_attempt_and_claims_nothing(rig_factory: Any) -> None:
    rig = rig_factory(batch_size=10)
    rig.ib.tell(SetSnapshotLatency(seconds=30))  # the batch is in flight when IB goes away
    rig.enqueue(CONIDS[:10])
    ask(rig.worker, Poll())
    wait_until(lambda: rig.ib_stats().snapshots_in_flight > 0, timeout=5)
    rig.ib.tell(Disconnect())
    wait_until(lambda: not rig.status().busy, timeout=5)
    assert not rig.status().connected
    stats = rig.queue_stats()
    assert (stats.pending, stats.processing) == (10, 0)
    released = rig.queue_events("item_released")
    assert len(released) == 10
    assert {e.event.reason for e in released} == {"disconnected"}
    assert rig.status().failed == 0
    assert not rig.queue_events("item_retry_scheduled")
    # while disconnected a Poll claims nothing
    before = len(rig.queue_events("item_claimed"))
    status = rig.poll()
    assert status.cycles == 1
    assert len(rig.queue_events("item_claimed")) == before
    # back up: served, and the first attempt was never counted
    rig.ib.tell(SetSnapshotLatency(seconds=0))
    rig.ib.tell(Connect())
    wait_until(lambda: rig.status().connected, timeout=5)
    assert rig.poll().succeeded == 10
    assert {e.event.attempt for e in rig.queue_events("item_claimed")} == {1}  # type: ignore[attr-defined]


def test_a_poll_while_busy_does_not_start_a_second_cycle(rig_factory: Any) -> None:
    rig = rig_factory(batch_size=5)
    rig.ib.tell(SetSnapshotLatency(seconds=0.2))
    rig.enqueue(CONIDS[:10])
    first = ask(rig.worker, Poll())
    second = ask(rig.worker, Poll())
    assert first.busy
    assert second.busy
    assert second.cycles == 1
    wait_until(lambda: not rig.status().busy, timeout=5)
    assert rig.status().succeeded == 5
