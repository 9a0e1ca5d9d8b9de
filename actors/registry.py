"""The Registry: which contracts belong to active strategies (DESIGN.md section 2).

A contract is *active* while at least one strategy holds it; active
contracts stream, the others go to the queue. The state is a pure
:class:`RegistryState` (conid -> strategy -> expected quantity) changed only
by ``apply(event)``; the actor validates commands, decides which events a
command causes, persists them, and tells subscribers (the StreamRouter, the
queue) every event only once the log says it is durable.

Rules worth knowing:

* Adding a (conid, strategy) pair that is already there with the same
  expected quantity logs nothing (``changed=False``). With a *different*
  expected quantity it logs a new ``LegAdded`` that replaces the old value
  (an update: the contract stays active, no ContractActivated).
* Removing a pair that is not there logs nothing (``changed=False`` and a
  ``detail`` saying so).
* The first strategy to take a contract logs ``LegAdded`` then
  ``ContractActivated``; the last to let it go logs ``LegRemoved`` then
  ``ContractDeactivated``.
* Bad input is refused with :class:`CommandRejected` (``field`` set) and
  leaves no trace: no event, no log line. A batch is valid as a whole or
  refused as a whole.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import msgspec
import pykka
from loguru import logger

from actors.base import EventSourcedActor
from actors.messaging import CommandRejected, reject
from events.base import Event
from events.commands import CommandError, validate_command
from events.registry import (
    AddActive,
    AddActiveMany,
    ContractActivated,
    ContractDeactivated,
    LegAdded,
    LegRemoved,
    ListActive,
    RegistryBatchChanged,
    RegistryChanged,
    RegistryListing,
    RemoveActive,
    RemoveActiveMany,
)
from storage.event_log import EventLog
from storage.snapshots import SnapshotStore

__all__ = ["RegistryActor", "RegistryState"]


class RegistryState:
    """conid -> {strategy: expected quantity}; a contract is present only while some strategy holds it.

    Pure: no clock, no I/O. Every query is a dict lookup.
    """

    #: 2: rows carry the legs' non-zero priorities as a third element.
    snapshot_version: ClassVar[int] = 2

    def __init__(self) -> None:
        self._legs: dict[int, dict[str, float | None]] = {}
        self._priorities: dict[int, dict[str, int]] = {}  # only non-zero priorities

    # ------------------------------------------------------------------ queries

    def is_active(self, conid: int) -> bool:
        return conid in self._legs

    def all_active(self) -> frozenset[int]:
        return frozenset(self._legs)

    def strategies_of(self, conid: int) -> frozenset[str]:
        return frozenset(self._legs.get(conid, ()))

    def expected_quantity(self, conid: int, strategy: str) -> float | None:
        """The expected position of ``conid`` in ``strategy`` (None when unknown or not held)."""
        return self._legs.get(conid, {}).get(strategy)

    def priority_of(self, conid: int, strategy: str | None = None) -> int:
        """A leg's priority, or (no strategy) the highest of the contract's legs; 0 when none was given."""
        prios = self._priorities.get(conid, {})
        if strategy is not None:
            return prios.get(strategy, 0)
        return max(prios.values(), default=0) if conid in self._legs else 0

    def leg_priorities(self) -> dict[int, dict[str, int]]:
        """A copy of conid -> {strategy: priority}, non-zero priorities only."""
        return {conid: dict(prios) for conid, prios in self._priorities.items()}

    def has_leg(self, conid: int, strategy: str) -> bool:
        return strategy in self._legs.get(conid, ())

    def legs(self) -> dict[int, dict[str, float | None]]:
        """A copy of conid -> {strategy: expected quantity}."""
        return {conid: dict(legs) for conid, legs in self._legs.items()}

    def to_json(self) -> dict[str, list[str]]:
        """conid as string -> sorted strategy names (what ``replay --json`` prints)."""
        return {str(conid): sorted(self._legs[conid]) for conid in sorted(self._legs)}

    # ------------------------------------------------------------------ events

    def apply(self, event: Event) -> None:
        match event:
            case LegAdded(conid=conid, strategy=strategy, expected_quantity=qty, priority=priority):
                self._legs.setdefault(conid, {})[strategy] = qty
                self._set_priority(conid, strategy, priority)
            case LegRemoved(conid=conid, strategy=strategy):
                legs = self._legs.get(conid)
                if legs is not None:
                    legs.pop(strategy, None)
                    if not legs:
                        del self._legs[conid]
                self._set_priority(conid, strategy, 0)
            case ContractActivated() | ContractDeactivated():
                pass  # derived from the legs; stored for the audit trail and the subscribers
            case _:
                raise TypeError(f"RegistryState cannot apply {type(event).__name__}")

    def _set_priority(self, conid: int, strategy: str, priority: int) -> None:
        prios = self._priorities.setdefault(conid, {})
        if priority:
            prios[strategy] = priority
        else:
            prios.pop(strategy, None)
        if not prios:
            del self._priorities[conid]

    def dump(self) -> bytes:
        """Canonical bytes: equal states dump equal, whatever order events came in."""
        rows = [
            [conid, sorted(legs.items()), sorted(self._priorities.get(conid, {}).items())]
            for conid, legs in sorted(self._legs.items())
        ]
        return msgspec.json.encode(rows)

    @classmethod
    def load(cls, data: bytes) -> RegistryState:
        """Rows of snapshot version 1 have no priorities (all 0)."""
        state = cls()
        for row in msgspec.json.decode(data):
            conid = int(row[0])
            state._legs[conid] = {str(name): qty for name, qty in row[1]}
            for name, priority in row[2] if len(row) > 2 else ():
                state._set_priority(conid, str(name), int(priority))
        return state


class RegistryActor(EventSourcedActor[RegistryState]):
    """Owns the registry; stream ``registry``.

    Handles (asked, in a Request): AddActive, RemoveActive -> RegistryChanged;
    AddActiveMany, RemoveActiveMany -> RegistryBatchChanged; ListActive ->
    RegistryListing. The same commands told without a Request are applied and
    a refusal is logged (nobody is there to answer).
    Emits (stored, then told in order to every subscriber once durable):
    LegAdded, LegRemoved, ContractActivated, ContractDeactivated.
    Proxy queries: ``is_active``, ``all_active``, ``strategies_of``,
    ``expected_quantity``, ``to_json``; ``add_subscriber`` / ``remove_subscriber``.
    """

    stream: ClassVar[str] = "registry"
    state_type: ClassVar[type[Any]] = RegistryState

    def __init__(
        self,
        log: EventLog,
        snapshots: SnapshotStore | None = None,
        *,
        subscribers: Iterable[pykka.ActorRef[Any]] = (),
        snapshot_every: int | None = None,
    ) -> None:
        super().__init__(log, snapshots, snapshot_every=snapshot_every)
        self._subscribers: tuple[pykka.ActorRef[Any], ...] = tuple(subscribers)

    # ------------------------------------------------------------------ subscribers

    def add_subscriber(self, ref: pykka.ActorRef[Any]) -> None:
        """Tell ``ref`` every event persisted from now on, once durable.

        Events persisted before this call are not told to ``ref``; to start
        from the whole picture, subscribe first, then ask ListActive (an event
        may then arrive both ways, never neither).
        """
        if ref not in self._subscribers:
            self._subscribers = (*self._subscribers, ref)

    def remove_subscriber(self, ref: pykka.ActorRef[Any]) -> None:
        self._subscribers = tuple(s for s in self._subscribers if s != ref)

    # ------------------------------------------------------------------ queries (proxy)

    def is_active(self, conid: int) -> bool:
        return self.state.is_active(conid)

    def all_active(self) -> frozenset[int]:
        return self.state.all_active()

    def strategies_of(self, conid: int) -> frozenset[str]:
        return self.state.strategies_of(conid)

    def priorities(self) -> dict[int, dict[str, int]]:
        """conid -> {strategy: priority} for the legs with a non-zero priority."""
        return self.state.leg_priorities()

    def expected_quantity(self, conid: int, strategy: str) -> float | None:
        return self.state.expected_quantity(conid, strategy)

    def to_json(self) -> dict[str, list[str]]:
        return self.state.to_json()

    # ------------------------------------------------------------------ commands

    def handle_command(self, command: Any) -> Any:
        if not isinstance(command, AddActive | RemoveActive | AddActiveMany | RemoveActiveMany | ListActive):
            name = getattr(type(command), "__struct_config__", None)
            raise reject(str(getattr(name, "tag", type(command).__name__)), "unknown_command", "not a registry command")
        try:
            command = validate_command(command)
        except CommandError as exc:
            raise reject(command, "invalid", exc.message, exc.field) from None
        events: list[Event] = []
        match command:
            case ListActive():
                return RegistryListing(registry=self.state.to_json())
            case AddActive() | RemoveActive():
                reply = self._decide(command, events)
            case AddActiveMany(items=items) | RemoveActiveMany(items=items):
                reply = RegistryBatchChanged(results=[self._decide(item, events) for item in items])
        self._publish(events)
        return reply

    def handle_message(self, message: Any) -> Any:
        if isinstance(message, AddActive | RemoveActive | AddActiveMany | RemoveActiveMany):
            try:
                self.handle_command(message)
            except CommandRejected as exc:
                logger.warning("registry refused a told command: {}", exc)
            return None
        return super().handle_message(message)

    def _decide(self, command: AddActive | RemoveActive, events: list[Event]) -> RegistryChanged:
        """Persist the events ``command`` causes (appending them to ``events``) and say what changed."""
        conid, strategy = command.conid, command.strategy
        was_active = self.state.is_active(conid)
        if isinstance(command, AddActive):
            if self.state.has_leg(conid, strategy):
                same_quantity = self.state.expected_quantity(conid, strategy) == command.expected_quantity
                if same_quantity and self.state.priority_of(conid, strategy) == command.priority:
                    return RegistryChanged(
                        conid=conid, strategy=strategy, changed=False, active=True, detail="already in strategy"
                    )
                detail = "priority updated" if same_quantity else "expected_quantity updated"
            else:
                detail = "added"
            self._persist(
                LegAdded(
                    conid=conid,
                    strategy=strategy,
                    source=command.source,
                    expected_quantity=command.expected_quantity,
                    priority=command.priority,
                ),
                events,
            )
            if not was_active:
                self._persist(ContractActivated(conid=conid, strategy=strategy), events)
                detail = "added; contract activated"
            return RegistryChanged(conid=conid, strategy=strategy, changed=True, active=True, detail=detail)
        if not self.state.has_leg(conid, strategy):
            return RegistryChanged(
                conid=conid, strategy=strategy, changed=False, active=was_active, detail="not in strategy"
            )
        self._persist(LegRemoved(conid=conid, strategy=strategy, source=command.source), events)
        active = self.state.is_active(conid)
        detail = "removed"
        if not active:
            self._persist(ContractDeactivated(conid=conid, strategy=strategy), events)
            detail = "removed; contract deactivated"
        return RegistryChanged(conid=conid, strategy=strategy, changed=True, active=active, detail=detail)

    def _persist(self, event: Event, events: list[Event]) -> None:
        self.persist(event)
        events.append(event)

    def _publish(self, events: list[Event]) -> None:
        """Tell ``events`` to today's subscribers once they are durable (before the command's reply)."""
        if not events or not self._subscribers:
            return
        subscribers = self._subscribers  # who was subscribed when the events happened

        def tell_all() -> None:
            for ref in subscribers:
                try:
                    for event in events:
                        ref.tell(event)
                except pykka.ActorDeadError:
                    logger.warning("registry subscriber {} is dead: dropped", ref)
                    self.remove_subscriber(ref)

        self.after_durable(tell_all)
