"""Reconciliation: do IB's positions agree with what the active strategies hold?

Inputs are IB's positions (``PositionChanged``, then ``PositionsComplete`` at
IB's positionEnd) and the registry's events (told by the registry after they
are durable, in order). Output is the audit trail of disagreements, stored in
the event log under stream ``reconciliation`` and keyed by conid:

* **NO_POSITION** -- an active contract with no (or a zero) position, unless
  its strategies expect it flat. Judged only once the position of the
  contract is known: IB sent it, or IB's positionEnd came without it.
* **QUANTITY_MISMATCH** -- a non-zero position different from the sum of the
  expected quantities of the strategies that set one (a zero position is
  NO_POSITION, which carries the expectation, so one fault is one warning).
* **POSITION_CHANGED** -- IB changed the quantity of an active contract: a
  notice, recorded once per actual change (IB repeating a quantity is not one).

Don't flood: the open conditions are the actor's event-sourced state, so a
condition is recorded when it appears or when its expected/actual change,
and a ``ReconciliationResolved`` is recorded when it clears (position fixed,
expectation changed, contract deactivated). A restart keeps the open set, so
IB resending every position at connect does not repeat them.

What the actor knows of the registry is not its own state: at start it is
rebuilt from the registry's stream in the log, then kept current by the told
events (applying one twice is harmless). Positions are not stored at all: IB
sends them all again at every connect, so after a restart the first report of
a contract is its baseline, not a change.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import msgspec
from deltalake import DeltaTable
from loguru import logger

from actors.base import EventSourcedActor
from actors.messaging import reject
from actors.registry import RegistryState
from actors.ticker import Ticker
from events.base import Event
from events.ib import MarketUpdate, PositionChanged, PositionsComplete
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
from storage.reader import read_seq_events
from storage.snapshots import SnapshotStore

__all__ = ["Reconciliation", "ReconciliationConfig", "ReconciliationState"]

#: Quantities closer than this are equal (IB reports fractional shares as decimals).
EPSILON = 1e-9
#: The kinds that stay open until they clear; POSITION_CHANGED is a one-off notice.
CONDITIONS = (MismatchKind.NO_POSITION, MismatchKind.QUANTITY_MISMATCH)
RegistryEvent = LegAdded | LegRemoved | ContractActivated | ContractDeactivated


class ReconciliationConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    #: Judge every contract again this often (None: only on events and asked Reconcile).
    reconcile_interval_s: float | None = 60.0
    #: The registry's stream in the log, replayed at start (None: rely on told events only).
    registry_stream: str | None = "registry"


class ReconciliationState:
    """The open mismatches by (conid, kind): pure, changed only by ``apply``."""

    snapshot_version: ClassVar[int] = 1

    def __init__(self) -> None:
        self.open: dict[tuple[int, MismatchKind], ReconciliationMismatch] = {}

    def apply(self, event: Event) -> None:
        match event:
            case ReconciliationMismatch(conid=conid, kind=kind) if kind in CONDITIONS:
                self.open[(conid, kind)] = event
            case ReconciliationResolved(conid=conid, kind=kind):
                self.open.pop((conid, kind), None)
            case _:
                pass

    def dump(self) -> bytes:
        return msgspec.json.encode(list(self.open.values()))

    @classmethod
    def load(cls, data: bytes) -> ReconciliationState:
        state = cls()
        for mismatch in msgspec.json.decode(data, type=list[ReconciliationMismatch]):
            state.apply(mismatch)
        return state


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) <= EPSILON


class Reconciliation(EventSourcedActor[ReconciliationState]):
    """Compares IB positions with the registry and records the disagreements.

    Handles (told): PositionChanged, PositionsComplete, LegAdded, LegRemoved,
    ContractActivated, ContractDeactivated, Reconcile (also from its ticker);
    MarketUpdate is accepted and ignored, so it can sit in a HandlerSet.
    Handles (asked): Reconcile, ListMismatches -> ReconciliationReport (after
    the events it recorded are durable).
    Emits (stored): ReconciliationMismatch, ReconciliationResolved; a loguru
    warning for every mismatch recorded.
    """

    stream: ClassVar[str] = "reconciliation"
    state_type: ClassVar[type[Any]] = ReconciliationState

    def __init__(
        self,
        log: EventLog,
        snapshots: SnapshotStore | None = None,
        *,
        config: ReconciliationConfig | None = None,
        snapshot_every: int | None = None,
    ) -> None:
        super().__init__(log, snapshots, snapshot_every=snapshot_every)
        self.config = config or ReconciliationConfig()
        #: conid -> strategy -> expected quantity (None: that strategy sets none).
        self.legs: dict[int, dict[str, float | None]] = {}
        #: conid -> account -> quantity, as IB last reported it.
        self.positions: dict[int, dict[str, float]] = {}
        self.positions_complete = False
        #: conids IB mentioned since the last PositionsComplete (a full round ends with one)
        self._seen_this_round: set[int] = set()
        self._ticker: Ticker | None = None
        self._start_legs: dict[int, dict[str, float | None]] | None = None

    # ------------------------------------------------------------------ lifecycle

    def on_start(self) -> None:
        # it only reads, as recovery does: done while the start-up check runs rather than after its verdict
        if self.config.registry_stream is not None:
            try:
                self._start_legs = self._registry_from_log(self.config.registry_stream, self.log.start_view())
            except Exception:  # noqa: BLE001 - read again after the check's verdict, where a failure counts
                self._start_legs = None
        super().on_start()

    def on_recovered(self) -> None:
        if self.config.registry_stream is not None:
            legs, self._start_legs = self._start_legs, None
            self.legs = legs if legs is not None else self._registry_from_log(self.config.registry_stream)
        # contracts deactivated while we were down: their open conditions are over
        for conid in {conid for conid, _ in self.state.open}:
            if not self._active(conid):
                self._check(conid)
        if self.config.reconcile_interval_s:
            self._ticker = Ticker(
                self.actor_ref, Reconcile(), self.config.reconcile_interval_s, name="reconcile"
            ).start()

    def _registry_from_log(self, stream: str, source: DeltaTable | None = None) -> dict[int, dict[str, float | None]]:
        """The registry's legs, as the registry itself recovers them: its newest snapshot, then later events.

        ``source``: the events table to read (the start's shared view); by default, as it is now.

        Reading the registry's whole stream from seq 1 would grow with the
        log forever (and stop at any unreadable old file).
        """
        registry = RegistryState()
        from_seq = 1
        # a registry snapshot past the log's durable end names events that never landed (the registry discards it)
        backed = self.log.opened_seq
        snap = self.snapshots.latest(stream, at_or_before=backed) if self.snapshots is not None else None
        if snap is not None:
            registry = RegistryState.load(snap.state)
            from_seq = snap.seq + 1
        # seq and event only, found in two passes (storage.reader.read_seq_events): the registry is often
        # quiet for many events since its snapshot, and this runs on every start
        for _, event in read_seq_events(
            self.log.uri if source is None else source,
            storage_options=self.log.storage_options,
            streams=[stream],
            from_seq=from_seq,
        ):
            if isinstance(event, RegistryEvent):
                registry.apply(event)
        return registry.legs()

    def on_stop(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        super().on_stop()

    def on_failure(self, *_: object) -> None:
        if self._ticker is not None:
            self._ticker.stop()

    # ------------------------------------------------------------------ messages

    def handle_message(self, message: Any) -> Any:
        match message:
            case PositionChanged():
                self._on_position(message)
            case PositionsComplete():
                self._end_of_round()
            case LegAdded() | LegRemoved() | ContractActivated() | ContractDeactivated():
                self._apply_registry(message)
                self._check(message.conid)
            case Reconcile():
                self._check_all()
            case MarketUpdate():
                pass
            case _:
                return super().handle_message(message)
        return None

    def handle_command(self, command: Any) -> Any:
        match command:
            case Reconcile():
                self._check_all()
            case ListMismatches():
                pass
            case _:
                raise reject(command, "unknown_command", "reconciliation does not take it")
        return ReconciliationReport(open=self.open_mismatches(), positions_complete=self.positions_complete)

    def open_mismatches(self) -> list[ReconciliationMismatch]:
        return sorted(self.state.open.values(), key=lambda m: (m.conid, m.kind))

    # ------------------------------------------------------------------ inputs

    def _apply_registry(self, event: RegistryEvent) -> None:
        """The registry's view, keyed like the registry: active while a strategy holds a leg."""
        match event:
            case LegAdded(conid=conid, strategy=strategy, expected_quantity=qty):
                self.legs.setdefault(conid, {})[strategy] = qty
            case LegRemoved(conid=conid, strategy=strategy):
                strategies = self.legs.get(conid, {})
                strategies.pop(strategy, None)
                if not strategies:
                    self.legs.pop(conid, None)
            case ContractActivated(conid=conid, strategy=strategy):
                self.legs.setdefault(conid, {}).setdefault(strategy, None)
            case ContractDeactivated(conid=conid):
                self.legs.pop(conid, None)

    def _end_of_round(self) -> None:
        """IB finished a full positions round (at every connect and reconnect).

        A position closed while we were disconnected is simply not sent
        again, so whatever this round did not mention is no longer held:
        it is dropped (an active contract then shows as "no position").
        """
        if self.positions_complete:
            for conid in [c for c in self.positions if c not in self._seen_this_round]:
                accounts = self.positions.pop(conid)
                logger.info(
                    "reconciliation: {} not in IB's latest positions (was {}); treated as closed", conid, accounts
                )
                self._check(conid)
        self._seen_this_round = set()
        self.positions_complete = True
        self._check_all()

    def _on_position(self, message: PositionChanged) -> None:
        conid = message.conid
        self._seen_this_round.add(conid)
        before = self._actual(conid)
        self.positions.setdefault(conid, {})[message.account] = message.position
        after = self._actual(conid)
        if self._active(conid) and before is not None and not _same(before, after):
            strategies = sorted(self.legs[conid])
            self._record(
                ReconciliationMismatch(
                    conid=conid,
                    kind=MismatchKind.POSITION_CHANGED,
                    strategies=strategies,
                    expected=self._expected(conid),
                    actual=after,
                    previous=before,
                    detail=f"IB changed the position of an active contract from {before:g} to {after:g}",
                )
            )
        self._check(conid)

    # ------------------------------------------------------------------ judging

    def _active(self, conid: int) -> bool:
        return bool(self.legs.get(conid))

    def _actual(self, conid: int) -> float | None:
        """IB's position summed over accounts; 0 once positionEnd came without it; None if unknown."""
        accounts = self.positions.get(conid)
        if accounts is not None:
            return float(sum(accounts.values()))
        return 0.0 if self.positions_complete else None

    def _expected(self, conid: int) -> float | None:
        quantities = [q for q in self.legs.get(conid, {}).values() if q is not None]
        return float(sum(quantities)) if quantities else None

    def _check_all(self) -> None:
        for conid in sorted(set(self.legs) | {conid for conid, _ in self.state.open}):
            self._check(conid)

    def _check(self, conid: int) -> None:
        """Open, update or resolve the conditions of ``conid`` from what is known now."""
        actual = self._actual(conid)
        if not self._active(conid):
            self._clear(conid, CONDITIONS, actual, "contract no longer active")
            return
        if actual is None:
            return  # IB has not told us yet: nothing can be judged
        expected = self._expected(conid)
        strategies = sorted(self.legs[conid])
        flat = abs(actual) <= EPSILON
        if flat and not (expected is not None and abs(expected) <= EPSILON):
            self._open(
                conid, MismatchKind.NO_POSITION, strategies, expected, actual, "active contract without a position"
            )
        else:
            self._clear(conid, (MismatchKind.NO_POSITION,), actual, "position present")
        if not flat and expected is not None and not _same(expected, actual):
            detail = f"IB holds {actual:g}, the strategies expect {expected:g}"
            self._open(conid, MismatchKind.QUANTITY_MISMATCH, strategies, expected, actual, detail)
        else:
            self._clear(conid, (MismatchKind.QUANTITY_MISMATCH,), actual, "quantity as expected")

    def _open(
        self, conid: int, kind: MismatchKind, strategies: list[str], expected: float | None, actual: float, detail: str
    ) -> None:
        current = self.state.open.get((conid, kind))
        if current is not None and _same(current.expected, expected) and _same(current.actual, actual):
            return  # already recorded: a repeat is not news
        self._record(
            ReconciliationMismatch(
                conid=conid, kind=kind, strategies=strategies, expected=expected, actual=actual, detail=detail
            )
        )

    def _clear(self, conid: int, kinds: Iterable[MismatchKind], actual: float | None, detail: str) -> None:
        for kind in kinds:
            if (conid, kind) in self.state.open:
                self.persist(ReconciliationResolved(conid=conid, kind=kind, actual=actual, detail=detail))
                self.announce("INFO", "reconciliation: {} on {} resolved: {}", kind.value, conid, detail)

    def _record(self, mismatch: ReconciliationMismatch) -> None:
        self.persist(mismatch)
        self.announce(
            "WARNING",
            "reconciliation: {} on {} (strategies {}): expected {}, actual {}: {}",
            mismatch.kind.value,
            mismatch.conid,
            ", ".join(mismatch.strategies) or "-",
            mismatch.expected,
            mismatch.actual,
            mismatch.detail,
        )
