"""The StreamRouter with real actors: registry and queue on a real log, the fake IB, the worker.

Each test builds the same small graph the runtime builds (minus the Delta
position writer), drives the registry, and reads the outcome where it is
observable: the router's events in the log, the queue's items, and the fake
IB's own line counters. The line invariant is checked against the fake's
``peak_lines`` with the fake's limit set far above ``max_lines``, so that a
router that overspends is measured instead of being masked by a 101.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pykka
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.fake_ib import (
    ClearError,
    FakeIbActor,
    FakeIbSettings,
    InjectDisconnect,
    InjectError,
    SetLineLimit,
    SetSnapshotLatency,
    demo_positions,
)
from actors.handlers import HandlerSet
from actors.ib_base import AddSubscriber
from actors.messaging import ask
from actors.queue import QueueActor
from actors.registry import RegistryActor
from actors.router import (
    ActiveAtStart,
    RouterSettings,
    RouterStatus,
    RouterStatusReply,
    RouterTick,
    StreamRouter,
    SweepNow,
)
from actors.what_if_sim import MemoryLog
from actors.worker import QueueWorker, WorkerSettings, WorkerStatus
from events.ib import (
    Connect,
    ConnectionState,
    ConnectionStateChanged,
    IbError,
    IbErrorKind,
    IbStats,
    IbStatsReply,
    MarketUpdate,
    MarketUpdates,
    PositionChanged,
    StreamEnded,
    Subscribe,
)
from events.queue import Priority
from events.registry import AddActive, LegAdded, RemoveActive
from events.router import ContractsQuery
from storage.event_log import EventLog
from tests.conftest import TEST_LOG_CONFIG
from tests.support import Inbox, wait_until

POSITIONS = demo_positions(30, 6, seed=7)
STOCKS = [p.conid for p in POSITIONS if p.sec_type == "STK"]
OPTIONS = [p.conid for p in POSITIONS if p.sec_type == "OPT"]
ALL = [p.conid for p in POSITIONS]
#: High enough that the fake never refuses: an overspending router shows up in peak_lines.
UNLIMITED = 10_000
#: A 101 takes back a peak proven this soon before it (RouterSettings.peak_settle_s), compressed as proof_s is.
RIG_PEAK_SETTLE_S = 0.05


class Tap(pykka.ThreadingActor):
    """Stands between the router and the fake IB: records every message the router tells IB, then passes it on.

    The fake (like the real IB actor) ignores a Subscribe for a stream it
    already holds, so its own counters cannot show a router that resubmits
    streams it should have kept; the tap sees every one. Asking it for
    ``told`` answers after everything told to it before.
    """

    def __init__(self, target: pykka.ActorRef[Any]) -> None:
        super().__init__()
        self.target = target
        self.told: list[Any] = []

    def on_receive(self, message: Any) -> None:
        self.told.append(message)
        self.target.tell(message)


class Rig:
    """One graph: registry -> router -> (fake IB, queue) <- worker; handlers feed ``inbox``."""

    def __init__(
        self,
        log: EventLog,
        *,
        max_lines: int = 12,
        reserve: int = 3,
        line_limit: int = UNLIMITED,
        min_stream_age_s: float = 0.0,
        worker: bool = False,
        snapshot_latency_s: float = 0.0,
        errors: dict[int, int] | None = None,
        line_probe_s: float = 300.0,
        peak_settle_s: float = RIG_PEAK_SETTLE_S,
        min_dwell_s: float = 30.0,
        clock: Callable[[], float] | None = None,
        connect: bool = True,
        tap_ib: bool = False,
    ) -> None:
        self.log = log
        self.max_lines = max_lines
        self.inbox = Inbox.start()
        assert self.inbox.ref is not None
        self.handlers = HandlerSet([self.inbox.ref])
        self.registry = RegistryActor.start(log)
        self.queue = QueueActor.start(log, max_attempts=3, backoff_base_s=0.01, backoff_cap_s=0.05)
        self.ib = FakeIbActor.start(
            FakeIbSettings(
                positions=POSITIONS,
                line_limit=line_limit,
                min_stream_age_s=min_stream_age_s,
                snapshot_latency_s=snapshot_latency_s,
                errors=errors or {},
            ),
            [self.inbox.ref],
        )
        self.tap = Tap.start(self.ib) if tap_ib else None
        self.router = StreamRouter.start(
            log,
            RouterSettings(
                max_lines=max_lines,
                min_snapshot_lines=reserve,
                monitoring_s=3600,
                line_probe_s=line_probe_s,
                tick_s=0.05,
                proof_s=0.05,
                peak_settle_s=peak_settle_s,
                min_dwell_s=min_dwell_s,
                # no timed sweep: the tests sweep by SweepNow; a first sweep a few seconds after the start
                # would land in the middle of a test on a loaded machine and queue what it cancelled
                sweep_s=3600.0,
                first_sweep_s=3600.0,
            ),
            ib=self.tap or self.ib,
            queue=self.queue,
            handlers=self.handlers,
            **({"clock": clock} if clock is not None else {}),
        )
        self.registry.proxy().add_subscriber(self.router).get(timeout=5)
        self.ib.tell(AddSubscriber(self.router))
        self.worker: pykka.ActorRef[Any] | None = None
        if worker:
            self.worker = QueueWorker.start(
                WorkerSettings(max_snapshot_msgs_per_s=45, snapshot_timeout_s=2.0, idle_s=0.02),
                queue=self.queue,
                ib=self.ib,
                router=self.router,
                handlers=self.handlers,
            )
            self.ib.tell(AddSubscriber(self.worker))
        if connect:
            self.connect()

    def connect(self) -> None:
        self.ib.tell(Connect())
        self.inbox.wait_for(connected, timeout=5)
        # every position reached the router (PositionChanged precedes CONNECTED)
        wait_until(lambda: self.status().known == len(POSITIONS), timeout=5)

    # ---------------------------------------------------------------- driving

    def activate(self, *conids: int, strategy: str = "s1") -> None:
        for conid in conids:
            ask(self.registry, AddActive(conid=conid, strategy=strategy))

    def deactivate(self, *conids: int, strategy: str = "s1") -> None:
        for conid in conids:
            ask(self.registry, RemoveActive(conid=conid, strategy=strategy))

    # ---------------------------------------------------------------- observing

    def status(self) -> RouterStatusReply:
        return ask(self.router, RouterStatus(), timeout=5)

    def ib_stats(self) -> IbStatsReply:
        return ask(self.ib, IbStats(), timeout=5)

    def settle(self, timeout: float = 10.0) -> RouterStatusReply:
        """Wait until every cancel is confirmed and the fake holds exactly the router's streams."""

        def settled() -> bool:
            status = self.status()
            return status.cancelling == 0 and self.ib_stats().streams == status.streams

        wait_until(settled, timeout=timeout)
        return self.status()

    def router_events(self) -> list[tuple[str, int | None]]:
        """(type without prefix, conid or None) of every stored router event, in seq order.

        Asking the router's status first makes sure it has handled what the registry told it before.
        """
        self.status()
        self.log.flush()
        return [(s.type.removeprefix("router."), getattr(s.event, "conid", None)) for s in self.log.read(streams=["router"])]

    def learned_limits(self) -> list[int]:
        self.status()
        self.log.flush()
        return [s.event.limit for s in self.log.read(streams=["router"]) if s.type == "router.line_limit_learned"]  # type: ignore[attr-defined]

    def queue_items(self) -> dict[int, dict[str, Any]]:
        """Live (waiting or processing) queue items by conid."""
        summary = self.queue.proxy().summary(True).get(timeout=5)
        return {i["conid"]: i for i in summary["items"] if i["status"] in ("PENDING", "PROCESSING")}

    def assert_peak_within_budget(self) -> None:
        peak = self.ib_stats().peak_lines
        assert peak <= self.max_lines, f"peak {peak} lines > max_lines {self.max_lines}"


def connected(message: Any) -> bool:
    return isinstance(message, ConnectionStateChanged) and message.state == ConnectionState.CONNECTED


@pytest.fixture
def rig_factory(log_factory: Callable[[], EventLog]) -> Callable[..., Rig]:
    return lambda **kwargs: Rig(log_factory(), **kwargs)


# ---------------------------------------------------------------------- the hybrid decision


def test_active_streams_and_the_rest_is_queued(rig_factory: Any) -> None:
    rig = rig_factory()
    rig.activate(*OPTIONS[:4])
    status = rig.settle()
    assert status.streams == 4
    assert status.overflow == 0
    items = rig.queue_items()
    # every non-active position waits in the queue at monitoring priority; no active one does
    assert set(items) == set(ALL) - set(OPTIONS[:4])
    assert {i["priority"] for i in items.values()} == {Priority.MONITORING}
    assert [e for e in rig.router_events() if e[0] == "stream_started"] == [("stream_started", c) for c in OPTIONS[:4]]
    # streaming ticks reach the handlers through the router
    rig.inbox.wait_for(lambda m: isinstance(m, MarketUpdate) and m.source == "stream" and m.conid == OPTIONS[0])


def test_registry_changes_move_contracts_between_paths(rig_factory: Any) -> None:
    rig = rig_factory()
    conid = STOCKS[0]
    assert conid in rig.queue_items()
    rig.activate(conid)
    rig.settle()
    assert conid not in rig.queue_items()  # its waiting item was cancelled: it streams now
    assert rig.ib_stats().streams == 1
    rig.deactivate(conid)
    status = rig.settle()
    assert status.streams == 0
    assert rig.ib_stats().streams == 0
    assert rig.queue_items()[conid]["priority"] == Priority.MONITORING
    assert [e for e in rig.router_events() if e[1] == conid] == [("stream_started", conid), ("stream_stopped", conid)]


def test_two_strategies_keep_a_contract_streaming_until_both_let_go(rig_factory: Any) -> None:
    rig = rig_factory()
    conid = OPTIONS[0]
    rig.activate(conid, strategy="a")
    rig.activate(conid, strategy="b")
    rig.deactivate(conid, strategy="a")
    assert rig.settle().streams == 1
    rig.deactivate(conid, strategy="b")
    assert rig.settle().streams == 0


# ---------------------------------------------------------------------- overflow and promotion


def test_overflow_goes_to_the_queue_at_top_priority_and_is_promoted_when_a_line_frees(rig_factory: Any) -> None:
    rig = rig_factory(max_lines=6, reserve=2)  # budget 4
    rig.activate(*OPTIONS[:6])
    status = rig.settle()
    assert (status.streams, status.overflow) == (4, 2)
    items = rig.queue_items()
    for conid in OPTIONS[4:6]:
        assert items[conid]["priority"] == Priority.ACTIVE_OVERFLOW
    rig.deactivate(OPTIONS[0])
    status = rig.settle()
    assert (status.streams, status.overflow) == (4, 1)
    assert OPTIONS[4] not in rig.queue_items()  # promoted: its queue item is cancelled
    events = rig.router_events()
    assert ("overflow_queued", OPTIONS[4]) in events
    assert ("overflow_queued", OPTIONS[5]) in events
    # the promotion waited for the freed line: StreamStopped(0) before StreamPromoted(4)
    assert events.index(("stream_stopped", OPTIONS[0])) < events.index(("stream_promoted", OPTIONS[4]))
    # deactivating a contract that waits for a line leaves it at monitoring priority in the queue
    rig.deactivate(OPTIONS[5])
    status = rig.settle()
    assert (status.streams, status.overflow) == (4, 0)
    assert OPTIONS[5] in rig.queue_items()
    rig.assert_peak_within_budget()


def test_a_101_teaches_the_line_limit_and_streams_leave_the_snapshot_lines(rig_factory: Any) -> None:
    """max_lines says 12, IB takes 5: the 101s teach 5, and streams shrink to 5 less the 3 snapshot lines."""
    rig = rig_factory(max_lines=12, reserve=3, line_limit=5)
    rig.activate(*OPTIONS[:7])  # 7 streams fit the 9 configured slots: IB refuses the 6th and 7th
    wait_until(lambda: rig.status().line_cap == 5, timeout=5)
    status = rig.settle()
    assert (status.line_cap, status.line_limit, status.budget) == (5, 5, 2)
    assert (status.streams, status.overflow) == (2, 5)
    # one event per refusal that lowered it: what was still held after giving the refused line back
    # ([6, 5], or [5] when the 7th activation arrived after the 6th was refused and overflowed at once)
    learned = rig.learned_limits()
    assert learned in ([6, 5], [5])
    events = rig.router_events()
    demoted = [c for t, c in events if t == "stream_demoted"]
    overflowed = [c for t, c in events if t == "overflow_queued"]
    # the refused ones, and the worst-ranked streams shed as each 101 lowered the limit; the 7th was refused
    # too, or (activated after the limit was learned) went straight to the queue
    assert demoted[0] == OPTIONS[5]
    assert (OPTIONS[6] in demoted) != (OPTIONS[6] in overflowed)
    assert len(demoted) + len(overflowed) == 5
    items = rig.queue_items()
    assert all(items[c]["priority"] == Priority.ACTIVE_OVERFLOW for c in demoted + overflowed)
    # learned: a new activation does not even try IB, it overflows at once
    rig.activate(OPTIONS[7])
    assert ("overflow_queued", OPTIONS[7]) in rig.router_events()
    assert rig.ib_stats().peak_lines <= 7  # the discovery episode: the two refused requests, nothing more
    # a freed line goes to the best-ranked waiting contract
    streaming = [c for c in OPTIONS[:7] if c not in demoted + overflowed]
    assert len(streaming) == 2
    rig.deactivate(*streaming)
    status = rig.settle()
    assert (status.streams, status.overflow) == (2, 4)
    assert sum(t == "stream_promoted" for t, _ in rig.router_events()) == 2


def test_the_learned_limit_survives_a_restart_and_is_probed_upward(
    rig_factory: Any, log_factory: Callable[[], EventLog]
) -> None:
    rig = rig_factory(max_lines=12, reserve=3, line_limit=5)
    rig.activate(*OPTIONS[:7])
    wait_until(lambda: rig.status().line_cap == 5, timeout=5)
    rig.settle()
    learned = rig.learned_limits()
    pykka.ActorRegistry.stop_all(timeout=10)
    rig.log.close()
    # a new run on the same log: the limit is known, so no 101 is needed to find it again
    again = Rig(log_factory(), max_lines=12, reserve=3, line_limit=5, line_probe_s=1.0)
    again.router.tell(ActiveAtStart(conids=OPTIONS[:7]))  # what the runtime tells it from the recovered registry
    status = again.settle()
    assert status.streams == 2
    assert again.learned_limits() == learned  # nothing new learned at start
    # the probe: one more line after line_probe_s; a stream takes it, IB refuses it (101), the limit is learned back
    wait_until(lambda: any(t == "line_limit_probed" for t, _ in again.router_events()), timeout=10)
    events = again.router_events()
    probed_at = [t for t, _ in events].index("line_limit_probed")
    wait_until(lambda: "line_limit_learned" in [t for t, _ in again.router_events()[probed_at:]], timeout=10)
    assert again.learned_limits()[len(learned)] == 5  # the first thing learned after the probe: 5 again


def test_another_client_taking_lines_lowers_the_limit_and_sheds_streams(rig_factory: Any) -> None:
    rig = rig_factory(max_lines=12, reserve=3)
    rig.activate(*OPTIONS[:3])
    rig.settle()
    rig.ib.tell(SetLineLimit(limit=4))  # another client of the account took lines
    rig.activate(*OPTIONS[3:6])  # the 5th and 6th are refused
    wait_until(lambda: rig.status().line_cap == 4, timeout=5)
    status = rig.settle()
    assert (status.streams, status.overflow) == (1, 5)  # 4 lines less 3 for snapshots


# ---------------------------------------------------------------------- reconnects


@pytest.mark.parametrize("how", ["reconnect", "1101"])
def test_every_stream_is_resubmitted_after_ib_forgets_them(rig_factory: Any, how: str) -> None:
    rig = rig_factory()
    rig.activate(*OPTIONS[:5])
    rig.settle()
    assert rig.ib_stats().streams == 5
    rig.inbox.clear()
    rig.ib.tell(InjectDisconnect() if how == "reconnect" else InjectError(code=1101))
    rig.inbox.wait_for(lambda m: isinstance(m, ConnectionStateChanged) and m.resubscribe)
    wait_until(lambda: rig.ib_stats().streams == 5, timeout=5)
    # and they tick again
    rig.inbox.wait_for_count(lambda m: isinstance(m, MarketUpdate) and m.source == "stream", 5)
    assert rig.status().streams == 5


def test_data_kept_1102_resubmits_nothing(rig_factory: Any) -> None:
    rig = rig_factory(tap_ib=True)
    rig.activate(*OPTIONS[:3])
    rig.settle()
    told = rig.tap.proxy().told
    assert sum(isinstance(m, Subscribe) for m in told.get(timeout=5)) == 3  # the tap sees the router's requests
    before = len(told.get(timeout=5))
    rig.ib.tell(InjectError(code=1102))
    rig.inbox.wait_for(
        lambda m: isinstance(m, ConnectionStateChanged) and m.state == ConnectionState.RESTORED_DATA_KEPT
    )
    # a marker: the router lets its IB requests out in order, so once this Subscribe has passed the tap,
    # any resubmission the 1102 caused (released after the same commits) has passed it too
    rig.activate(OPTIONS[3])
    wait_until(lambda: Subscribe(conid=OPTIONS[3]) in told.get(timeout=5)[before:], timeout=5)
    assert told.get(timeout=5)[before:] == [Subscribe(conid=OPTIONS[3])]


# ---------------------------------------------------------------------- the line invariant


def test_lines_never_exceed_max_lines_with_snapshots_overflow_and_reconnects(rig_factory: Any) -> None:
    rig = rig_factory(max_lines=12, reserve=3, worker=True, snapshot_latency_s=0.005)
    assert rig.worker is not None
    rig.activate(*OPTIONS[:12])  # budget 9: three overflow
    rig.settle()
    for round_ in range(3):
        rig.deactivate(*OPTIONS[round_ * 3 : round_ * 3 + 3])
        rig.activate(*STOCKS[round_ * 4 : round_ * 4 + 4])
        if round_ == 1:
            rig.ib.tell(InjectDisconnect())
        rig.router.tell(SweepNow())
        rig.settle()
        rig.assert_peak_within_budget()
    # the worker really did run snapshots meanwhile
    wait_until(lambda: ask(rig.worker, WorkerStatus()).succeeded > 0, timeout=10)
    assert rig.ib_stats().peak_lines >= 9
    rig.assert_peak_within_budget()


def test_delayed_cancels_and_rapid_churn_stay_within_max_lines(rig_factory: Any) -> None:
    """With cancels delayed by the fake, a line is reused only after StreamEnded confirms it."""
    rig = rig_factory(max_lines=12, reserve=3, worker=True, min_stream_age_s=0.05, snapshot_latency_s=0.005)
    rig.activate(*OPTIONS[:9])  # the whole stream budget
    for _ in range(4):
        rig.deactivate(*OPTIONS[:4])
        rig.activate(*STOCKS[:4])  # would need the lines the cancels still hold
        rig.activate(*OPTIONS[:4])
        rig.deactivate(*STOCKS[:4])
        rig.assert_peak_within_budget()
    status = rig.settle()
    assert status.streams == 9
    assert status.overflow == 0
    assert rig.ib_stats().streams == 9
    rig.assert_peak_within_budget()


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("on"), st.integers(0, 15)),
            st.tuples(st.just("off"), st.integers(0, 15)),
            st.tuples(st.just("drop"), st.just(0)),
            st.tuples(st.just("1101"), st.just(0)),
        ),
        min_size=5,
        max_size=40,
    )
)
def test_random_activity_never_exceeds_max_lines(tmp_path_factory: pytest.TempPathFactory, steps: list[Any]) -> None:
    data_dir = tmp_path_factory.mktemp("router-prop")
    log = EventLog.open(data_dir, config=TEST_LOG_CONFIG)
    try:
        rig = Rig(log, max_lines=8, reserve=2, worker=True, min_stream_age_s=0.01, snapshot_latency_s=0.002)
        active: set[int] = set()
        universe = (OPTIONS + STOCKS)[:16]
        for kind, index in steps:
            conid = universe[index]
            if kind == "on":
                rig.activate(conid)
                active.add(conid)
            elif kind == "off":
                rig.deactivate(conid)
                active.discard(conid)
            elif kind == "drop":
                rig.ib.tell(InjectDisconnect())
            else:
                rig.ib.tell(InjectError(code=1101))
        status = rig.settle()
        assert status.streams + status.overflow == len(active)
        assert status.streams == min(len(active), 6)
        assert rig.ib_stats().streams == status.streams
        rig.assert_peak_within_budget()
    finally:
        pykka.ActorRegistry.stop_all(timeout=10)
        log.close()


# ---------------------------------------------------------------------- positions and refresh


def test_position_changes_and_the_sweep_enqueue_only_non_active_contracts(rig_factory: Any) -> None:
    rig = rig_factory()
    rig.activate(OPTIONS[0])
    rig.settle()
    # drain the queue so that new enqueues are visible
    from events.queue import Cancel

    for conid in ALL:
        ask(rig.queue, Cancel(conid=conid, reason="test"))
    assert rig.queue_items() == {}
    moved = next(p for p in POSITIONS if p.conid == STOCKS[3])
    rig.router.tell(PositionChanged(**{**_fields(moved), "position": moved.position + 1}))
    rig.router.tell(PositionChanged(**{**_fields(moved), "position": moved.position + 1}))  # unchanged: no enqueue
    active_leg = next(p for p in POSITIONS if p.conid == OPTIONS[0])
    rig.router.tell(PositionChanged(**{**_fields(active_leg), "position": active_leg.position + 1}))
    rig.status()
    wait_until(lambda: set(rig.queue_items()) == {STOCKS[3]}, timeout=5)
    rig.router.tell(SweepNow())
    wait_until(lambda: set(rig.queue_items()) == set(ALL) - {OPTIONS[0]}, timeout=5)


def _fields(position: PositionChanged) -> dict[str, Any]:
    return {f: getattr(position, f) for f in position.__struct_fields__}


def test_snapshot_latency_can_be_changed_under_load(rig_factory: Any) -> None:
    """The worker keeps lines within the reserve even when snapshots suddenly hold lines longer."""
    rig = rig_factory(max_lines=12, reserve=3, worker=True)
    rig.activate(*OPTIONS[:9])
    rig.settle()
    rig.ib.tell(SetSnapshotLatency(seconds=0.02))
    wait_until(lambda: ask(rig.worker, WorkerStatus()).succeeded >= len(ALL) - 9, timeout=15)
    rig.assert_peak_within_budget()


def test_the_sweep_re_enqueues_overflowed_active_contracts_at_top_priority(rig_factory: Any) -> None:
    """An active contract waiting for a line is owed refreshes at top priority, not one snapshot only."""
    from events.queue import Claim, Succeed

    rig = rig_factory(max_lines=6, reserve=2)  # budget 4
    rig.activate(*OPTIONS[:6])
    rig.settle()
    # the worker's part, by hand: every waiting item is served
    claimed = ask(rig.queue, Claim(n=1000)).items
    ask(rig.queue, Succeed(item_ids=[i.item_id for i in claimed]))
    assert rig.queue_items() == {}
    rig.router.tell(SweepNow())
    wait_until(lambda: len(rig.queue_items()) == len(ALL) - 4, timeout=5)
    items = rig.queue_items()
    assert {c for c, i in items.items() if i["priority"] == Priority.ACTIVE_OVERFLOW} == set(OPTIONS[4:6])
    assert not set(OPTIONS[:4]) & set(items)  # streaming contracts are not queued


def test_a_closed_position_is_no_longer_refreshed(rig_factory: Any) -> None:
    rig = rig_factory()
    rig.settle()
    from events.queue import Cancel

    for conid in ALL:
        ask(rig.queue, Cancel(conid=conid, reason="test"))
    closed = next(p for p in POSITIONS if p.conid == STOCKS[2])
    rig.router.tell(PositionChanged(**{**_fields(closed), "position": 0.0}))
    rig.router.tell(SweepNow())
    wait_until(lambda: set(rig.queue_items()) == set(ALL) - {STOCKS[2]}, timeout=5)
    assert STOCKS[2] not in rig.queue_items()


def test_streams_decided_before_ib_first_connects_are_sent_once_it_does(rig_factory: Any) -> None:
    """At start the router activates recovered contracts at once; IB may still be connecting.

    The IB actor refuses those subscribes (not connected); the first CONNECTED
    carries no resubscribe flag (nothing was lost from IB's side), so the router
    must resubmit on every transition to connected, not only after a loss.
    """
    rig = rig_factory(connect=False)
    rig.activate(*OPTIONS[:3])
    rig.inbox.wait_for(lambda m: isinstance(m, IbError) and m.kind == IbErrorKind.DISCONNECTED, timeout=5)
    assert rig.ib_stats().streams == 0
    rig.connect()
    wait_until(lambda: rig.ib_stats().streams == 3, timeout=5)
    assert rig.settle().streams == 3


# ---------------------------------------------------------------------- ranking and the ledger


class ManualClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_higher_priority_strategy_takes_a_line_once_the_holder_has_dwelt(rig_factory: Any) -> None:
    clock = ManualClock()
    rig = rig_factory(max_lines=6, reserve=2, min_dwell_s=1.0, clock=clock)  # 4 stream slots
    rig.activate(*OPTIONS[:4])
    rig.settle()
    urgent = OPTIONS[4]
    ask(rig.registry, AddActive(conid=urgent, strategy="urgent", priority=5))
    wait_until(lambda: rig.status().overflow == 1, timeout=5)
    ask(rig.router, RouterTick())
    assert "stream_demoted" not in [t for t, _ in rig.router_events()]  # the holders have not dwelt yet
    clock.now += 1.0
    ask(rig.router, RouterTick())
    wait_until(lambda: ("stream_promoted", urgent) in rig.router_events(), timeout=5)
    status = rig.settle()
    assert (status.streams, status.overflow) == (4, 1)
    rig.log.flush()
    demotions = [s.event for s in rig.log.read(streams=["router"]) if s.type == "router.stream_demoted"]
    assert len(demotions) == 1
    assert demotions[0].reason == f"outranked by {urgent}"  # type: ignore[attr-defined]
    # no flapping: within a dwell, the contract that lost its line cannot claim one back
    clock.now += 0.9
    for _ in range(5):
        ask(rig.router, RouterTick())
    assert [t for t, _ in rig.router_events()].count("stream_demoted") == 1
    # and the urgent contract keeps its line for good: nothing outranks priority 5
    for _ in range(5):
        clock.now += 1.0
        ask(rig.router, RouterTick())
        rig.settle()
    assert urgent not in [c for t, c in rig.router_events() if t == "stream_demoted"]
    rig.assert_peak_within_budget()


def test_holding_every_configured_line_without_a_101_makes_max_lines_the_known_limit(rig_factory: Any) -> None:
    rig = rig_factory(max_lines=8, reserve=2, worker=True, snapshot_latency_s=0.2)
    rig.activate(*OPTIONS[:3])
    wait_until(lambda: rig.status().line_cap == 8, timeout=15)  # the ramp reached the ceiling: proven
    rig.log.flush()
    (learned,) = [s.event for s in rig.log.read(streams=["router"]) if s.type == "router.line_limit_learned"]
    assert learned.reason == "max_lines held without a 101"  # type: ignore[attr-defined]
    rig.assert_peak_within_budget()


def test_at_start_the_highest_priorities_take_the_lines_first(rig_factory: Any) -> None:
    rig = rig_factory(max_lines=6, reserve=2)  # 4 stream slots for 6 active contracts
    rig.router.tell(ActiveAtStart(conids=OPTIONS[:6], priorities={OPTIONS[5]: {"a": 3}, OPTIONS[4]: {"b": 2}}))
    status = rig.settle()
    assert (status.streams, status.overflow) == (4, 2)
    started = [c for t, c in rig.router_events() if t == "stream_started"]
    assert started[:2] == [OPTIONS[5], OPTIONS[4]]


def test_a_priority_known_at_start_is_the_strategy_s_own_and_can_be_lowered(rig_factory: Any) -> None:
    """Start-up priorities are per strategy, so a later change of that strategy's priority replaces them."""
    clock = ManualClock()
    rig = rig_factory(max_lines=6, reserve=2, min_dwell_s=1.0, clock=clock)  # 4 stream slots
    rig.router.tell(ActiveAtStart(conids=OPTIONS[:5], priorities={OPTIONS[4]: {"s1": 5}}))
    rig.settle()
    assert OPTIONS[4] in [c for t, c in rig.router_events() if t == "stream_started"]
    # what the registry tells when that leg's priority is lowered to 0 and a waiting leg's raised: the line moves
    rig.router.tell(LegAdded(conid=OPTIONS[4], strategy="s1", priority=0))
    waiting = next(c for t, c in rig.router_events() if t == "overflow_queued")
    rig.router.tell(LegAdded(conid=waiting, strategy="s1", priority=1))
    clock.now += 1.0
    ask(rig.router, RouterTick())
    wait_until(lambda: ("stream_promoted", waiting) in rig.router_events(), timeout=5)


def test_a_stream_refused_for_no_subscription_goes_to_the_queue_and_is_not_asked_again_at_once(
    rig_factory: Any,
) -> None:
    """Not a matter of lines: no limit is learned, no line stays counted, and no re-subscribe storm."""
    refused = OPTIONS[1]
    rig = rig_factory(max_lines=8, reserve=2, errors={refused: 354})
    rig.activate(*OPTIONS[:3])
    wait_until(lambda: ("stream_demoted", refused) in rig.router_events(), timeout=5)
    status = rig.settle()
    assert (status.streams, status.overflow) == (2, 1)
    assert status.line_cap is None  # nothing learned about lines
    assert status.lines_in_use == 2  # the refused stream holds no line in the ledger
    assert rig.queue_items()[refused]["priority"] == Priority.ACTIVE_OVERFLOW  # served by snapshots instead
    for _ in range(5):  # lines are free, but the refused contract waits out its backoff
        ask(rig.router, RouterTick())
    assert ("stream_promoted", refused) not in rig.router_events()
    assert rig.ib_stats().streams == 2


def _promotions(rig: Rig, conid: int) -> int:
    return rig.router_events().count(("stream_promoted", conid))


def _refused_again_at(rig: Rig, clock: ManualClock, conid: int, wait_s: float) -> None:
    """The refused contract is not asked for again just before ``wait_s`` has passed, and is at ``wait_s``."""
    promoted = _promotions(rig, conid)
    demoted = rig.router_events().count(("stream_demoted", conid))
    clock.now += wait_s - 0.5
    ask(rig.router, RouterTick())
    assert _promotions(rig, conid) == promoted, f"asked again before {wait_s} s"
    clock.now += 0.5
    ask(rig.router, RouterTick())
    wait_until(lambda: rig.router_events().count(("stream_demoted", conid)) == demoted + 1, timeout=5)


def _competing_session(rig_factory: Any) -> tuple[Rig, ManualClock, int]:
    """A rig on a manual clock whose one active contract IB refused with 10197, a competing live session."""
    clock = ManualClock()
    rig = rig_factory(max_lines=8, reserve=2, clock=clock)
    competing = OPTIONS[1]
    rig.ib.tell(InjectError(code=10197, conid=competing))
    rig.activate(competing)
    wait_until(lambda: ("stream_demoted", competing) in rig.router_events(), timeout=5)
    return rig, clock, competing


def test_a_competing_session_s_refusals_back_off_from_30_s_to_5_minutes(rig_factory: Any) -> None:
    """10197: the account's other login took the data, account-wide and over within minutes, not an hour."""
    rig, clock, competing = _competing_session(rig_factory)
    for wait_s in (30.0, 60.0, 120.0, 240.0, 300.0, 300.0):
        _refused_again_at(rig, clock, competing, wait_s)


def test_a_contract_that_streamed_again_starts_its_refusal_backoff_afresh(rig_factory: Any) -> None:
    """Refusals count since the contract last streamed: a competing login each afternoon is not an ever
    longer wait."""
    rig, clock, competing = _competing_session(rig_factory)
    _refused_again_at(rig, clock, competing, 30.0)  # the second refusal: 60 s next
    rig.ib.tell(ClearError(conid=competing))  # the other login ends
    clock.now += 60.0
    ask(rig.router, RouterTick())
    wait_until(lambda: _promotions(rig, competing) == 2, timeout=5)  # started, refused, promoted, refused, promoted
    # it streams (its first quote); then a new competing login kills the stream (the fake IB tells both, in order)
    rig.ib.tell(InjectError(code=10197, conid=competing))
    wait_until(lambda: rig.router_events().count(("stream_demoted", competing)) == 3, timeout=5)
    _refused_again_at(rig, clock, competing, 30.0)  # 30 s again, not 120 s


def test_a_quote_among_a_socket_read_s_ticks_clears_the_contract_s_refusals_too() -> None:
    """The IB actor sends the ticks of one socket read as one MarketUpdates: the router's streaming hot path."""
    router = StreamRouter(
        MemoryLog(),  # type: ignore[arg-type]
        RouterSettings(max_lines=60, min_snapshot_lines=2),
        ib=pykka.ActorRef.__new__(pykka.ActorRef),  # never told: no stream is started here
        queue=pykka.ActorRef.__new__(pykka.ActorRef),
        handlers=HandlerSet([]),
        timer=False,
        clock=lambda: 1000.0,
    )
    router._refusals = {OPTIONS[0]: 2, OPTIONS[1]: 3}
    quote = MarketUpdate(conid=OPTIONS[1], source="stream", ts_us=1, bid=1.0, ask=1.1)
    router.on_receive(MarketUpdates(updates=[MarketUpdate(conid=STOCKS[0], source="stream", ts_us=1, last=5.0), quote]))
    assert router._refusals == {OPTIONS[0]: 2}


def test_a_stream_refused_past_ib_s_message_rate_is_streamed_again_after_a_short_pause(rig_factory: Any) -> None:
    """100 says nothing about the contract or the lines: no limit learned, no 60 s..1 h refusal backoff."""
    clock = ManualClock()
    rig = rig_factory(max_lines=8, reserve=2, clock=clock)
    rig.activate(*OPTIONS[:3])
    rig.settle()
    refused = OPTIONS[1]
    # what the IB actor says when IB answered the stream's reqMktData with 100 (see test_ib_pacing_errors.py)
    rig.router.tell(StreamEnded(conid=refused, reason="refused", code=100, ts_us=0))
    wait_until(lambda: ("stream_demoted", refused) in rig.router_events(), timeout=5)
    assert rig.status().line_cap is None  # nothing learned about lines
    clock.now += 1.0
    ask(rig.router, RouterTick())
    assert ("stream_promoted", refused) not in rig.router_events()  # not into the IB actor's pause
    clock.now += 1.5
    ask(rig.router, RouterTick())
    wait_until(lambda: ("stream_promoted", refused) in rig.router_events(), timeout=5)


def test_a_snapshot_s_101_does_not_demote_a_stream_of_the_same_contract(rig_factory: Any) -> None:
    """Only the stream's own StreamEnded ends a stream: an IbError carries the conid of snapshots too."""
    rig = rig_factory(max_lines=8, reserve=2)
    rig.activate(OPTIONS[0])
    rig.settle()
    rig.router.tell(IbError(code=101, kind=IbErrorKind.MAX_TICKERS, conid=OPTIONS[0], message="a snapshot's 101"))
    status = rig.settle()
    assert (status.streams, status.line_cap) == (1, None)
    assert "stream_demoted" not in [t for t, _ in rig.router_events()]


def test_after_other_clients_give_lines_back_the_limit_climbs_back_in_doubling_steps(rig_factory: Any) -> None:
    # 10 stream slots; probes 0.5 s apart below the peak. No settle window: the rig runs the squeeze below within
    # milliseconds of the level it follows, which a real squeeze never does (the window: test_line_ledger.py)
    rig = rig_factory(max_lines=12, reserve=2, line_probe_s=5.0, peak_settle_s=0.0)
    rig.activate(*OPTIONS[:9])
    rig.settle()
    wait_until(lambda: rig.status().proven_lines >= 9, timeout=5)  # held unrefused: proven by age
    rig.deactivate(*OPTIONS[3:9])
    rig.settle()
    rig.ib.tell(SetLineLimit(limit=4))  # another client of the account holds all but 4 lines
    rig.activate(*STOCKS[:4])  # the 4th line is given, the 5th refused: 4 learned, below the 9 this run held
    wait_until(lambda: rig.status().line_cap == 4, timeout=5)
    rig.ib.tell(SetLineLimit(limit=UNLIMITED))  # ...and gives them back
    rig.log.flush()

    def probes() -> list[int]:
        rig.status()
        rig.log.flush()
        return [s.event.limit for s in rig.log.read(streams=["router"]) if s.type == "router.line_limit_probed"]  # type: ignore[attr-defined]

    # a tenth of line_probe_s apart (line_probe_s itself would take 15 s for three), doubling while IB accepts,
    # never past the 9 lines once held
    wait_until(lambda: len(probes()) >= 3, timeout=10)
    assert probes()[:3] == [5, 7, 9]


def test_a_portfolio_mark_never_hides_how_old_the_market_data_is(rig_factory: Any) -> None:
    """IB's portfolio updates price every position without a line; counted as quotes they made the status
    line read 0.0 s for every contract each time they came (the demo sends them every 30 s)."""
    rig = rig_factory()
    quoted, marked_only = POSITIONS[-1].conid, POSITIONS[-2].conid
    never_priced = rig.status().ages["queue"]["never_priced"]
    now_us = time.time_ns() // 1000
    old = MarketUpdate(conid=quoted, source="queue", ts_us=now_us - 50_000_000, bid=1.0, ask=1.1)
    rig.router.tell(old)
    for conid in (quoted, marked_only):
        rig.router.tell(MarketUpdate(conid=conid, source="portfolio", ts_us=now_us, last=1.05))
    rows = {row.conid: row for row in ask(rig.router, ContractsQuery(), timeout=5).rows}
    assert (rows[quoted].source, rows[quoted].last_quote_us) == ("queue", old.ts_us)
    assert rows[marked_only].source == "portfolio"  # all there is of it: shown, with its source
    ages = rig.status().ages["queue"]
    assert ages["max_s"] >= 50  # the snapshot's age, not the mark's
    assert ages["never_priced"] == never_priced - 1  # the quoted one; a mark alone is not market data
    rig.router.tell(MarketUpdate(conid=marked_only, source="queue", ts_us=now_us, bid=1.0, ask=1.1))
    rig.router.tell(MarketUpdate(conid=marked_only, source="portfolio", ts_us=now_us + 1, last=1.05))
    rows = {row.conid: row for row in ask(rig.router, ContractsQuery(), timeout=5).rows}
    assert rows[marked_only].source == "queue"
    # the IB actor batches marks with the ticks of one socket read: the same holds for a batch
    rig.router.tell(MarketUpdates(updates=[MarketUpdate(conid=c, source="portfolio", ts_us=now_us + 2) for c in (quoted, marked_only)]))
    rows = {row.conid: row for row in ask(rig.router, ContractsQuery(), timeout=5).rows}
    assert (rows[quoted].source, rows[quoted].last_quote_us) == ("queue", old.ts_us)
    assert rows[marked_only].source == "queue"


def test_a_101_that_takes_back_the_peak_being_climbed_to_slows_the_next_probe_down() -> None:
    """Climbing back towards a peak (a tenth of line_probe_s apart) when a 101 shows that peak raced a refusal:
    the next probe waits a whole line_probe_s, even when the 101 teaches no lower limit."""
    now = [1000.0]
    router = StreamRouter(
        MemoryLog(),  # type: ignore[arg-type]
        RouterSettings(max_lines=60, min_snapshot_lines=2, line_probe_s=300.0),
        ib=pykka.ActorRef.__new__(pykka.ActorRef),  # never told: no stream is started here
        queue=pykka.ActorRef.__new__(pykka.ActorRef),
        handlers=HandlerSet([]),
        timer=False,
        clock=lambda: now[0],
    )
    router.ledger.learned = 40
    router.ledger.prove(45, now=now[0])  # just now: this burst's
    assert router.ledger.below_peak
    router._probe_step, router._next_probe = 4, now[0] + 30.0  # climbing fast
    router.ledger.lend(40, streams=0, now=now[0])  # 40 lines held when the 101 comes: no lower limit to learn
    now[0] += 1.0
    router._learn_limit("101 on a snapshot of 7")
    assert router.ledger.learned == 40
    assert not router.ledger.below_peak  # the peak is capped at what was held, 40
    assert router._next_probe == now[0] + 300.0
