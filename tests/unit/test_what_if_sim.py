"""The what-if simulator: the real router, queue and worker on simulated time against a replaying IB.

Each test builds a recorded period by hand, so what IB "did" is known, and
checks what the real scheduler makes of it, or how ages are defined.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np
import pytest

import actors.what_if_sim as what_if_sim
from actors.config import FreshnessSettings
from actors.what_if_report import figures_of_outcome, figures_of_record
from actors.what_if_sim import SimConfig, SimLoop, SimulationStuck, simulate
from storage.recorded_day import ActiveChange, OutageWindow, RecordedContract, RecordedDay, SnapshotSample

START_US = 1_780_000_000_000_000


def _day(
    seconds: float = 120.0,
    *,
    contracts: int = 40,
    active: int = 0,
    snapshots: dict[int, list[SnapshotSample]] | None = None,
    down: list[tuple[int, int]] | None = None,
    quotes: dict[int, np.ndarray] | None = None,
) -> RecordedDay:
    held = [
        RecordedContract(conid=1000 + i, symbol=f"S{i}", sec_type="STK", position=10.0, delta=None, appeared_us=START_US)
        for i in range(contracts)
    ]
    return RecordedDay(
        start_us=START_US,
        end_us=START_US + int(seconds * 1e6),
        max_lines=30,
        settings={},
        true_lines=None,
        learned_at_start=None,
        contracts=held,
        active_at_start={1000 + i: {"s": 0} for i in range(active)},
        active_changes=[],
        snapshots=snapshots if snapshots is not None else {c.conid: [SnapshotSample(0.5, "ok")] for c in held},
        interruptions_us=[],
        down=down or [],
        quotes=quotes or {},
    )


def _config(**fields: Any) -> SimConfig:
    """A configuration; keys of [freshness] (monitoring_s, ...) go into its FreshnessSettings."""
    fresh = {k: fields.pop(k) for k in list(fields) if k in FreshnessSettings.__struct_fields__}
    base = {"label": "t", "max_lines": 30, "true_lines": 30, "learned_at_start": None}
    return SimConfig(**(base | fields), freshness=FreshnessSettings(**fresh))


def test_the_replayed_ib_refuses_beyond_its_true_lines_and_the_real_router_learns_them() -> None:
    outcome = simulate(_day(active=30), _config(max_lines=30, true_lines=20))
    assert outcome.refusals_101 >= 1
    assert outcome.final_limit == 20  # taught by 101s; the next probe is line_probe_s away
    never_more = simulate(_day(active=30), _config(max_lines=30, true_lines=30))
    assert never_more.refusals_101 == 0
    assert never_more.final_limit == 30


def test_a_contract_whose_snapshots_fail_for_good_is_asked_once_not_stormed() -> None:
    day = _day(contracts=5)
    day.snapshots[1000] = [SnapshotSample(0.2, "terminal", 354)]  # no market data subscription
    outcome = simulate(day, _config())
    assert outcome.asked[1000] == 1  # dead-lettered at once
    assert 1000 not in outcome.quotes
    assert outcome.asked[1001] > 5  # the others keep being refreshed, stalest first


def test_while_no_runtime_ran_nothing_is_priced_and_streams_are_gone() -> None:
    down = (START_US + 40_000_000, START_US + 80_000_000)
    outcome = simulate(_day(active=5, down=[down]), _config(monitoring_s=10.0))
    snapshot_times = np.concatenate(list(outcome.quotes.values()))
    assert not ((snapshot_times > down[0]) & (snapshot_times < down[1])).any()
    assert (snapshot_times > down[1]).any()  # and after the reconnect, prices again
    for spans in outcome.streamed.values():
        assert all(b <= down[0] or a >= down[1] for a, b in spans)
    assert any(a >= down[1] for spans in outcome.streamed.values() for a, _ in spans)  # streams resubmitted


def test_snapshots_open_at_a_disconnect_come_back_and_are_asked_again_after_it() -> None:
    """As the IB actor answers every open snapshot "disconnected" at a drop, the replaying IB must too.

    Left unanswered, each such item would stay claimed until its 60 s lease ran out, and its contract
    would go unpriced that long after the reconnect (the replay staler than the day it replays).
    """
    down = (START_US + 40_000_000, START_US + 45_000_000)
    slow = {1000 + i: [SnapshotSample(5.0, "ok")] for i in range(40)}  # always some open at the drop
    outcome = simulate(_day(snapshots=slow, down=[down]), _config(monitoring_s=10.0))
    for conid, times in outcome.quotes.items():
        assert ((times > down[1]) & (times < down[1] + 30_000_000)).any(), conid


def test_the_replay_starts_from_the_queue_the_record_had_when_the_period_began() -> None:
    """What waited in the queue then (recovered at a start, or a mid-run backlog) is worked off in the replay."""
    from actors.queue_state import QueueState
    from events.queue import ItemEnqueued

    waiting = QueueState()
    waiting.apply(ItemEnqueued(item_id=7, conid=2000, priority=2, enqueued_us=START_US - 60_000_000, due_us=START_US - 1))
    day = _day(contracts=5)
    day.snapshots[2000] = [SnapshotSample(0.5, "ok")]
    assert simulate(day, _config()).asked.get(2000, 0) == 0  # no position, no queue item: never asked
    day.queue_at_start = waiting.dump()
    assert simulate(day, _config()).asked.get(2000, 0) >= 1


def test_a_replay_is_deterministic() -> None:
    first, second = simulate(_day(active=10), _config()), simulate(_day(active=10), _config())
    assert first.snapshots_sent == second.snapshots_sent
    assert first.loop_steps == second.loop_steps
    assert sorted(first.quotes) == sorted(second.quotes)
    assert all(np.array_equal(first.quotes[c], second.quotes[c]) for c in first.quotes)


def test_the_loop_reports_a_livelock_instead_of_hanging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(what_if_sim, "MAX_STEPS_AT_ONE_INSTANT", 1000)
    loop = SimLoop(START_US)

    def again(_: Any) -> None:
        loop.soon(again)

    loop.soon(again)
    with pytest.raises(SimulationStuck, match="time does not move on"):
        loop.run_until(10.0)


def test_a_quote_age_is_the_time_since_the_newest_quote_or_since_the_contract_appeared() -> None:
    """One contract over 100 s, quoted at 10 s and 50 s: ages rise 0-10, 0-40, 0-50; target 30 s is passed
    for 10 s (40 > 30 from 40 s to 50 s) and 20 s (from 80 s to 100 s)."""
    quotes = {1000: np.array([START_US + 10_000_000, START_US + 50_000_000], dtype=np.int64)}
    day = _day(100.0, contracts=1, quotes=quotes)
    figures = figures_of_record(day, monitoring_s=30.0, overflow_s=5.0)
    assert figures.other.max_s == pytest.approx(50.0, abs=0.1)
    assert figures.missed_contracts == 1
    assert figures.missed_s == pytest.approx(30.0, abs=0.2)
    assert figures.active.p99_s is None
    assert figures.streamed_share is None


def test_a_replayed_stream_counts_as_fresh_and_a_never_priced_contract_as_stale() -> None:
    day = _day(60.0, contracts=2, active=1, snapshots={})
    day.snapshots[1001] = [SnapshotSample(100.0, "ok")]  # never answers within the period (times out at 11 s)
    outcome = simulate(day, _config(snapshot_timeout_s=11.0))
    figures = figures_of_outcome(day, outcome)
    assert figures.streamed_share is not None
    assert figures.streamed_share > 0.95
    assert figures.active.p99_s is not None
    assert figures.active.p99_s <= 1.5
    assert figures.other.max_s is not None
    assert figures.other.max_s > 50


def test_a_backlog_of_monitoring_contracts_does_not_hold_active_contracts_without_a_line_back() -> None:
    """Found with what-if on a demo day: every position priced by the portfolio at connect fell due together
    60 s later, and the 5 s-target active contracts waiting for a line queued behind that whole backlog (35 s
    old). When both are late, claims now alternate between them: neither waits for the other's backlog."""
    day = _day(180.0, contracts=150, active=30)
    day.portfolio = {c.conid: np.array([START_US + 1_000_000], dtype=np.int64) for c in day.contracts}
    for samples in day.snapshots.values():
        samples[:] = [SnapshotSample(1.0, "ok")]
    # 20 lines: 18 stream slots for 30 active contracts, 2 snapshot lines at 1 s each: ~2 snapshots/s
    outcome = simulate(day, _config(max_lines=20, true_lines=20, learned_at_start=20))
    overflow = [c for c in range(1000, 1030) if not outcome.streamed.get(c)]
    assert len(overflow) >= 10
    after = START_US + 60_000_000  # the monitoring backlog falls due at ~61 s
    worst_overflow_gap = 0.0
    for conid in overflow:
        quotes = np.sort(outcome.quotes.get(conid, np.empty(0, dtype=np.int64)))
        edges = np.concatenate(([after], quotes[quotes > after], [day.end_us]))
        worst_overflow_gap = max(worst_overflow_gap, float(np.diff(edges).max()) / 1e6)
    assert worst_overflow_gap < 20.0, worst_overflow_gap  # 12 contracts at ~1 claim/s each way: ~12 s a round
    # and the monitoring backlog is still worked off meanwhile, at about every other claim (~1/s)
    monitoring_priced = [c for c in range(1030, 1150) if len(outcome.quotes.get(c, ())) > 0]
    assert len(monitoring_priced) >= 90, len(monitoring_priced)


def test_a_stepped_replay_sends_as_many_snapshots_and_ages_them_within_its_step() -> None:
    """step_s: the replayed worker sends a step's worth together, so fewer loop steps, the same budget spent,
    and no contract's newest quote more than a step (plus a snapshot) older than in the exact replay."""
    day = _day(seconds=300.0, contracts=120)
    exact = simulate(day, _config(max_snapshot_msgs_per_s=10.0))
    stepped = simulate(day, _config(max_snapshot_msgs_per_s=10.0, step_s=1.0))
    assert stepped.config.batch == 10
    assert stepped.loop_steps < 0.8 * exact.loop_steps
    assert abs(stepped.snapshots_sent - exact.snapshots_sent) <= 10  # the budget is spent either way
    fig_exact, fig_stepped = figures_of_outcome(day, exact), figures_of_outcome(day, stepped)
    assert fig_exact.other.p99_s is not None
    assert fig_stepped.other.p99_s is not None
    assert abs(fig_stepped.other.p99_s - fig_exact.other.p99_s) <= 1.0 + 0.5


def test_a_step_longer_than_the_bucket_holds_still_sends() -> None:
    """A 3 s step at 10/s is 30 snapshots, but the bucket holds a second's worth: the batch waits for 10."""
    day = _day(seconds=60.0, contracts=40)
    one_s = simulate(day, _config(max_snapshot_msgs_per_s=10.0, step_s=1.0))
    three_s = simulate(day, _config(max_snapshot_msgs_per_s=10.0, step_s=3.0))
    assert three_s.config.batch == 30
    assert three_s.snapshots_sent == pytest.approx(one_s.snapshots_sent, abs=10)


def test_a_disconnect_is_known_to_the_worker_before_it_reads_the_snapshots_it_cut() -> None:
    """Each outage cuts the open snapshots; the worker hears of the outage first and asks for nothing more until
    IB is back. (Reading the cut answers first, it asked again at once, was refused at once, and asked again, a
    call deeper each time, until its token bucket ran dry: a burst at every outage.)"""
    outages = [(START_US + int((30 + 20 * k) * 1e6), START_US + int((30.3 + 20 * k) * 1e6)) for k in range(8)]
    day = _day(seconds=200.0, contracts=200, down=outages)
    outcome = simulate(day, _config(max_lines=20, true_lines=20, monitoring_s=5.0, max_snapshot_msgs_per_s=20.0))
    assert outcome.snapshots_sent > 2000  # busy: snapshots were open at every outage
    assert outcome.extra["asked_while_down"] == 0


class _AsyncioLikeLoop:
    """Just what actors.ib_pacing.Pacer uses of an asyncio loop (time, call_at), on a clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0
        self._timers: list[tuple[float, int, Any]] = []
        self._order = 0

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Any) -> Any:
        self._order += 1
        entry = [when, self._order, callback, False]
        self._timers.append(entry)  # type: ignore[arg-type]

        class Handle:
            def cancel(self) -> None:
                entry[3] = True

        return Handle()

    def advance(self, to: float) -> None:
        """Run every timer due up to ``to``, in time order, with the clock at each one's time."""
        while True:
            due = sorted((t for t in self._timers if not t[3] and t[0] <= to), key=lambda t: (t[0], t[1]))
            if not due:
                break
            timer = due[0]
            timer[3] = True
            # as asyncio's clock, a little past the time asked for: the pacer's "left the window" test is
            # exact arithmetic on floats, and at the very instant it can miss by a rounding and ask again
            self.now = max(self.now, timer[0] + 1e-9)
            timer[2]()
        self.now = to


@pytest.mark.parametrize("seed", range(20))
def test_the_paced_wire_sends_each_message_when_the_ib_actors_pacer_does(seed: int) -> None:
    """PacedWire works a departure out at once; the runtime's Pacer sends by timer. Bursts, gaps and a dropped
    connection (whatever was queued never leaves, what left still counts) give the same send times."""
    import random

    from actors.ib_pacing import Pacer

    rng = random.Random(seed)
    loop = _AsyncioLikeLoop()
    sent: list[float] = []
    pacer = Pacer(loop, lambda payload: sent.append(loop.time()), 10, window_s=1.1)  # type: ignore[arg-type]
    wire = what_if_sim.PacedWire(10, 1.1)
    expected: list[float] = []
    t = 0.0
    for _ in range(300):
        t += rng.choice([0.0, 0.0, 0.001, 0.05, 0.3, 2.0])
        loop.advance(t)
        if rng.random() < 0.05:  # the socket goes down: both forget what was still queued
            pacer.clear()
            wire.clear(t)
            expected = [d for d in expected if d <= t]
            continue
        pacer.submit(b"m")
        expected.append(wire.depart(t))
    loop.advance(t + 100.0)
    assert len(sent) == len(expected)
    assert sent == pytest.approx(expected, abs=1e-6)
    assert min(b - a for a, b in zip(expected, expected[10:], strict=False)) >= 1.1 - 1e-9  # never 11 in a window
    assert max(b - a for a, b in itertools.pairwise(expected)) > 0  # and bursts did queue


def _paced(**fields: Any) -> SimConfig:
    return _config(pacing_per_s=45.0, pacing_window_s=1.1, **fields)


def _burst_day(actives: int, *, at_s: float = 5.0) -> RecordedDay:
    """Sixty contracts, of which ``actives`` become active at the same instant (a strategy switched on)."""
    day = _day(seconds=40.0, contracts=60)
    ts = START_US + int(at_s * 1e6)
    day.active_changes = [
        ActiveChange(ts, 1000 + i, "burst", kind) for i in range(actives) for kind in ("leg_added", "activated")
    ]
    return day


def test_a_burst_of_subscribes_reaches_the_replayed_ib_as_the_pacer_lets_it_leave() -> None:
    """55 contracts activated at once on a gateway: IB gets the subscribes at 45 in any 1.1 s (the IB actor's
    pacer), so the streams start over more than a second; the demo's fake IB, without a pacer, starts them all
    at once."""
    day = _burst_day(55)
    starts = {}
    for name, config in (
        ("paced", _paced(max_lines=100, true_lines=100)),
        ("fake", _config(max_lines=100, true_lines=100)),
    ):
        outcome = simulate(day, config)
        firsts = sorted(spans[0][0] for spans in outcome.streamed.values())
        assert len(firsts) == 55
        starts[name] = (firsts[-1] - firsts[0]) / 1e6
    assert starts["fake"] == 0.0
    assert starts["paced"] >= 1.0


def test_a_burst_beyond_the_true_lines_is_refused_as_it_reaches_ib_and_the_limit_learned_from_the_refusals() -> None:
    """The runtime meets IB's limit in a burst with more requests already in the pacer than IB will take, so
    several are refused before the router has shed enough (22 on a day recorded against the TWS simulator);
    answered at once, the first refusal would teach it all."""
    day = _burst_day(55)
    paced = simulate(day, _paced(max_lines=60, true_lines=30))
    fake = simulate(day, _config(max_lines=60, true_lines=30))
    assert fake.refusals_101 == 1
    assert paced.refusals_101 > 5
    assert paced.final_limit == fake.final_limit == 30


def test_snapshot_requests_still_in_the_pacer_at_a_disconnect_are_answered_and_never_reach_ib() -> None:
    """Fifty snapshots asked at once through a pacer of ten a second: ten reach IB, forty wait. The socket goes
    down: every one of the fifty is answered "disconnected" (the worker gets its lines and items back), and
    none of the forty reaches IB later."""
    from actors.what_if_sim import ReplayingIb, Settled
    from actors.worker import _Answer
    from events.ib import IbErrorKind, Snapshot

    loop = SimLoop(START_US)
    ib = ReplayingIb(
        loop, _day(contracts=50), true_lines=100, snapshot_timeout_s=11.0, wire=what_if_sim.PacedWire(10, 1.0)
    )
    answers: list[Any] = []

    def step(answer: Any) -> None:
        answers.append(answer.future.get())

    for conid in range(1000, 1050):
        reply = Settled()
        ib.ask_then(Snapshot(conids=[conid]), reply, _Answer(lambda _: None, step, reply))  # type: ignore[arg-type]
    loop.run_until(0.1)
    assert sum(ib.asked.values()) == 10
    assert len(ib.queued_snapshots) == 40
    ib.disconnect([])
    loop.run_until(30.0)
    assert len(answers) == 50
    assert {a.failures[0].kind for a in answers} == {IbErrorKind.DISCONNECTED}
    assert sum(ib.asked.values()) == 10


def test_a_recorded_321_refuses_a_snapshot_then_and_the_replayed_worker_slows_down_as_the_runtimes_did() -> None:
    """IB refused snapshots for their rate at three moments of the day (321, released "rate_limited"): the replay
    refuses the first request reaching IB within a second after each, and the worker halves its rate each time, so
    fewer snapshots go out than on the same day without them. A 321 recorded while no snapshot is asked (here,
    during an outage) finds none within its second and is dropped."""
    plain = _day(seconds=120.0, contracts=200)
    limited = _day(seconds=120.0, contracts=200, down=[(START_US + 90_000_000, START_US + 100_000_000)])
    limited.rate_limited_us = [START_US + int(t * 1e6) for t in (20.0, 40.0, 60.0, 95.0)]
    plain.down = limited.down
    config = _config(max_lines=60, true_lines=60, monitoring_s=5.0, max_snapshot_msgs_per_s=20.0)
    without, with_321 = simulate(plain, config), simulate(limited, config)
    assert without.extra["refusals_321"] == 0
    assert with_321.extra["refusals_321"] == 3
    assert with_321.snapshots_sent < without.snapshots_sent - 50  # three halvings, each held rate_limit_hold_s


def test_a_stream_ib_refused_for_good_is_refused_in_the_replay_and_a_competing_session_only_near_its_time() -> None:
    """Contract 1000 had no market data subscription (10168 on its stream, and it was never snapshotted): the
    replayed IB refuses its streams and its snapshots, and it stays unpriced, as in the record. Contract 1001 met a
    competing live session (10197) once, when it was activated: that request is refused, and a later one is not."""
    day = _day(seconds=120.0, contracts=10)
    day.active_changes = [ActiveChange(START_US + 5_000_000, c, "s", kind) for c in (1000, 1001) for kind in ("leg_added", "activated")]
    day.stream_refusals = {1000: [(START_US + 5_100_000, 10168)], 1001: [(START_US + 5_100_000, 10197)]}
    day.snapshots = {c: s for c, s in day.snapshots.items() if c != 1000}
    outcome = simulate(day, _config(max_lines=30, true_lines=30))
    assert 1000 not in outcome.streamed
    assert 1000 not in outcome.quotes  # never priced: no stream, every snapshot refused for good
    assert outcome.asked[1000] >= 1
    assert outcome.streamed[1001][0][0] > START_US + 6_000_000  # streamed, after the refused first request


def test_a_contract_switched_off_while_its_subscribe_waits_in_the_pacer_is_cancelled_once_ib_has_it() -> None:
    """The IB actor marks the cancel pending and sends it once the stream is old enough; told "cancelled" at once
    instead, the replayed IB kept the stream open (a line held, quotes counted) to the end of the day."""
    day = _burst_day(55)
    off = [1050 + i for i in range(5)]  # the last of the burst: their subscribes are still in the pacer at 5.3 s
    day.active_changes += [ActiveChange(START_US + 5_300_000, c, "burst", k) for c in off for k in ("leg_removed", "deactivated")]
    outcome = simulate(day, _paced(max_lines=100, true_lines=100, min_stream_age_s=1.0))
    for conid in off:
        ends = [b for _, b in outcome.streamed.get(conid, [])]
        assert all(end <= START_US + 9_000_000 for end in ends), (conid, ends)


def test_the_replay_keeps_a_stream_as_long_as_the_ib_actors_minimum_age_before_cancelling_it() -> None:
    """Switched off 0.1 s after it was switched on: with [ib] min_stream_age_s 1 s the stream ticks until its cancel
    leaves at 1 s; with the demo's fake IB (0 s) it is cancelled before its first tick."""
    day = _day(seconds=30.0, contracts=5)
    changes = [(5_000_000, "leg_added"), (5_000_000, "activated"), (5_100_000, "leg_removed"), (5_100_000, "deactivated")]
    day.active_changes = [ActiveChange(START_US + t, 1000, "s", kind) for t, kind in changes]
    kept = simulate(day, _config(min_stream_age_s=1.0)).streamed.get(1000, [])
    at_once = simulate(day, _config(min_stream_age_s=0.0)).streamed.get(1000, [])
    assert [b - START_US for _, b in kept] == [6_000_000]
    assert at_once == []


def _asked_at_once(ib: Any, loop: SimLoop, conids: range) -> list[tuple[float, Any]]:
    """Ask ReplayingIb for a snapshot of each conid at the loop's current instant; returns (time, answer) as they come."""
    from actors.what_if_sim import Settled
    from actors.worker import _Answer
    from events.ib import Snapshot

    answers: list[tuple[float, Any]] = []
    for conid in conids:
        reply = Settled()
        step = lambda a: answers.append((loop.now, a.future.get()))  # noqa: E731
        ib.ask_then(Snapshot(conids=[conid]), reply, _Answer(lambda _: None, step, reply))
    return answers


def test_a_snapshot_delayed_in_the_pacer_is_answered_its_recorded_latency_after_the_ask_not_after_the_wait() -> None:
    """A recorded latency runs from the claim and already holds the recorded run's own wait in the pacer: twenty
    asked at once through ten a second, with 1.5 s recorded, all answer at 1.5 s (the ten that left at 1 s too),
    not the second ten at 2.5 s."""
    from actors.what_if_sim import ReplayingIb

    loop = SimLoop(START_US)
    day = _day(contracts=20, snapshots={1000 + i: [SnapshotSample(1.5, "ok")] for i in range(20)})
    ib = ReplayingIb(loop, day, true_lines=100, snapshot_timeout_s=11.0, wire=what_if_sim.PacedWire(10, 1.0))
    answers = _asked_at_once(ib, loop, range(1000, 1020))
    loop.run_until(10.0)
    assert [t for t, _ in answers] == [1.5] * 20
    assert all(a.updates for _, a in answers)


def test_a_snapshot_still_in_the_pacer_at_its_deadline_is_withdrawn_and_times_out_unsent() -> None:
    """Forty asked at once through ten a second with a 2 s deadline: thirty leave by 2 s and are answered; the IB
    actor withdraws the last ten from the pacer at their deadline, so they time out then and never reach IB."""
    from actors.what_if_sim import ReplayingIb
    from events.ib import IbErrorKind

    loop = SimLoop(START_US)
    day = _day(contracts=40, snapshots={1000 + i: [SnapshotSample(0.1, "ok")] for i in range(40)})
    ib = ReplayingIb(loop, day, true_lines=100, snapshot_timeout_s=2.0, wire=what_if_sim.PacedWire(10, 1.0))
    answers = _asked_at_once(ib, loop, range(1000, 1040))
    loop.run_until(10.0)
    timed_out = [t for t, a in answers if a.failures and a.failures[0].kind == IbErrorKind.TIMEOUT]
    assert timed_out == [2.0] * 10
    assert sum(1 for _, a in answers if a.updates) == 30
    assert sum(ib.asked.values()) == 30


def test_a_contract_switched_on_again_while_its_cancel_is_pending_streams_again_after_the_cancel() -> None:
    """On at 5.0 s, off at 5.1 s, on at 5.2 s, with a 1 s minimum stream age: the IB actor lets the cancel go at
    6.0 s (its StreamEnded is promised) and subscribes again behind it, so the contract streams on to the end. Taken
    as a duplicate, the second subscribe was dropped and the stream ended at the cancel."""
    day = _day(seconds=30.0, contracts=5)
    changes = [(5_000_000, "leg_added"), (5_000_000, "activated"), (5_100_000, "leg_removed"), (5_100_000, "deactivated")]
    changes += [(5_200_000, "leg_added"), (5_200_000, "activated")]
    day.active_changes = [ActiveChange(START_US + t, 1000, "s", kind) for t, kind in changes]
    spans = simulate(day, _config(min_stream_age_s=1.0)).streamed.get(1000, [])
    assert [(a - START_US, b - START_US) for a, b in spans] == [(5_300_000, 6_000_000), (6_300_000, 30_000_000)]


def _refusals_after_the_burst(day_s: float) -> tuple[int, int]:
    """(101s, of which after the first minute) on a gateway day whose burst met IB's limit, 30 of 60 lines."""
    day = _burst_day(55)
    day.end_us = START_US + int(day_s * 1e6)
    burst = simulate(dataclasses.replace(day, end_us=START_US + 60_000_000), _paced(max_lines=60, true_lines=30))
    whole = simulate(day, _paced(max_lines=60, true_lines=30))
    return whole.refusals_101, whole.refusals_101 - burst.refusals_101


def test_after_a_burst_met_the_limit_the_router_probes_for_more_lines_every_line_probe_s_not_a_tenth_of_it() -> None:
    """In the burst, levels counted with requests still in the IB actor's pacer were proven before IB's 101s for
    them came back. Kept as the run's peak, they made the learned limit look like lines taken by another client,
    and the router probed towards them every 30 s all day, each probe refused (a 101, a stream demoted)."""
    probe_s = FreshnessSettings().line_probe_s
    total, after = _refusals_after_the_burst(20 * 60.0)
    assert total > after > 0  # the burst's refusals, then the probes'
    assert after <= (20 * 60.0 - 60.0) / probe_s + 1, (total, after)


def test_a_contracts_outage_window_keeps_its_snapshots_silent_and_only_its_own() -> None:
    """A recorded farm outage (snapshots excused, 2103) is replayed for the contracts it was recorded for: theirs
    hold a line until the timeout and get no price inside their windows, the others' are served as usual, and
    they are quoted again after it. Replayed as blips (every contract's snapshot cut), the others would go stale.
    """
    silent = range(1000, 1010)  # ten of forty contracts on the farm that was down, from 60 s to 180 s
    window = [OutageWindow(START_US + 60_000_000, START_US + 180_000_000, 11.0, 2103)]
    day = dataclasses.replace(_day(300.0), outages={c: window for c in silent})
    outcome = simulate(day, _config(monitoring_s=30.0))
    for conid, times in outcome.quotes.items():
        inside = [t for t in times if START_US + 61_000_000 < t <= START_US + 180_000_000]
        if conid in silent:
            assert inside == [], conid  # no price while its data was away
            assert times.max() > START_US + 180_000_000  # asked again, and priced, after the window
        else:
            gaps = np.diff(np.concatenate(([START_US], times, [START_US + 300_000_000])))
            assert gaps.max() <= 40_000_000, (conid, gaps.max())  # its 30 s target, and a snapshot cycle
    assert outcome.asked[1000] < outcome.asked[1020]  # the stalest, yet asked less: held after each try, no storm


def test_a_recorded_farm_back_lifts_the_holds_as_the_runtimes_farm_ok_did() -> None:
    """The runtime's worker lifted its holds at IB's "farm OK" (2104), and the contract was quoted at once. The log
    keeps no 2104; the window's ``back_us`` (the claim of the contract's next quote) stands for it. Without it the
    replay's holds, doubled to a minute through the outage, ran out by themselves: up to a minute staler than the
    runtime was, for every contract of the farm."""
    silent = range(1000, 1010)
    window = [OutageWindow(START_US + 60_000_000, START_US + 180_000_000, 11.0, 2103, START_US + 181_000_000)]
    day = dataclasses.replace(_day(300.0), outages={c: window for c in silent})
    outcome = simulate(day, _config(monitoring_s=30.0))
    for conid in silent:
        times = outcome.quotes[conid]
        assert times[times > START_US + 180_000_000].min() <= START_US + 200_000_000, conid  # not ~248 s: held a minute
