"""The QueueWorker with a real queue on a real log, the fake IB, and a stub of the router's line ledger.

The worker runs continuously (no poll timer): it borrows lines from the
ledger, claims that many items and snapshots them one request each. The
ledger stub lends at most ``lines`` lines at once and records what the
worker reports back, so a test can see that every lent line returns and how
each snapshot ended. Its clock is a test clock, so the message budget is
checked by moving time, not by measuring it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pykka
import pytest

from actors.fake_ib import (
    FakeIbActor,
    FakeIbSettings,
    InjectFarmBlip,
    InjectFarmOk,
    SetNeverAnswer,
    SetSnapshotLatency,
    demo_positions,
)
from actors.handlers import HandlerSet
from actors.messaging import Request, ask
from actors.queue import QueueActor
from actors.worker import QueueWorker, TokenBucket, Wake, WorkerSettings, WorkerStatus, WorkerStatusReply
from events.ib import (
    Connect,
    ConnectionState,
    ConnectionStateChanged,
    Disconnect,
    IbError,
    IbErrorKind,
    IbStats,
    IbStatsReply,
    MarketUpdate,
    SnapshotFailed,
    SnapshotResult,
)
from events.queue import (
    Claim,
    Claimed,
    ClaimedItem,
    Enqueue,
    EnqueueMany,
    LiftHolds,
    QueueStats,
    QueueStatsReply,
    Release,
)
from events.router import AcquireLines, LineGrant, LinesGranted, ReleaseLines, SnapshotDone
from storage.event_log import EventLog
from storage.reader import StoredEvent
from tests.support import Inbox, wait_until

POSITIONS = demo_positions(30, 6, seed=7)
CONIDS = [p.conid for p in POSITIONS]


class LedgerStub(pykka.ThreadingActor):
    """Lends at most ``lines`` lines at once; records SnapshotDone reports."""

    def __init__(self, lines: int) -> None:
        super().__init__()
        self.lines = lines
        self.lent: set[int] = set()
        self.next_id = 1
        self.peak = 0
        self.done: list[SnapshotDone] = []

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Request) and isinstance(message.command, AcquireLines):
            n = max(0, min(message.command.n, self.lines - len(self.lent)))
            grants = [LineGrant(line_id=self.next_id + i, level=len(self.lent) + i + 1) for i in range(n)]
            self.next_id += n
            self.lent.update(g.line_id for g in grants)
            self.peak = max(self.peak, len(self.lent))
            message.reply.set(LinesGranted(lines=grants, limit=self.lines, lines_held=len(self.lent)))
        elif isinstance(message, ReleaseLines):
            self.lent.difference_update(message.line_ids)
        elif isinstance(message, SnapshotDone):
            assert message.line_id in self.lent, f"line {message.line_id} reported twice or never lent"
            self.lent.discard(message.line_id)
            self.done.append(message)
        return None

    def outcomes(self) -> list[tuple[int, str]]:
        return [(d.conid, d.outcome) for d in self.done]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rig:
    """Queue + fake IB + ledger stub + one worker whose handlers feed ``inbox``."""

    def __init__(self, log: EventLog, *, lines: int = 3, clock: Clock | None = None, **worker: Any) -> None:
        self.log = log
        self.inbox = Inbox.start()
        assert self.inbox.ref is not None
        # with a test clock the queue reads it too (in µs): holds and backoffs then pass as the test moves it
        queue_clock = {"clock": lambda: int(clock.now * 1_000_000)} if clock is not None else {}
        self.queue = QueueActor.start(log, max_attempts=3, backoff_base_s=0.05, backoff_cap_s=0.1, **queue_clock)
        self.ib = FakeIbActor.start(FakeIbSettings(positions=POSITIONS, line_limit=100), [self.inbox.ref])
        self.ledger = LedgerStub.start(lines)
        settings = {"max_snapshot_msgs_per_s": 45.0, "snapshot_timeout_s": 2.0, "idle_s": 0.02}
        settings.update(worker)
        self.settings = WorkerSettings(**settings)
        self.worker = QueueWorker.start(
            self.settings,
            queue=self.queue,
            ib=self.ib,
            router=self.ledger,
            handlers=HandlerSet([self.inbox.ref]),
            **({"clock": clock} if clock is not None else {}),
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

    def ledger_state(self) -> tuple[int, int, list[tuple[int, str]]]:
        """(lines still lent, peak lent, outcomes reported)."""
        proxy = self.ledger.proxy()
        return len(proxy.lent.get(timeout=5)), proxy.peak.get(timeout=5), proxy.outcomes().get(timeout=5)

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


def test_every_queued_contract_is_snapshotted_published_acknowledged_and_its_line_returned(rig_factory: Any) -> None:
    rig = rig_factory(lines=4)
    rig.enqueue(CONIDS[:10])
    wait_until(lambda: rig.status().succeeded == 10, timeout=10)
    wait_until(lambda: len(rig.inbox.messages(MarketUpdate)) == 10, timeout=5)  # the handler gets them by tell
    updates = rig.inbox.messages(MarketUpdate)
    assert sorted(u.conid for u in updates) == sorted(CONIDS[:10])
    assert {u.source for u in updates} == {"queue"}
    assert rig.queue_stats().pending == 0
    succeeded = {e.event.conid for e in rig.queue_events("item_succeeded")}  # type: ignore[attr-defined]
    assert succeeded == set(CONIDS[:10])
    wait_until(lambda: rig.ledger_state()[0] == 0, timeout=5)  # every lent line came back
    _, _, outcomes = rig.ledger_state()
    assert sorted(outcomes) == sorted((c, "ok") for c in CONIDS[:10])


def test_open_snapshots_never_exceed_the_lines_lent(rig_factory: Any) -> None:
    rig = rig_factory(lines=3)
    # each snapshot holds its line 0.2 s: at 45 requests/s the worker asks for a third line long before the first
    # comes back, so the three lent lines are all in use at once
    rig.ib.tell(SetSnapshotLatency(seconds=0.2))
    rig.enqueue(CONIDS[:15])
    wait_until(lambda: rig.status().succeeded == 15, timeout=15)
    stats = rig.ib_stats()
    assert stats.streams == 0
    assert stats.peak_lines == 3  # used the lines it was lent, and no more
    assert rig.ledger_state()[1] == 3


def test_the_message_budget_paces_snapshot_requests(rig_factory: Any) -> None:
    """At 5 requests/s: one at start (the bucket starts with one), then five per second of clock."""
    clock = Clock()
    rig = rig_factory(lines=50, clock=clock, max_snapshot_msgs_per_s=5.0)
    rig.enqueue(CONIDS[:20])
    wait_until(lambda: rig.status().succeeded == 1, timeout=5)
    assert ask(rig.worker, Wake()).succeeded == 1  # no time has passed: no token, no request
    assert rig.ib_stats().snapshots_in_flight == 0
    clock.now += 1.0
    ask(rig.worker, Wake())
    wait_until(lambda: rig.status().succeeded == 6, timeout=5)
    assert ask(rig.worker, Wake()).succeeded == 6
    clock.now += 10.0  # a long pause saves up one second's worth at most
    ask(rig.worker, Wake())
    wait_until(lambda: rig.status().succeeded == 11, timeout=5)
    assert ask(rig.worker, Wake()).succeeded == 11


def test_a_batch_waits_for_its_tokens_and_then_goes_out_together(rig_factory: Any) -> None:
    """WorkerSettings.batch (the what-if replay's step): nothing until five tokens are there, then five at once."""
    clock = Clock()
    rig = rig_factory(lines=50, clock=clock, max_snapshot_msgs_per_s=10.0, batch=5)
    rig.enqueue(CONIDS[:20])
    assert ask(rig.worker, Wake()).succeeded == 0  # the bucket starts with one token: not a batch
    clock.now += 0.3  # four tokens
    assert ask(rig.worker, Wake()).succeeded == 0
    assert rig.ib_stats().snapshots_in_flight == 0
    clock.now += 0.1  # five
    ask(rig.worker, Wake())
    wait_until(lambda: rig.status().succeeded == 5, timeout=5)
    assert ask(rig.worker, Wake()).succeeded == 5  # the five were the batch; the bucket is empty again
    clock.now += 0.5
    ask(rig.worker, Wake())
    wait_until(lambda: rig.status().succeeded == 10, timeout=5)
    assert ask(rig.worker, Wake()).cycles == 2  # one borrow-and-claim round a batch


def test_a_batch_never_waits_for_more_than_the_bucket_holds() -> None:
    """At a rate halved by a 321 the bucket holds fewer tokens than the batch: the wait is for what it holds."""
    bucket = TokenBucket(10.0, now=0.0)
    bucket.take(1, 0.0)
    assert bucket.wait_s(0.0, 5) == pytest.approx(0.5)
    bucket.slow_down(0.0, hold_s=60.0)
    assert bucket.rate == 5.0
    assert bucket.wait_s(0.0, 5) == pytest.approx(1.0)
    bucket.available(10.0)
    assert bucket.available(10.0) == 5  # a second's worth at 5/s: the most it holds


def test_a_contract_without_a_contract_definition_is_dead_lettered_at_once(rig_factory: Any) -> None:
    rig = rig_factory()
    unknown = 777  # the fake answers 200 (no contract) for a conid it does not hold
    rig.enqueue([unknown, CONIDS[0]])
    wait_until(lambda: rig.queue_stats().failed == 1, timeout=10)
    (dead_letter,) = rig.queue_events("item_dead_lettered")
    assert dead_letter.event.conid == unknown  # type: ignore[attr-defined]
    assert dead_letter.event.code == 200  # type: ignore[attr-defined]
    assert not rig.queue_events("item_retry_scheduled")  # terminal: no retry storm
    claims = [e for e in rig.queue_events("item_claimed") if e.event.conid == unknown]  # type: ignore[attr-defined]
    assert len(claims) == 1
    wait_until(lambda: (unknown, "failed") in rig.ledger_state()[2], timeout=5)
    assert next(d for d in rig.ledger.proxy().done.get() if d.conid == unknown).terminal


def test_a_snapshot_that_times_out_is_retried_with_backoff_then_dead_lettered(rig_factory: Any) -> None:
    rig = rig_factory(snapshot_timeout_s=0.1)
    rig.ib.tell(SetNeverAnswer(conid=CONIDS[1]))
    rig.enqueue(CONIDS[:3])
    wait_until(lambda: rig.queue_stats().failed == 1, timeout=10)
    retries = rig.queue_events("item_retry_scheduled")
    assert [e.event.conid for e in retries] == [CONIDS[1]] * 2  # type: ignore[attr-defined]
    assert all(e.event.error.startswith("timeout") for e in retries)  # type: ignore[attr-defined]
    delays = [e.event.not_before_us - e.ts_us for e in retries]  # type: ignore[attr-defined]
    assert delays[1] > delays[0]  # exponential backoff
    assert rig.status().failed == 3  # max_attempts
    assert rig.ib_stats().snapshots_in_flight == 0  # the timed-out snapshots gave their lines back
    wait_until(lambda: rig.ledger_state()[0] == 0, timeout=5)


def test_disconnect_releases_open_snapshots_without_an_attempt_and_claims_nothing_until_back(
    rig_factory: Any,
) -> None:
    rig = rig_factory(lines=10)
    rig.ib.tell(SetSnapshotLatency(seconds=30))  # in flight when IB goes away
    rig.enqueue(CONIDS[:10])
    wait_until(lambda: rig.ib_stats().snapshots_in_flight == 10, timeout=5)
    rig.ib.tell(Disconnect())
    wait_until(lambda: not rig.status().busy, timeout=5)
    assert not rig.status().connected
    stats = rig.queue_stats()
    assert (stats.pending, stats.processing) == (10, 0)
    assert len(rig.queue_events("item_released")) == 10
    assert rig.status().failed == 0
    assert not rig.queue_events("item_retry_scheduled")
    assert {o for _, o in rig.ledger_state()[2]} == {"interrupted"}
    before = len(rig.queue_events("item_claimed"))
    ask(rig.worker, Wake())  # while disconnected nothing is claimed
    assert len(rig.queue_events("item_claimed")) == before
    rig.ib.tell(SetSnapshotLatency(seconds=0))
    rig.ib.tell(Connect())
    wait_until(lambda: rig.status().succeeded == 10, timeout=10)
    assert {e.event.attempt for e in rig.queue_events("item_claimed")} == {1}  # type: ignore[attr-defined]


def test_the_token_bucket_halves_on_a_rate_limit_and_climbs_back() -> None:
    bucket = TokenBucket(10.0, now=0.0)
    bucket.slow_down(0.0, hold_s=5.0)
    assert bucket.rate == 5.0
    assert bucket.available(0.5) == 2  # 0.5 s at 5/s
    bucket.take(2, 0.5)
    assert bucket.rate == 5.0  # held
    bucket.available(6.0)
    assert 5.0 < bucket.rate <= 10.0  # climbing back after the hold
    for t in range(7, 30):
        bucket.available(float(t))
    assert bucket.rate == 10.0


def test_refusals_in_the_same_second_halve_the_rate_once() -> None:
    """Snapshots refused for the rate together (a burst of 100s or 321s: one overload at IB) say it once: four of
    them used to cut the rate to a sixteenth for the whole hold. A refusal a second later halves it again."""
    bucket = TokenBucket(16.0, now=0.0)
    for t in (0.0, 0.2, 0.5, 0.9):
        bucket.slow_down(t, hold_s=10.0)
    assert bucket.rate == 8.0
    bucket.available(5.0)
    assert bucket.rate == 8.0  # held from the last refusal of the burst
    bucket.slow_down(5.0, hold_s=10.0)
    assert bucket.rate == 4.0


def test_a_slow_down_without_a_hold_climbs_back_at_the_same_instant() -> None:
    """The hold is over at once: the next refill climbs, even at the instant of the slow-down (a refill skipped
    because no time had passed once left the rate halved until the clock moved)."""
    bucket = TokenBucket(10.0, now=0.0)
    bucket.available(0.0)
    bucket.slow_down(0.0, hold_s=0.0)
    assert bucket.rate == 5.0
    bucket.available(0.0)
    assert bucket.rate == 6.25


def test_a_token_refilled_in_pieces_is_whole_and_its_wait_moves_time_on() -> None:
    """Found by the what-if simulator: refills summed to 0.9999999999999998 tokens at t=0.5, and the wait
    for the rest (2e-16 s) did not move a float clock at all, so a worker sleeping wait_s() woke at the same
    instant forever. The exact sequence of the worker's calls:"""
    bucket = TokenBucket(10.0, now=0.0)
    bucket.available(0.0)
    bucket.take(0, 0.0)
    bucket.available(0.2)
    bucket.available(0.4)
    bucket.take(5, 0.4)
    for now in (0.4, 0.481426, 0.497803):
        assert bucket.available(now) == 0
        bucket.wait_s(now)
    now = 0.5
    assert bucket.available(now) == 1 or now + bucket.wait_s(now) > now
    # and whatever the fractions, a worker that sleeps wait_s() gets its token within a few wake-ups
    now = 0.6999999999000001
    bucket = TokenBucket(10.0, now=now)
    bucket.take(1, now)
    for _ in range(100):
        if bucket.available(now):
            break
        step = bucket.wait_s(now)
        assert now + step > now
        now += step
    assert bucket.available(now) == 1




def test_a_farm_blip_holds_each_cut_contract_back_instead_of_pausing_every_snapshot(rig_factory: Any) -> None:
    """Every snapshot cut by the blip goes back without an attempt, held 2 s: no storm, and the other contracts
    are still asked at the budget's rate (the worker cannot tell one farm down from all: no pause)."""
    clock = Clock()
    rig = rig_factory(lines=5, clock=clock, max_snapshot_msgs_per_s=20.0)
    rig.ib.tell(InjectFarmBlip(down_s=None))
    rig.enqueue(CONIDS[:5])

    def outcomes() -> list[str]:
        return [o for _, o in rig.ledger_state()[2]]

    wait_until(lambda: outcomes() == ["interrupted"], timeout=5)  # the one token there
    # the queue reads the clock when it takes a Release (told before the outcome is reported): an ask behind it
    # makes sure it took them before the clock moves on, so each hold runs from the instant it was cut
    rig.queue_stats()
    clock.now += 1.0  # tokens for the other four: asked at once, no pause
    ask(rig.worker, Wake())
    wait_until(lambda: outcomes() == ["interrupted"] * 5, timeout=5)
    rig.queue_stats()
    clock.now += 0.5  # every item still held (the first until 2 s, the others until 3 s)
    ask(rig.worker, Wake())
    assert len(outcomes()) == 5
    clock.now += 0.6  # the first one's hold is over: asked again (cut again)
    ask(rig.worker, Wake())
    wait_until(lambda: len(outcomes()) == 6, timeout=5)
    rig.queue_stats()
    rig.ib.tell(InjectFarmOk())
    clock.now += 5.0  # past every hold (the first's second hold is 4 s)
    ask(rig.worker, Wake())
    wait_until(lambda: rig.status().succeeded == 5, timeout=10)
    assert rig.status().failed == 0
    assert len(rig.queue_events("item_released")) == 6  # back without an attempt
    assert not rig.queue_events("item_retry_scheduled")


def test_an_idle_worker_keeps_one_wake_up_timer_not_a_growing_crowd() -> None:
    """A timer a sooner wake-up replaced must not count when it fires.

    It used to: each stale Wake cleared the pending wake-up and started a
    timer of its own, so the stale ones never died out, and every wake-up
    added to them. An account with fewer queue contracts than the budget
    can serve (the worker often finds nothing to claim) then asked the
    router for lines and the queue for items thousands of times a second,
    more every minute. Driven on simulated time by the what-if loop (the
    real worker, router and queue), so the count is exact, not timed.
    """
    from actors.what_if_sim import SimConfig, simulate
    from storage.recorded_day import RecordedContract, RecordedDay, SnapshotSample

    start = 1_780_000_000_000_000
    held = [
        RecordedContract(conid=c, symbol=f"S{c}", sec_type="STK", position=1.0, delta=None, appeared_us=start)
        for c in range(1000, 1005)
    ]
    day = RecordedDay(
        start_us=start,
        end_us=start + 120_000_000,
        max_lines=30,
        settings={},
        true_lines=None,
        learned_at_start=None,
        contracts=held,
        active_at_start={},
        active_changes=[],
        snapshots={c.conid: [SnapshotSample(0.5, "ok")] for c in held},
        interruptions_us=[],
        down=[],
    )
    outcome = simulate(day, SimConfig(label="t", max_lines=30, true_lines=30, learned_at_start=None))
    assert outcome.snapshots_sent > 1000  # the budget's 10 a second, for 2 minutes
    # about a dozen messages a snapshot, and a few rounds a second while nothing is claimable: not hundreds
    assert outcome.loop_steps < 30 * outcome.snapshots_sent, outcome.loop_steps


# ---------------------------------------------------------------- the batch's rules, with stub peers
# The what-if replay's worker (ReplayWorker: the runtime's decisions, its asks answered in the caller's turn)
# against a router and queue that lend exactly ``lines`` and hand out exactly ``items``, and an IB that keeps
# every snapshot open until the test answers it: what the worker asks for, and when, is all there is to see.


class StubPeers:
    """The router and the queue for the batch tests: at most ``lines`` lines lent at once, ``items`` items a claim."""

    def __init__(self, lines: int, items: int) -> None:
        self.lines, self.items = lines, items
        self.lent = 0
        self.borrows: list[int] = []  # AcquireLines.n, in order
        self.snapshots: list[tuple[Any, Any]] = []  # (reply, answer) of each snapshot sent, unanswered
        self.released: list[Release] = []
        self.lifted: list[list[int]] = []  # LiftHolds.conids, in order
        self._next = 1

    def ask_then(self, command: Any, reply: Any, answer: Any) -> None:
        if isinstance(command, AcquireLines):
            self.borrows.append(command.n)
            n = min(command.n, self.lines - self.lent)
            grants = [LineGrant(line_id=self._next + i, level=self.lent + i + 1) for i in range(n)]
            self._next += n
            self.lent += n
            reply.value = LinesGranted(lines=grants, limit=100, lines_held=n)
        elif isinstance(command, Claim):
            n = min(command.n, self.items)
            reply.value = Claimed(
                items=[ClaimedItem(item_id=self._next + i, conid=CONIDS[i], priority=2, attempt=1, lease_until_us=1) for i in range(n)]
            )
            self._next += n
        else:  # a snapshot: open until the test answers it
            self.snapshots.append((reply, answer))
            return
        answer.step(answer)

    def tell(self, message: Any) -> None:
        if isinstance(message, SnapshotDone):
            self.lent -= 1
        elif isinstance(message, ReleaseLines):
            self.lent -= len(message.line_ids)
        elif isinstance(message, Release):
            self.released.append(message)
        elif isinstance(message, LiftHolds):
            self.lifted.append(message.conids)


def _batch_worker(peers: StubPeers, clock: Clock, **settings: Any) -> QueueWorker:
    from actors.what_if_sim import ReplayWorker

    worker = ReplayWorker(
        WorkerSettings(max_snapshot_msgs_per_s=10.0, idle_s=0.2, **settings),
        queue=peers,  # type: ignore[arg-type]
        ib=peers,  # type: ignore[arg-type]
        router=peers,  # type: ignore[arg-type]
        handlers=HandlerSet([]),
        connected=True,
        clock=clock,
        call_later=lambda _delay, _fn: None,  # wake-ups: the test pumps by hand
    )
    worker._actor_ref = peers  # type: ignore[assignment]  # what it tells itself goes nowhere
    return worker


def _stub_rig(lines: int, items: int, **settings: Any) -> tuple[Clock, StubPeers, QueueWorker]:
    clock, peers = Clock(), StubPeers(lines=lines, items=items)
    return clock, peers, _batch_worker(peers, clock, **settings)


def _quote_the_first(peers: StubPeers) -> None:
    """The first open snapshot comes back with a quote (its line is free again, and the worker pumps)."""
    reply, answer = peers.snapshots.pop(0)
    reply.value = SnapshotResult(updates=[MarketUpdate(conid=answer.item.conid, source="queue", ts_us=1)])
    answer.step(answer)


def test_a_batch_waits_for_what_the_bucket_holds_at_a_rate_cut_by_a_321() -> None:
    clock, peers, worker = _stub_rig(lines=50, items=50, batch=10)
    worker.bucket.slow_down(clock.now, hold_s=600.0)  # 5/s now: the bucket holds five
    clock.now += 3.0
    worker._pump()
    assert peers.borrows == [5]  # five: a batch of ten would never come


def test_while_lines_are_short_each_token_sends_at_once() -> None:
    clock, peers, worker = _stub_rig(lines=2, items=50, batch=10)
    clock.now += 1.0
    worker._pump()
    assert peers.borrows[0] == 10
    assert len(peers.snapshots) == 2  # two lines only
    _quote_the_first(peers)
    assert len(peers.snapshots) == 2  # the line went to the next snapshot at once, eight tokens being there


def test_while_items_are_short_each_token_sends_at_once() -> None:
    clock, peers, worker = _stub_rig(lines=50, items=3, batch=10)
    clock.now += 1.0
    worker._pump()
    assert len(peers.snapshots) == 3
    rounds = len(peers.borrows)
    clock.now += 0.1
    worker._pump()
    assert len(peers.borrows) == rounds + 1


def test_after_a_competing_session_one_snapshot_probes_with_one_token() -> None:
    clock, peers, worker = _stub_rig(lines=50, items=50, batch=10)
    clock.now += 1.0
    worker._pump()
    assert len(peers.snapshots) == 10
    for reply, answer in peers.snapshots:  # another login took the data: all ten refused, a pause of 0.5 s
        cut = SnapshotFailed(conid=answer.item.conid, kind=IbErrorKind.COMPETING_SESSION, code=10197)
        reply.value = SnapshotResult(failures=[cut])
        answer.step(answer)
    peers.snapshots.clear()
    borrowed = len(peers.borrows)
    clock.now += 0.6  # past the pause, six tokens: one probe, not a wait for ten
    worker._pump()
    assert peers.borrows[borrowed:] == [1]


def _cut(peers: StubPeers, index: int = 0, code: int = 10182) -> None:
    """An open snapshot comes back cut by a farm outage (10182, or a 2103 TWS held silent)."""
    reply, answer = peers.snapshots.pop(index)
    reply.value = SnapshotResult(failures=[SnapshotFailed(conid=answer.item.conid, kind=IbErrorKind.DATA_INTERRUPTED, code=code)])
    answer.step(answer)


def test_a_cut_snapshot_goes_back_held_longer_each_time_until_its_contract_quotes() -> None:
    """Its farm may be the one that is down: claimed again at once, it would go before every contract IB can serve."""
    clock, peers, worker = _stub_rig(lines=1, items=1)  # one contract, claimed again and again
    holds = []
    for answer in ("cut", "cut", "cut", "quote", "cut"):
        clock.now += 10.0  # past any pause
        worker._pump()
        assert len(peers.snapshots) == 1
        if answer == "cut":
            _cut(peers, code=2103)
            holds.append(peers.released[-1].hold_s)
        else:
            _quote_the_first(peers)
    assert holds == [2.0, 4.0, 8.0, 2.0]  # doubled while cut, back to the start after a quote
    assert {r.reason for r in peers.released} == {"interrupted: 2103"}
    assert all(r.item_ids for r in peers.released)


@pytest.mark.parametrize("quiet_s", [0.5, 2.0])
def test_cuts_do_not_pause_the_worker_whether_or_not_other_contracts_quote(quiet_s: float) -> None:
    """Every open snapshot cut, the last quote 0.5 s or 2 s before: it may be one farm's (the others quote, or
    nothing else was due), so no pause and no one-at-a-time probing, which would ask the down farm's stalest
    contracts before the rest."""
    clock, peers, worker = _stub_rig(lines=50, items=10)
    clock.now += 1.0
    worker._pump()
    assert len(peers.snapshots) == 10
    _quote_the_first(peers)
    clock.now += quiet_s
    while peers.snapshots:
        _cut(peers)
    borrowed = len(peers.borrows)
    clock.now += 0.6
    worker._pump()
    assert peers.borrows[borrowed:] == [6]  # the six tokens there, at once


def test_a_farm_back_lifts_the_holds_and_a_contract_cut_again_starts_over() -> None:
    """IB's 2104 (or 2108) after an outage: the items held for it may be claimed now, not when their holds end."""
    clock, peers, worker = _stub_rig(lines=1, items=1)
    for _ in range(2):
        clock.now += 10.0
        worker._pump()
        _cut(peers)
    assert [r.hold_s for r in peers.released] == [2.0, 4.0]
    worker.on_receive(IbError(code=2104, kind=IbErrorKind.INFO, message="Market data farm connection is OK:usfarm"))
    assert peers.lifted == [[CONIDS[0]]]
    worker.on_receive(IbError(code=2104, kind=IbErrorKind.INFO, message="Market data farm connection is OK:usopt"))
    assert peers.lifted == [[CONIDS[0]]]  # nothing held any more: nothing to lift
    clock.now += 10.0
    worker._pump()
    _cut(peers)
    assert peers.released[-1].hold_s == 2.0  # a new outage: the first hold again


def test_a_contract_that_fails_on_its_own_after_a_cut_is_not_lifted() -> None:
    """Its delay is then a retry's backoff, which a farm coming back says nothing about."""
    clock, peers, worker = _stub_rig(lines=1, items=1)
    clock.now += 10.0
    worker._pump()
    _cut(peers)
    clock.now += 10.0
    worker._pump()
    reply, answer = peers.snapshots.pop(0)
    reply.value = SnapshotResult(failures=[SnapshotFailed(conid=answer.item.conid, kind=IbErrorKind.TIMEOUT)])
    answer.step(answer)
    worker.on_receive(IbError(code=2104, kind=IbErrorKind.INFO, message="Market data farm connection is OK:usfarm"))
    assert peers.lifted == []


def test_one_farm_down_with_silent_snapshots_leaves_the_other_contracts_fresh() -> None:
    """The options' farm is down for 5 minutes and TWS holds their snapshots until the 11 s timeout (excused:
    DATA_INTERRUPTED 2103); the stocks' farm serves. Driven on simulated time by the what-if loop (the real
    router, queue and worker). The stocks must stay near their 60 s target.

    It stalled before: when no stock happened to be due for 2 s (or every line was holding a silent option),
    the cuts paused the worker, which then probed one snapshot at a time, the stalest first: always an option
    (each option's hold, a few seconds, had long passed by its next probe, 19 s apart), so no stock was
    refreshed until the farm was back, and no snapshot price ended the session's outage excuse either.
    """
    import numpy as np

    from actors import what_if_sim
    from actors.what_if_sim import ReplayingIb, SimConfig, simulate
    from storage.recorded_day import RecordedContract, RecordedDay, SnapshotSample

    start = 1_780_000_000_000_000
    down, up, end = 120.0, 420.0, 480.0
    stocks, options = list(range(1000, 1300)), set(range(5000, 5030))
    held = [
        RecordedContract(conid=c, symbol=f"S{c}", sec_type="OPT" if c in options else "STK", position=1.0,
                         delta=0.5 if c in options else None, appeared_us=start)
        for c in [*stocks, *sorted(options)]
    ]  # fmt: skip
    day = RecordedDay(
        start_us=start, end_us=start + int(end * 1e6), max_lines=100, settings={}, true_lines=None,
        learned_at_start=None, contracts=held, active_at_start={}, active_changes=[],
        snapshots={c.conid: [SnapshotSample(0.5, "ok")] for c in held}, interruptions_us=[], down=[],
    )  # fmt: skip
    arrives = ReplayingIb._snapshot_arrives

    def silent_options(ib: ReplayingIb, conid: int, reply: Any, answer: Any, asked_at: float, deadline: float) -> None:
        if conid not in options or not down <= ib.loop.now < up:
            arrives(ib, conid, reply, answer, asked_at, deadline)
            return
        ib.open_snapshots[answer] = conid

        def cut(_: Any) -> None:
            del ib.open_snapshots[answer]
            ib._answer(reply, answer, conid, IbErrorKind.DATA_INTERRUPTED, 2103)

        ib.loop.at(deadline, cut)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(what_if_sim.ReplayingIb, "_snapshot_arrives", silent_options)
        outcome = simulate(day, SimConfig(label="t", max_lines=100, true_lines=100, learned_at_start=None))

    def age(conid: int, at_s: float) -> float:
        times = outcome.quotes.get(conid, np.array([], dtype=np.int64))
        times = times[times <= start + at_s * 1e6]
        return at_s - (int(times.max()) - start) / 1e6 if len(times) else float("inf")

    assert max(age(c, up - 1) for c in stocks) < 90.0  # within the 60 s target, and a snapshot cycle
    assert max(age(c, end) for c in options) < 75.0  # and the options are asked again once their farm is back
