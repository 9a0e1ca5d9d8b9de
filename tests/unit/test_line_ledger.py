"""The line ledger and the freshness helpers as pure objects: counting, the ramp, learning, ranking, ages."""

from __future__ import annotations

import datetime as dt

import pytest

from actors.freshness import NO_EXPIRY_DAYS, Rank, age_summary, days_to_expiry, outranks
from actors.line_ledger import PEAK_SETTLE_S, LineLedger


def test_streams_never_take_the_snapshot_lines_and_snapshots_take_the_rest() -> None:
    ledger = LineLedger(max_lines=10, min_snapshot_lines=2)
    ledger.learned = 10  # known limit: no ramp
    assert ledger.stream_slots == 8
    assert ledger.stream_room(7)
    assert not ledger.stream_room(8)
    lent = ledger.lend(5, streams=6, now=0.0)
    assert len(lent) == 4  # 10 lines, 6 streaming: every other line serves snapshots
    assert [line.level for line in lent] == [7, 8, 9, 10]
    assert ledger.lines_free(6) == 0
    assert not ledger.stream_room(6)  # every line is held: a stream waits, even below its slots
    ledger.give_back(lent[0].line_id)
    assert ledger.lines_held(6) == 9
    assert ledger.stream_room(6)


def test_before_any_101_snapshot_lines_ramp_above_the_proven_level() -> None:
    ledger = LineLedger(max_lines=120, min_snapshot_lines=2, ramp_step=2)
    assert ledger.snapshot_ceiling() == 4  # nothing proven: min_snapshot_lines + the step
    ledger.prove(50, now=0.0)
    assert ledger.snapshot_ceiling() == 56  # 50 + max(2, 50 // 8)
    assert len(ledger.lend(100, streams=50, now=0.0)) == 6
    ledger.prove(112, now=1.0)
    assert ledger.snapshot_ceiling() == 120  # never above max_lines


def test_a_refusal_teaches_what_is_still_held_and_only_lowers() -> None:
    ledger = LineLedger(max_lines=120, min_snapshot_lines=2)
    assert ledger.limit_after_refusal(streams=80, now=0.0) == 80
    ledger.learned = 80
    assert ledger.limit_after_refusal(streams=80, now=0.0) is None  # not lower: nothing to learn
    assert ledger.limit_after_refusal(streams=79, now=0.0) == 79
    assert ledger.probe_target() == 81
    ledger.learned = 120
    assert ledger.probe_target() is None  # at the ceiling: nothing to probe


def test_lines_never_given_back_are_found_as_overdue() -> None:
    ledger = LineLedger(max_lines=10, min_snapshot_lines=2)
    ledger.learned = 10
    old = ledger.lend(1, streams=0, now=0.0)[0]
    ledger.lend(1, streams=0, now=100.0)
    assert ledger.overdue(now=130.0, max_age_s=60.0) == [old]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="min_snapshot_lines"):
        LineLedger(max_lines=2, min_snapshot_lines=2)


def test_rank_orders_priority_then_expiry_then_risk() -> None:
    ranks = [
        Rank(priority=0, days=NO_EXPIRY_DAYS, risk=1e6, conid=1),
        Rank(priority=0, days=3, risk=10.0, conid=2),
        Rank(priority=0, days=3, risk=50.0, conid=3),
        Rank(priority=5, days=NO_EXPIRY_DAYS, risk=0.0, conid=4),
    ]
    assert [r.conid for r in sorted(ranks, key=Rank.key)] == [4, 3, 2, 1]


def test_a_line_changes_hands_only_for_a_material_difference() -> None:
    holder = Rank(priority=0, days=10, risk=100.0, conid=1)
    assert outranks(Rank(priority=1, days=99, risk=0.0, conid=2), holder, 2.0)  # higher priority
    assert outranks(Rank(priority=0, days=9, risk=0.0, conid=2), holder, 2.0)  # nearer expiry
    assert not outranks(Rank(priority=0, days=10, risk=150.0, conid=2), holder, 2.0)  # 1.5x risk: hysteresis
    assert outranks(Rank(priority=0, days=10, risk=250.0, conid=2), holder, 2.0)
    assert not outranks(Rank(priority=-1, days=0, risk=1e9, conid=2), holder, 2.0)  # lower priority never


def test_days_to_expiry_reads_ib_dates() -> None:
    today = dt.date(2026, 11, 30)
    assert days_to_expiry("20261204", today) == 4
    assert days_to_expiry("202612", today) == 28
    assert days_to_expiry("20261101", today) == 0  # expired: as urgent as can be
    assert days_to_expiry("", today) == NO_EXPIRY_DAYS
    assert days_to_expiry("garbage!", today) == NO_EXPIRY_DAYS


def test_age_summary_counts_the_never_priced_apart() -> None:
    summary = age_summary([1.0, 2.0, None, 3.0, 10.0])
    le = summary.pop("le")
    assert summary == {"count": 5, "never_priced": 1, "p50_s": 2.0, "p99_s": 10.0, "max_s": 10.0}
    assert (le["1"], le["5"], le["15"], le["900"]) == (1, 3, 4, 4)  # cumulative; the unpriced one in none
    empty = age_summary([])
    assert (empty["count"], empty["max_s"], set(empty["le"].values())) == (0, 0.0, {0})


def test_below_the_peak_this_run_held_the_probe_may_climb_back_in_bigger_steps() -> None:
    ledger = LineLedger(max_lines=100, min_snapshot_lines=2)
    ledger.prove(60, now=0.0)  # this run held 60 lines at once
    ledger.learned = 60
    assert not ledger.below_peak
    assert ledger.probe_target(step=8) == 68  # above the peak: the caller steps by one (tested in the router)
    assert ledger.limit_after_refusal(streams=5, now=600.0) == 5  # ten minutes on: other clients took lines
    ledger.learned = 5
    assert ledger.below_peak
    assert ledger.probe_target(step=1) == 6
    assert ledger.probe_target(step=16) == 21
    assert ledger.probe_target(step=64) == 60  # never past what this run proved
    ledger.learned = 100
    assert ledger.probe_target(step=4) is None  # at the ceiling


def test_a_peak_proven_just_before_a_101_is_capped_at_what_ib_accepted_an_older_one_is_kept() -> None:
    ledger = LineLedger(max_lines=60, min_snapshot_lines=2)
    ledger.prove(40, now=0.0)  # held for minutes: this run's real level
    ledger.prove(45, now=100.0)
    ledger.prove(50, now=101.0)  # in a burst: counted with requests still on their way to IB
    assert ledger.limit_after_refusal(streams=44, now=101.5) == 44  # ... one of which IB refused
    assert ledger.peak_proven == 44
    ledger.learned = 44
    assert not ledger.below_peak  # no faster probing towards a level IB never held
    assert ledger.limit_after_refusal(streams=30, now=101.6) == 30  # a lower count, still in the burst
    assert ledger.peak_proven == 40  # never below what stood before the burst
    ledger.learned = 30
    assert ledger.below_peak
    ledger.prove(44, now=200.0)
    assert ledger.limit_after_refusal(streams=30, now=200.0 + PEAK_SETTLE_S + 1) is None  # not a race: a squeeze
    assert ledger.peak_proven == 44


def test_lines_and_streams_counted_with_a_refused_request_prove_no_more_than_ib_accepted() -> None:
    ledger = LineLedger(max_lines=60, min_snapshot_lines=2)
    ledger.learned = 47  # probes: two lines more than the 45 proven
    ledger.unproven.update({9: 45, 7: 46})  # streams started in that order, IB's answers not back yet
    (line,) = ledger.lend(1, streams=46, now=0.0)  # a snapshot line lent counting both
    assert line.level == 47
    del ledger.unproven[9]  # IB refused stream 9 (101): the router demotes it
    assert ledger.limit_after_refusal(streams=45, now=0.2) == 46  # stream 7 and the snapshot line are held
    assert (line.level, ledger.unproven[7]) == (46, 46)
    ledger.give_back(line.line_id)  # the snapshot ends, then IB refuses stream 7 too: a stream started counting it
    ledger.unproven[8] = 47
    del ledger.unproven[7]
    assert ledger.limit_after_refusal(streams=45, now=0.3) == 45
    assert ledger.unproven[8] == 45
    ledger.prove(ledger.unproven.pop(8), now=1.5)  # its first tick: no more than IB accepted
    assert ledger.peak_proven == 45
