"""The line ledger and the freshness helpers as pure objects: counting, the ramp, learning, ranking, ages."""

from __future__ import annotations

import datetime as dt

import pytest

from actors.freshness import NO_EXPIRY_DAYS, Rank, age_summary, days_to_expiry, outranks
from actors.line_ledger import LineLedger


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
    ledger.prove(50)
    assert ledger.snapshot_ceiling() == 56  # 50 + max(2, 50 // 8)
    assert len(ledger.lend(100, streams=50, now=0.0)) == 6
    ledger.prove(112)
    assert ledger.snapshot_ceiling() == 120  # never above max_lines


def test_a_refusal_teaches_what_is_still_held_and_only_lowers() -> None:
    ledger = LineLedger(max_lines=120, min_snapshot_lines=2)
    assert ledger.limit_after_refusal(streams=80) == 80
    ledger.learned = 80
    assert ledger.limit_after_refusal(streams=80) is None  # not lower: nothing to learn
    assert ledger.limit_after_refusal(streams=79) == 79
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
    ledger.prove(60)  # this run held 60 lines at once
    ledger.learned = 60
    assert not ledger.below_peak
    assert ledger.probe_target(step=8) == 68  # above the peak: the caller steps by one (tested in the router)
    ledger.learned = 5  # other clients of the account took lines for a while
    assert ledger.below_peak
    assert ledger.probe_target(step=1) == 6
    assert ledger.probe_target(step=16) == 21
    assert ledger.probe_target(step=64) == 60  # never past what this run proved
    ledger.learned = 100
    assert ledger.probe_target(step=4) is None  # at the ceiling
