"""Reconciliation: each mismatch kind, recorded once when it appears or changes, resolved when it clears."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pykka
import pytest

from actors.messaging import CommandRejected, ask
from actors.reconciliation import Reconciliation, ReconciliationConfig, ReconciliationState
from events.base import Event
from events.ib import MarketUpdate, PositionChanged, PositionsComplete
from events.queue import QueueStats
from events.reconciliation import (
    ListMismatches,
    MismatchKind,
    Reconcile,
    ReconciliationMismatch,
    ReconciliationReport,
    ReconciliationResolved,
)
from events.registry import ContractActivated, ContractDeactivated, LegAdded, LegRemoved
from storage.event_log import EventLog
from storage.snapshots import SnapshotStore
from tests.conftest import TEST_LOG_CONFIG

NO_POSITION = MismatchKind.NO_POSITION
CHANGED = MismatchKind.POSITION_CHANGED
QUANTITY = MismatchKind.QUANTITY_MISMATCH
#: No periodic ticker: every judgement in these tests is caused by a message.
CONFIG = ReconciliationConfig(reconcile_interval_s=None)


def start(log: EventLog, snapshots: SnapshotStore | None = None) -> pykka.ActorRef[Any]:
    return Reconciliation.start(log, snapshots, config=CONFIG)


def activate(ref: pykka.ActorRef[Any], conid: int, strategy: str = "s1", expected: float | None = None) -> None:
    """What the registry tells when a strategy takes a contract that was not active."""
    ref.tell(LegAdded(conid=conid, strategy=strategy, expected_quantity=expected))
    ref.tell(ContractActivated(conid=conid, strategy=strategy))


def pos(conid: int, qty: float, account: str = "DU1") -> PositionChanged:
    return PositionChanged(account=account, conid=conid, symbol="X", sec_type="STK", position=qty, avg_cost=1.0)


def settle(ref: pykka.ActorRef[Any]) -> ReconciliationReport:
    """Everything told before is handled and its events durable once this answers (mailbox order)."""
    return ask(ref, ListMismatches())


def recorded(log: EventLog) -> list[Event]:
    return [stored.event for stored in log.read(streams=["reconciliation"])]


def kinds(events: list[Event]) -> list[tuple[str, int, MismatchKind]]:
    return [(type(e).__name__, e.conid, e.kind) for e in events]  # type: ignore[attr-defined]


def test_no_position_is_judged_only_once_positions_are_complete(event_log: EventLog) -> None:
    ref = start(event_log)
    activate(ref, 1)
    ref.tell(pos(2, 5))
    assert settle(ref).open == []  # IB may still be sending positions
    ref.tell(PositionsComplete())
    report = settle(ref)
    assert report.positions_complete
    assert [(m.conid, m.kind, m.actual, m.strategies) for m in report.open] == [(1, NO_POSITION, 0.0, ["s1"])]
    assert kinds(recorded(event_log)) == [("ReconciliationMismatch", 1, NO_POSITION)]


def test_activating_a_contract_without_position_after_positions_are_known(event_log: EventLog) -> None:
    ref = start(event_log)
    ref.tell(PositionsComplete())
    activate(ref, 3, expected=10)
    (mismatch,) = settle(ref).open
    assert (mismatch.kind, mismatch.expected, mismatch.actual) == (NO_POSITION, 10.0, 0.0)
    # a zero position reported explicitly is the same condition, not a new one
    ref.tell(pos(3, 0))
    settle(ref)
    assert kinds(recorded(event_log)) == [("ReconciliationMismatch", 3, NO_POSITION)]


def test_repeats_record_nothing_and_a_fix_resolves(event_log: EventLog) -> None:
    ref = start(event_log)
    activate(ref, 1)
    ref.tell(PositionsComplete())
    for _ in range(3):
        ref.tell(Reconcile())
        ref.tell(PositionsComplete())
    assert len(ask(ref, Reconcile()).open) == 1
    assert len(recorded(event_log)) == 1
    ref.tell(pos(1, 5))
    assert settle(ref).open == []
    assert kinds(recorded(event_log)) == [
        ("ReconciliationMismatch", 1, NO_POSITION),
        ("ReconciliationMismatch", 1, CHANGED),  # 0 -> 5 on an active contract
        ("ReconciliationResolved", 1, NO_POSITION),
    ]


def test_a_strategy_that_expects_to_be_flat_is_no_mismatch(event_log: EventLog) -> None:
    ref = start(event_log)
    ref.tell(PositionsComplete())
    activate(ref, 1, expected=0)
    assert settle(ref).open == []
    ref.tell(pos(1, 2))
    (mismatch,) = settle(ref).open
    assert (mismatch.kind, mismatch.expected, mismatch.actual) == (QUANTITY, 0.0, 2.0)


def test_position_change_on_an_active_contract_is_recorded_once_per_change(event_log: EventLog) -> None:
    ref = start(event_log)
    ref.tell(pos(1, 10))  # first report: the baseline, not a change
    activate(ref, 1)
    ref.tell(pos(1, 10))  # IB repeating itself
    ref.tell(pos(1, 15))
    ref.tell(pos(1, 15))
    ref.tell(pos(9, 1))
    ref.tell(pos(9, 2))  # not active: nobody's business
    settle(ref)
    events = recorded(event_log)
    assert kinds(events) == [("ReconciliationMismatch", 1, CHANGED)]
    change = events[0]
    assert isinstance(change, ReconciliationMismatch)
    assert (change.previous, change.actual, change.strategies) == (10.0, 15.0, ["s1"])
    assert settle(ref).open == []  # a notice, not an open condition


def test_quantity_mismatch_against_the_strategies_that_set_one(event_log: EventLog) -> None:
    ref = start(event_log)
    activate(ref, 1, "s1", expected=100)
    ref.tell(LegAdded(conid=1, strategy="s2", expected_quantity=50))
    ref.tell(LegAdded(conid=1, strategy="s3"))  # sets no expectation: not counted
    ref.tell(pos(1, 120))
    (mismatch,) = settle(ref).open
    assert (mismatch.kind, mismatch.expected, mismatch.actual) == (QUANTITY, 150.0, 120.0)
    assert mismatch.strategies == ["s1", "s2", "s3"]

    ref.tell(pos(1, 120))
    ref.tell(Reconcile())
    settle(ref)
    assert len(recorded(event_log)) == 1  # no duplicate

    ref.tell(pos(1, 130))  # changed: recorded again with the new actual
    (mismatch,) = settle(ref).open
    assert mismatch.actual == 130.0

    ref.tell(LegRemoved(conid=1, strategy="s2"))  # expectation now 100
    (mismatch,) = settle(ref).open
    assert mismatch.expected == 100.0

    ref.tell(pos(1, 100))
    assert settle(ref).open == []
    assert kinds(recorded(event_log)) == [
        ("ReconciliationMismatch", 1, QUANTITY),
        ("ReconciliationMismatch", 1, CHANGED),
        ("ReconciliationMismatch", 1, QUANTITY),
        ("ReconciliationMismatch", 1, QUANTITY),
        ("ReconciliationMismatch", 1, CHANGED),
        ("ReconciliationResolved", 1, QUANTITY),
    ]


def test_positions_are_summed_over_accounts(event_log: EventLog) -> None:
    ref = start(event_log)
    activate(ref, 1, expected=30)
    ref.tell(pos(1, 10, account="DU1"))
    ref.tell(pos(1, 20, account="DU2"))
    settle(ref)
    assert ask(ref, Reconcile()).open == []
    assert kinds(recorded(event_log)) == [
        ("ReconciliationMismatch", 1, QUANTITY),  # 10 of 30 after the first account
        ("ReconciliationMismatch", 1, CHANGED),
        ("ReconciliationResolved", 1, QUANTITY),
    ]


def test_deactivation_resolves_open_conditions(event_log: EventLog) -> None:
    ref = start(event_log)
    ref.tell(PositionsComplete())
    activate(ref, 1)
    activate(ref, 2, expected=5)
    ref.tell(pos(2, 3))
    assert len(settle(ref).open) == 2
    ref.tell(LegRemoved(conid=1, strategy="s1"))
    ref.tell(ContractDeactivated(conid=1, strategy="s1"))
    ref.tell(ContractDeactivated(conid=2, strategy="s1"))
    assert settle(ref).open == []
    resolved = [
        (e.conid, e.kind)
        for e in recorded(event_log)
        if isinstance(e, ReconciliationResolved) and e.detail == "contract no longer active"
    ]
    assert sorted(resolved) == [(1, NO_POSITION), (2, QUANTITY)]


def test_market_updates_are_ignored_and_unknown_commands_rejected(event_log: EventLog) -> None:
    ref = start(event_log)
    ref.tell(MarketUpdate(conid=1, source="stream", ts_us=1, last=1.0))
    assert settle(ref).open == []
    with pytest.raises(CommandRejected):
        ask(ref, QueueStats())


def test_restart_keeps_open_mismatches_and_rebuilds_the_registry(data_dir: Path) -> None:
    log = EventLog.open(data_dir, config=TEST_LOG_CONFIG)
    snaps = SnapshotStore(str(data_dir))
    # the registry's own events, as the registry actor stores them
    for event in (
        LegAdded(conid=1, strategy="s1", expected_quantity=10),
        ContractActivated(conid=1, strategy="s1"),
        LegAdded(conid=2, strategy="s1"),
        ContractActivated(conid=2, strategy="s1"),
    ):
        log.append(event, stream="registry", key=str(event.conid))
    log.flush()
    ref = start(log, snaps)
    ref.tell(pos(1, 4))
    ref.tell(PositionsComplete())
    assert [(m.conid, m.kind) for m in settle(ref).open] == [(1, QUANTITY), (2, NO_POSITION)]
    ref.stop()
    # while we were down, the registry let contract 2 go
    log.append(LegRemoved(conid=2, strategy="s1"), stream="registry", key="2")
    log.append(ContractDeactivated(conid=2, strategy="s1"), stream="registry", key="2")
    log.close()

    log = EventLog.open(data_dir, config=TEST_LOG_CONFIG)
    try:
        ref = start(log, snaps)
        assert [(m.conid, m.kind) for m in settle(ref).open] == [(1, QUANTITY)]
        ref.tell(pos(1, 4))  # IB resends everything at connect: the same mismatch, not news
        ref.tell(PositionsComplete())
        assert [(m.conid, m.kind) for m in settle(ref).open] == [(1, QUANTITY)]
        assert kinds(recorded(log)) == [
            ("ReconciliationMismatch", 1, QUANTITY),
            ("ReconciliationMismatch", 2, NO_POSITION),
            ("ReconciliationResolved", 2, NO_POSITION),
        ]
    finally:
        pykka.ActorRegistry.stop_all()
        log.close()


def test_state_round_trips_through_a_snapshot() -> None:
    state = ReconciliationState()
    state.apply(ReconciliationMismatch(conid=1, kind=NO_POSITION, actual=0.0))
    state.apply(ReconciliationMismatch(conid=2, kind=QUANTITY, expected=1.0, actual=2.0))
    state.apply(ReconciliationMismatch(conid=3, kind=CHANGED, previous=1.0, actual=2.0))
    state.apply(ReconciliationResolved(conid=1, kind=NO_POSITION))
    loaded = ReconciliationState.load(state.dump())
    assert loaded.open == state.open
    assert list(loaded.open) == [(2, QUANTITY)]


def test_a_position_closed_while_disconnected_is_dropped_at_the_next_full_round(event_log: EventLog) -> None:
    """IB does not re-send a position that was closed while we were away: its absence from a round says so."""
    ref = start(event_log)
    activate(ref, 1, expected=5.0)
    ref.tell(pos(1, 5))
    ref.tell(pos(2, 3))
    ref.tell(PositionsComplete())
    assert settle(ref).open == []
    # reconnect: IB's new round mentions only contract 2; contract 1 was closed meanwhile
    ref.tell(pos(2, 3))
    ref.tell(PositionsComplete())
    report = settle(ref)
    assert [(m.conid, m.kind, m.actual) for m in report.open] == [(1, NO_POSITION, 0.0)]
