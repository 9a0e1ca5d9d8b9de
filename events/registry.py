"""Messages of the Registry actor: which contracts belong to active strategies.

Handles: AddActive, RemoveActive, their batch forms AddActiveMany and
RemoveActiveMany, ListActive.
Emits (stored): LegAdded, LegRemoved, ContractActivated, ContractDeactivated.
A contract is active while at least one strategy holds it; activation and
deactivation are stored as their own events so an audit can answer "when did
X start streaming and why" with one filter on the contract's key.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import msgspec

from events.base import Command, Conid, Event, Reply, StrategyName

__all__ = [
    "AddActive",
    "AddActiveMany",
    "ContractActivated",
    "ContractDeactivated",
    "ExpectedQuantity",
    "LegAdded",
    "LegRemoved",
    "ListActive",
    "RegistryBatchChanged",
    "RegistryChanged",
    "RegistryListing",
    "RemoveActive",
    "RemoveActiveMany",
    "Source",
]

#: Who asked for a change: "cli", "api", "config", "socket", ... (free text, short).
Source = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
#: A strategy's priority for lines (higher first); 0 unless ``registry add --priority`` says otherwise.
StrategyPriority = Annotated[int, msgspec.Meta(ge=-1000, le=1000)]
#: Expected signed position of a strategy leg, for reconciliation.
ExpectedQuantity = Annotated[float, msgspec.Meta(ge=-1e12, le=1e12)]


class AddActive(Command, tag="registry.add_active", frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Put ``conid`` into ``strategy``; it streams while any strategy holds it."""

    conid: Conid
    strategy: StrategyName
    source: Source = "api"
    expected_quantity: ExpectedQuantity | None = None
    #: The strategy's claim on a market data line: higher streams first when lines are short.
    priority: StrategyPriority = 0


class RemoveActive(Command, tag="registry.remove_active", frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Take ``conid`` out of ``strategy``; it leaves streaming when no strategy holds it."""

    conid: Conid
    strategy: StrategyName
    source: Source = "api"


class AddActiveMany(Command, tag="registry.add_active_many", frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Several AddActive at once: all valid or none applied; answered by RegistryBatchChanged."""

    items: list[AddActive]


class RemoveActiveMany(
    Command, tag="registry.remove_active_many", frozen=True, kw_only=True, forbid_unknown_fields=True
):
    """Several RemoveActive at once: all valid or none applied; answered by RegistryBatchChanged."""

    items: list[RemoveActive]


class ListActive(Command, tag="registry.list", frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Ask for the whole registry."""


class RegistryChanged(Reply, tag="registry.changed", frozen=True, kw_only=True):
    """Answer to Add/RemoveActive: ``changed`` is False when nothing had to change."""

    conid: int
    strategy: str
    changed: bool
    active: bool
    detail: str = ""


class RegistryBatchChanged(Reply, tag="registry.batch_changed", frozen=True, kw_only=True):
    """Answer to Add/RemoveActiveMany: one RegistryChanged per item, in order."""

    results: list[RegistryChanged]


class RegistryListing(Reply, tag="registry.listing", frozen=True, kw_only=True):
    """conid (as string, for JSON) -> sorted strategy names."""

    registry: dict[str, list[str]]


class LegAdded(Event, tag="registry.leg_added", frozen=True, kw_only=True):
    version: ClassVar[int] = 1
    conid: Conid
    strategy: StrategyName
    source: Source = "api"
    expected_quantity: ExpectedQuantity | None = None
    #: The strategy's claim on a market data line: higher streams first when lines are short.
    priority: StrategyPriority = 0


class LegRemoved(Event, tag="registry.leg_removed", frozen=True, kw_only=True):
    version: ClassVar[int] = 1
    conid: Conid
    strategy: StrategyName
    source: Source = "api"


class ContractActivated(Event, tag="registry.contract_activated", frozen=True, kw_only=True):
    """The first strategy took ``conid``: it should stream."""

    version: ClassVar[int] = 1
    conid: Conid
    strategy: StrategyName


class ContractDeactivated(Event, tag="registry.contract_deactivated", frozen=True, kw_only=True):
    """The last strategy let ``conid`` go: it goes back to the queue."""

    version: ClassVar[int] = 1
    conid: Conid
    strategy: StrategyName
