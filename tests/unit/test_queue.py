"""The Queue actor: every rule of DESIGN.md section 4, restart, and QueueState invariants (hypothesis)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pykka
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from actors.messaging import CommandRejected, ask
from actors.queue import QueueActor, QueueState
from actors.queue_state import PENDING
from events.base import Event
from events.queue import (
    NEVER_PRICED_DUE_US,
    Cancel,
    Claim,
    Enqueue,
    EnqueueMany,
    ExpireLeases,
    Fail,
    ItemReleased,
    LiftHolds,
    Priority,
    QueueStats,
    Release,
    Requeue,
    Succeed,
)
from events.registry import ContractActivated
from storage.event_log import EventLog
from storage.snapshots import SnapshotStore
from tests.conftest import TEST_LOG_CONFIG

S = 1_000_000  # one second in microseconds


class Clock:
    """A settable clock in microseconds, read by the actor."""

    def __init__(self, now: int = 1_700_000_000 * S) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def types(log: EventLog) -> list[str]:
    log.flush()
    return [s.type.removeprefix("queue.") for s in log.read(streams=["queue"])]


def start(log: EventLog, clock: Clock, **kwargs: Any) -> pykka.ActorRef[Any]:
    return QueueActor.start(log, clock=clock, **kwargs)


def _replayed(log: EventLog) -> QueueState:
    """The queue's state as recovery rebuilds it: every stored queue event applied in order."""
    log.flush()
    state = QueueState()
    for stored in log.read(streams=["queue"]):
        state.apply(stored.event)
    return state


def test_enqueue_coalesces_and_better_priority_wins(event_log: EventLog) -> None:
    ref = start(event_log, Clock())
    assert ask(ref, Enqueue(conid=5, priority=2)).changed == 1
    same = ask(ref, Enqueue(conid=5, priority=2))
    assert same.changed == 0
    assert same.ignored == {"5": "coalesced into waiting item 1"}
    assert ask(ref, Enqueue(conid=5, priority=1, reason="overflow")).changed == 1
    assert ask(ref, Enqueue(conid=5, priority=2)).changed == 0
    assert types(event_log) == ["item_enqueued", "item_reprioritized"]
    stats = ask(ref, QueueStats())
    assert (stats.pending, stats.by_priority) == (1, {"1": 1})


def test_claim_order_is_staleness_then_priority_then_enqueue_time(event_log: EventLog) -> None:
    """The item furthest past its due time goes first; priority breaks a tie; a backoff holds an item back."""
    clock = Clock()
    ref = start(event_log, clock, backoff_base_s=1.0)
    base = clock.now
    # conid: (priority, due offset in s): 3 is the most overdue, 1 and 2 share a due time (priority decides),
    # 4 is not due for a minute but is still served once the others are (the scheduler never idles lines).
    plan = {1: (2, 10), 2: (1, 10), 3: (2, 5), 4: (2, 60)}
    for conid, (prio, due_s) in plan.items():
        clock.now += 1
        ask(ref, Enqueue(conid=conid, priority=prio, due_us=base + due_s * S))
    first = ask(ref, Claim(n=1)).items[0]
    assert first.conid == 3
    ask(ref, Fail(item_id=first.item_id, error="x"))  # retry after 1 s
    got = [c.conid for c in ask(ref, Claim(n=10)).items]
    assert got == [2, 1, 4]  # conid 3 waits out its backoff
    clock.now += S
    assert [c.conid for c in ask(ref, Claim(n=10)).items] == [3]


def test_a_release_with_a_hold_is_claimed_only_after_it_and_a_restart_keeps_the_hold(event_log: EventLog) -> None:
    """A farm outage's item goes back held (the worker's Release ``hold_s``): the stalest, yet not claimed again
    before the hold ends, while the others are; the log, replayed or snapshotted, holds it back just as long."""
    clock = Clock()
    ref = start(event_log, clock)
    base = clock.now
    ask(ref, Enqueue(conid=1, due_us=base - 60 * S))  # the stalest
    ask(ref, Enqueue(conid=2, due_us=base + 10 * S))
    cut = ask(ref, Claim(n=1)).items[0]
    assert cut.conid == 1
    ack = ask(ref, Release(item_ids=[cut.item_id], reason="interrupted: 2103", leases=[cut.lease_until_us], hold_s=5.0))
    assert ack.changed == 1
    clock.now += 4 * S
    assert [c.conid for c in ask(ref, Claim(n=5)).items] == [2]  # conid 1 is held
    live = ref.proxy().state.get(timeout=5)
    replayed = _replayed(event_log)
    assert replayed.dump() == live.dump()
    released = [s.event for s in event_log.read(streams=["queue"], types=["queue.item_released"])]
    assert [(e.not_before_us, e.detail) for e in released] == [(base + 5 * S, "interrupted: 2103")]
    for state in (replayed, QueueState.load(live.dump())):  # recovered from the log, or from a snapshot
        assert state.take_ready(clock.now, 5) == []
        assert [it.conid for it in state.take_ready(base + 5 * S, 5)] == [1]
    clock.now = base + 5 * S
    assert [c.conid for c in ask(ref, Claim(n=5)).items] == [1]


def test_lifting_holds_makes_held_items_claimable_at_once_and_nothing_else(event_log: EventLog) -> None:
    """IB's "farm OK": the worker names the contracts it holds; their items need not wait out the holds."""
    clock = Clock()
    ref = start(event_log, clock)
    ask(ref, EnqueueMany(items=[Enqueue(conid=c) for c in (1, 2, 3)]))
    claimed = {c.conid: c for c in ask(ref, Claim(n=3)).items}
    for conid in (1, 2):
        cut = claimed[conid]
        ask(ref, Release(item_ids=[cut.item_id], reason="interrupted: 10182", leases=[cut.lease_until_us], hold_s=30.0))
    assert ask(ref, Claim(n=5)).items == []
    ack = ask(ref, LiftHolds(conids=[1, 3, 4]))  # 3 is processing, 4 unknown: nothing held to lift
    assert (ack.changed, ack.ignored) == (1, {"3": "no held item", "4": "no held item"})
    assert [c.conid for c in ask(ref, Claim(n=5)).items] == [1]  # 2 is still held
    live = ref.proxy().state.get(timeout=5)
    replayed = _replayed(event_log)
    assert replayed.dump() == live.dump()
    assert [s.type for s in event_log.read(streams=["queue"], types=["queue.item_hold_lifted"])] == ["queue.item_hold_lifted"]


def test_a_coalesced_enqueue_keeps_the_earlier_due_time_and_idle_only_enqueues_skip_busy_contracts(
    event_log: EventLog,
) -> None:
    clock = Clock()
    ref = start(event_log, clock, max_attempts=1)
    base = clock.now
    ask(ref, Enqueue(conid=1, due_us=base + 50 * S))
    ask(ref, Enqueue(conid=2, due_us=base + 20 * S))
    assert ask(ref, Enqueue(conid=1, due_us=base + 90 * S)).changed == 0  # later: nothing to change
    assert ask(ref, Enqueue(conid=1, due_us=base + 10 * S)).changed == 1  # sooner: moves forward
    assert [c.conid for c in ask(ref, Claim(n=1)).items] == [1]
    # idle-only: absorbed while waiting (2), processing (1) or dead-lettered (3); taken when idle (4)
    ask(ref, Enqueue(conid=3))
    dead = next(c for c in ask(ref, Claim(n=5)).items if c.conid == 3)
    assert ask(ref, Fail(item_id=dead.item_id, error="no subscription", terminal=True)).changed == 1
    sweep = [Enqueue(conid=c, only_if_idle=True) for c in (1, 2, 3, 4)]
    assert [ask(ref, e).changed for e in sweep] == [0, 0, 0, 1]
    stats = ask(ref, QueueStats())
    assert (stats.pending, stats.processing, stats.failed) == (1, 2, 1)


def test_a_terminal_failure_dead_letters_at_once(event_log: EventLog) -> None:
    ref = start(event_log, Clock(), max_attempts=5)
    ask(ref, Enqueue(conid=9))
    item = ask(ref, Claim(n=1)).items[0]
    ask(ref, Fail(item_id=item.item_id, error="354 not subscribed", code=354, terminal=True))
    assert ref.proxy().summary(True).get(timeout=5)["items"][0]["status"] == "FAILED"
    assert types(event_log)[-1] == "item_dead_lettered"


def test_fail_backs_off_exponentially_then_dead_letters_and_requeue_revives(event_log: EventLog) -> None:
    clock = Clock()
    ref = start(event_log, clock, max_attempts=3, backoff_base_s=2.0, backoff_cap_s=3.0)
    ask(ref, Enqueue(conid=8))
    waits = []
    for attempt in (1, 2, 3):
        claimed = ask(ref, Claim(n=5)).items
        assert [(c.conid, c.attempt) for c in claimed] == [(8, attempt)]
        ask(ref, Fail(item_id=claimed[0].item_id, error=f"boom {attempt}", code=354))
        if attempt < 3:
            summary = ref.proxy().summary(True).get(timeout=5)
            assert summary["items"][0]["last_error"] == f"boom {attempt}"
            wait = 0
            while not ask(ref, Claim(n=1, lease_s=0.001)).items:  # not claimable until the backoff passed
                clock.now += S // 2
                wait += S // 2
            waits.append(wait)
            clock.now += 1000  # let that probe lease expire: it returns without counting an attempt
            ask(ref, ExpireLeases())
    assert waits == [2 * S, 3 * S]  # 2 s, then 4 s capped at 3 s
    stats = ask(ref, QueueStats())
    assert (stats.pending, stats.processing, stats.failed) == (0, 0, 1)
    assert "item_dead_lettered" in types(event_log)
    assert ask(ref, Requeue(conid=8)).changed == 1
    again = ask(ref, Claim(n=1)).items
    assert [(c.conid, c.attempt) for c in again] == [(8, 1)]
    assert ask(ref, Requeue(conid=8)).ignored == {"8": "no dead-lettered item"}


def _dead_letter(ref: pykka.ActorRef[Any], conid: int, clock: Clock, *, code: int | None, terminal: bool = False) -> None:
    """Fail ``conid`` until it is a dead letter (max_attempts=2, backoff 1 s; a terminal failure: at once)."""
    ask(ref, Enqueue(conid=conid))
    for _ in range(1 if terminal else 2):
        claimed = ask(ref, Claim(n=1)).items
        assert [c.conid for c in claimed] == [conid]
        ask(ref, Fail(item_id=claimed[0].item_id, error="snapshot ended without prices", code=code, terminal=terminal))
        clock.now += 2 * S
    assert ref.proxy().state.get(timeout=5).dead_letters(conid)


def test_a_dead_letter_that_may_pass_comes_back_after_the_wait_and_a_lasting_one_does_not(event_log: EventLog) -> None:
    """A quiet or closed market answers no data for a while; by morning it has prices again.

    Such a dead letter is requeued ``dead_letter_retry_s`` after it failed for good, so the contract is
    refreshed again without an operator; one IB refused for good (354: no subscription) waits for one.
    """
    clock = Clock()
    ref = start(event_log, clock, max_attempts=2, backoff_base_s=1.0, backoff_cap_s=1.0, dead_letter_retry_s=600)
    _dead_letter(ref, 8, clock, code=None)  # no data
    _dead_letter(ref, 9, clock, code=354, terminal=True)
    clock.now += 590 * S
    assert ask(ref, Claim(n=5)).items == []  # still waiting
    clock.now += 10 * S
    again = ask(ref, Claim(n=5)).items
    assert [(c.conid, c.attempt) for c in again] == [(8, 1)]
    requeued = [s.event for s in event_log.read(streams=["queue"], types=["queue.item_requeued"])]
    assert [(e.conid, e.reason) for e in requeued] == [(8, "dead letter retried after 600 s: snapshot ended without prices")]
    ask(ref, Succeed(item_ids=[again[0].item_id]))
    clock.now += 3600 * S
    assert ask(ref, Claim(n=5)).items == []  # 9 stays a dead letter
    assert ask(ref, QueueStats()).failed == 1


def test_a_dead_letter_failing_again_after_an_operator_requeue_waits_the_whole_time_again(event_log: EventLog) -> None:
    """Waits are kept oldest first; one that starts again goes to the back, and holds none of the others."""
    clock = Clock()
    ref = start(event_log, clock, max_attempts=2, backoff_base_s=1.0, backoff_cap_s=1.0, dead_letter_retry_s=600)
    _dead_letter(ref, 8, clock, code=None)  # t = 4 s
    clock.now += 50 * S
    _dead_letter(ref, 9, clock, code=None)  # t = 58 s
    clock.now += 50 * S
    assert ask(ref, Requeue(conid=8)).changed == 1  # an operator tries 8 again; it fails again
    for _ in range(2):
        claimed = ask(ref, Claim(n=1)).items
        ask(ref, Fail(item_id=claimed[0].item_id, error="snapshot ended without prices"))
        clock.now += 2 * S
    clock.now += 550 * S  # t = 660 s: 9's wait is over, 8's second one is not
    revived = ask(ref, Claim(n=5)).items
    assert [c.conid for c in revived] == [9]
    ask(ref, Succeed(item_ids=[revived[0].item_id]))
    clock.now += 60 * S
    assert [c.conid for c in ask(ref, Claim(n=5)).items] == [8]


def test_only_dead_letters_whose_failures_may_pass_come_back_by_themselves() -> None:
    """Not one IB refused for good, nor one in flight whenever the runtime died (it may be what kills it)."""
    from actors.queue import CRASHED_IN_FLIGHT, _passing
    from actors.queue_state import QueueItem

    def dead(code: int | None, error: str) -> QueueItem:
        item = QueueItem(1, 5, 2, "", 0)
        item.code, item.last_error = code, error
        return item

    assert _passing(dead(None, "snapshot ended without prices"))
    assert _passing(dead(None, "timeout: no complete quote"))
    assert _passing(dead(10182, "data interrupted"))
    assert not _passing(dead(354, "not subscribed"))
    assert not _passing(dead(200, "no security definition"))
    assert not _passing(dead(None, CRASHED_IN_FLIGHT))


def test_dead_letters_found_at_a_start_wait_from_the_start_and_zero_turns_the_retry_off(data_dir: Path) -> None:
    clock = Clock()
    log = EventLog.open(data_dir, config=TEST_LOG_CONFIG)
    try:
        _dead_letter(start(log, clock, max_attempts=2, backoff_base_s=1.0, backoff_cap_s=1.0), 8, clock, code=None)
        pykka.ActorRegistry.stop_all(timeout=10)
        clock.now += 3600 * S  # the runtime was down an hour
        off = start(log, clock, dead_letter_retry_s=0)
        assert ask(off, Claim(n=1)).items == []
        pykka.ActorRegistry.stop_all(timeout=10)
        ref = start(log, clock, dead_letter_retry_s=600)
        assert ask(ref, Claim(n=1)).items == []  # the wait starts at the start, not at the old failure
        clock.now += 600 * S
        assert [c.conid for c in ask(ref, Claim(n=1)).items] == [8]
    finally:
        pykka.ActorRegistry.stop_all(timeout=10)
        log.close()


def test_lease_expiry_returns_items_and_stale_acks_are_ignored(event_log: EventLog) -> None:
    clock = Clock()
    ref = start(event_log, clock)
    ask(ref, EnqueueMany(items=[Enqueue(conid=1), Enqueue(conid=2)]))
    first = ask(ref, Claim(n=2, lease_s=10)).items
    clock.now += 10 * S
    assert ask(ref, ExpireLeases()).changed == 2
    second = ask(ref, Claim(n=1, lease_s=10)).items  # conid 1 again, under a new lease
    assert second[0].item_id == first[0].item_id
    assert second[0].attempt == 1  # a lost lease is not an attempt
    stale = ask(ref, Succeed(item_ids=[first[0].item_id], leases=[first[0].lease_until_us]))
    assert stale.changed == 0
    assert "stale lease" in stale.ignored[str(first[0].item_id)]
    clock.now += 10 * S  # claim expires conid 1's lease by itself before handing out work
    third = ask(ref, Claim(n=5)).items
    assert sorted(c.conid for c in third) == [1, 2]
    ok = ask(ref, Succeed(item_ids=[c.item_id for c in third] + [999]))
    assert ok.changed == 2
    assert ok.ignored == {"999": "unknown item (finished, cancelled or never enqueued)"}
    assert ask(ref, Fail(item_id=third[0].item_id)).ignored  # already done: stale
    assert "item_released" in types(event_log)


def test_release_counts_no_attempt_and_cancel_drops_waiting_and_processing(event_log: EventLog) -> None:
    ref = start(event_log, Clock())
    ask(ref, EnqueueMany(items=[Enqueue(conid=c) for c in (1, 2, 3)]))
    claimed = ask(ref, Claim(n=2)).items
    assert ask(ref, Release(item_ids=[claimed[0].item_id], reason="disconnected")).changed == 1
    assert ask(ref, Claim(n=1)).items[0].attempt == 1
    ask(ref, Enqueue(conid=claimed[1].conid))  # a new waiting item beside the processing one
    assert ask(ref, Cancel(conid=claimed[1].conid)).changed == 2
    assert ask(ref, Cancel(conid=99)).ignored == {"99": "nothing waiting or processing"}
    ref.tell(ContractActivated(conid=3, strategy="s"))  # the registry's event cancels too
    stats = ask(ref, QueueStats())
    assert (stats.pending, stats.processing) == (0, 1)
    released = [s.event for s in event_log.read(streams=["queue"], types=["queue.item_released"])]
    assert isinstance(released[0], ItemReleased)
    assert (released[0].reason, released[0].detail) == ("disconnected", "disconnected")


def test_enqueue_while_processing_keeps_one_waiting_item_not_claimed_concurrently(event_log: EventLog) -> None:
    ref = start(event_log, Clock())
    ask(ref, Enqueue(conid=4, priority=2))
    running = ask(ref, Claim(n=1)).items[0]
    ask(ref, Enqueue(conid=4, priority=2))
    assert ask(ref, Enqueue(conid=4)).changed == 0  # still one waiting item
    assert ask(ref, Claim(n=5)).items == []  # not while the first is processing
    ask(ref, Enqueue(conid=4, priority=1))  # upgrade the waiting one
    assert ask(ref, Release(item_ids=[running.item_id])).changed == 1  # merges into the waiting item
    stats = ask(ref, QueueStats())
    assert (stats.pending, stats.processing) == (1, 0)
    nxt = ask(ref, Claim(n=5)).items
    assert [(c.conid, c.priority) for c in nxt] == [(4, 1)]
    assert nxt[0].item_id != running.item_id


def test_bad_commands_are_refused_and_log_nothing(event_log: EventLog) -> None:
    ref = start(event_log, Clock())
    for command, field in [
        (Enqueue(conid=-1), "conid"),
        (Enqueue(conid=1, priority=0), "priority"),
        (Claim(n=0), "n"),
        (Succeed(item_ids=[1, 2], leases=[5]), "leases"),
        (EnqueueMany(items=[Enqueue(conid=1), Enqueue(conid=0)]), "items[1].conid"),
    ]:
        with pytest.raises(CommandRejected) as info:
            ask(ref, command)
        assert info.value.rejected.field == field
    assert event_log.last_seq == 0


def test_a_clean_stop_returns_processing_items_and_a_restart_rebuilds_the_same_state(data_dir: Path) -> None:
    clock = Clock()
    log = EventLog.open(data_dir, config=TEST_LOG_CONFIG)
    snaps = SnapshotStore(str(data_dir))
    ref = QueueActor.start(log, snaps, clock=clock, snapshot_every=10)
    ask(ref, EnqueueMany(items=[Enqueue(conid=c, priority=1 + c % 2) for c in range(1, 41)]))
    claimed = ask(ref, Claim(n=15)).items
    ask(ref, Succeed(item_ids=[c.item_id for c in claimed[:5]]))
    ask(ref, Fail(item_id=claimed[5].item_id, error="no data"))
    before = ref.proxy().state.get(timeout=5)
    before_dump, in_flight = before.dump(), {it.item_id for it in before.processing_items()}
    assert len(in_flight) == 9
    pykka.ActorRegistry.stop_all(timeout=10)
    log.close()
    log = EventLog.open(data_dir, config=TEST_LOG_CONFIG)
    try:
        replayed = QueueState()
        for stored in log.read(streams=["queue"]):
            replayed.apply(stored.event)
        stopped = QueueState.load(before_dump)  # what the stop did: give the work in flight back, count nothing
        for item in stopped.processing_items():
            stopped.apply(ItemReleased(item_id=item.item_id, conid=item.conid, reason="restart", detail="clean stop"))
        assert replayed.dump() == stopped.dump()  # pure replay: exactly the durable state
        proxy = QueueActor.start(log, snaps, clock=clock).proxy()
        after = proxy.state.get(timeout=10)
        after.check_invariants()
        assert after.dump() == stopped.dump()  # nothing was in flight at the stop: recovery changes nothing
        assert after.processing_items() == []
        assert {i for i in in_flight if after.items[i].status == PENDING} == in_flight
        assert after.summary()["pending"] == 40 - 5 - 0  # 35 waiting: 25 never claimed, 9 back, 1 retrying
        log.flush()
        released = [s.event for s in log.read(streams=["queue"], types=["queue.item_released"])]
        assert {e.item_id for e in released} == in_flight
        assert {e.reason for e in released} == {"restart"}
    finally:
        pykka.ActorRegistry.stop_all(timeout=10)
        log.close()


# ---------------------------------------------------------------------- property test


class _Direct:
    """The QueueActor's decision code without a thread or a log: persist applies and records."""

    def __init__(self, clock: Clock) -> None:
        self.events: list[Event] = []
        self.actor = QueueActor(_NoLog(), clock=clock, max_attempts=3, backoff_base_s=1.0, backoff_cap_s=4.0)  # type: ignore[arg-type]
        self.actor.persist = self._persist  # type: ignore[method-assign]

    def _persist(self, event: Event) -> None:
        self.actor.state.apply(event)
        self.events.append(event)

    def __call__(self, command: Any) -> Any:
        return self.actor.handle_command(command)


class _NoLog:
    pass


CONIDS = st.integers(min_value=1, max_value=6)


class QueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.q = _Direct(self.clock)
        self.leases: dict[int, int] = {}  # item id -> lease handed out (kept after acks, to send stale ones)
        #: The last item claimed was not an active overflow one: a due active overflow item goes next.
        self.top_turn = False

    @property
    def state(self) -> QueueState:
        return self.q.actor.state

    @rule(conid=CONIDS, priority=st.sampled_from([1, 2]), due_s=st.sampled_from([None, -30, 0, 5, 60]))
    def enqueue(self, conid: int, priority: int, due_s: int | None) -> None:
        due_us = 0 if due_s is None else max(1, self.clock.now + due_s * 1_000_000)
        self.q(Enqueue(conid=conid, priority=priority, due_us=due_us))

    @rule(n=st.integers(min_value=1, max_value=4), lease_s=st.sampled_from([1.0, 5.0]))
    def claim(self, n: int, lease_s: float) -> None:
        self.q(ExpireLeases())
        now = self.clock.now
        busy = {it.conid for it in self.state.processing_items()}
        eligible = sorted(  # the claim order: most overdue first, then priority, then enqueue time
            (it.due_us, it.priority, it.enqueued_us, it.item_id)
            for it in self.state.items.values()
            if it.status == PENDING and it.not_before_us <= now and it.conid not in busy
        )
        expected = []
        for _ in range(min(n, len(eligible))):
            # ... except that a due active overflow item goes next after a claim of another priority
            due_top = [key for key in eligible if key[1] == Priority.ACTIVE_OVERFLOW and key[0] <= now]
            key = due_top[0] if self.top_turn and due_top else eligible[0]
            eligible.remove(key)
            expected.append(key[3])
            self.top_turn = key[1] != Priority.ACTIVE_OVERFLOW
        got = self.q(Claim(n=n, lease_s=lease_s)).items
        assert [c.item_id for c in got] == expected
        self.leases.update({c.item_id: c.lease_until_us for c in got})

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), stale=st.booleans())
    def succeed(self, data: st.DataObject, stale: bool) -> None:
        item_id = data.draw(st.sampled_from(sorted(self.leases)))
        lease = self.leases[item_id] - (1 if stale else 0)
        before = self.state.dump()
        ack = self.q(Succeed(item_ids=[item_id], leases=[lease]))
        if ack.ignored:
            assert self.state.dump() == before  # a stale ack changes nothing

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def fail(self, data: st.DataObject) -> None:
        item_id = data.draw(st.sampled_from(sorted(self.leases)))
        self.q(Fail(item_id=item_id, error="e", lease_until_us=self.leases[item_id]))

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        self.q(Release(item_ids=[data.draw(st.sampled_from(sorted(self.leases)))], reason="disconnected"))

    @rule(conid=CONIDS)
    def cancel(self, conid: int) -> None:
        self.q(Cancel(conid=conid))

    @rule(conid=CONIDS)
    def requeue(self, conid: int) -> None:
        self.q(Requeue(conid=conid))

    @rule(seconds=st.sampled_from([0.5, 1, 3, 10]))
    def advance(self, seconds: float) -> None:
        self.clock.now += int(seconds * S)

    @rule()
    def restart(self) -> None:
        """A restart: rebuild from the snapshot (dump) and release what was in flight."""
        state = QueueState.load(self.state.dump())
        assert state.dump() == self.state.dump()
        self.q.actor.state = state
        self.top_turn = False  # the turn is a scheduling habit, not state: a restart begins without it
        self.q.actor.on_recovered()
        assert state.processing_items() == []

    @invariant()
    def indexes_agree_and_one_waiting_item_per_contract(self) -> None:
        self.state.check_invariants()
        waiting = [it.conid for it in self.state.items.values() if it.status == PENDING]
        assert len(waiting) == len(set(waiting))

    @invariant()
    def replay_of_the_log_equals_live_state(self) -> None:
        replayed = QueueState()
        for event in self.q.events:
            replayed.apply(event)
        assert replayed.dump() == self.state.dump()


TestQueueStateMachine = QueueMachine.TestCase
TestQueueStateMachine.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_a_never_priced_item_priced_elsewhere_takes_that_price_s_due_time(event_log: EventLog) -> None:
    """The portfolio floor's price dates a never-priced item, so a contract that is truly overdue goes first."""
    clock = Clock()
    ref = start(event_log, clock)
    base = clock.now
    ask(ref, Enqueue(conid=1, due_us=NEVER_PRICED_DUE_US))  # a monitoring contract, never priced
    ask(ref, Enqueue(conid=2, priority=1, due_us=base + 5 * S))  # an active one without a line, due in 5 s
    assert ask(ref, Enqueue(conid=2, due_us=base + 90 * S, reschedule_never_priced=True)).changed == 0  # priced
    later = Enqueue(conid=1, due_us=base + 60 * S, only_if_idle=True, reschedule_never_priced=True)
    assert ask(ref, later).changed == 1
    assert ask(ref, later).changed == 0  # once dated, the rule no longer applies
    assert [c.conid for c in ask(ref, Claim(n=2)).items] == [2, 1]
    assert types(event_log)[-3] == "item_reprioritized"


def test_a_released_item_merging_into_a_waiting_one_keeps_the_earlier_due_time(event_log: EventLog) -> None:
    clock = Clock()
    ref = start(event_log, clock)
    base = clock.now
    ask(ref, Enqueue(conid=1, due_us=base + 1 * S))
    claimed = ask(ref, Claim(n=1)).items[0]
    ask(ref, Enqueue(conid=1, due_us=base + 90 * S))  # owed again while in flight: a second, later item
    ask(ref, Enqueue(conid=2, due_us=base + 30 * S))
    ask(ref, Release(item_ids=[claimed.item_id], reason="disconnected"))  # merges into the waiting item
    assert [c.conid for c in ask(ref, Claim(n=2)).items] == [1, 2]  # conid 1 is still due at +1 s
