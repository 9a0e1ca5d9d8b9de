"""Messages of the Reconciliation handler: IB positions against the registry.

Handles: Reconcile (judge every contract now), ListMismatches.
Emits (stored): ReconciliationMismatch, ReconciliationResolved.
NO_POSITION and QUANTITY_MISMATCH are conditions: recorded when they appear
or change, resolved when they clear. POSITION_CHANGED is a notice: recorded
once per actual change of quantity, with nothing to resolve.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar

import msgspec

from events.base import Command, Conid, Event, Reply

__all__ = [
    "ListMismatches",
    "MismatchKind",
    "Reconcile",
    "ReconciliationMismatch",
    "ReconciliationReport",
    "ReconciliationResolved",
]


class MismatchKind(StrEnum):
    #: An active contract for which IB reports no (or a zero) position.
    NO_POSITION = "no_position"
    #: IB changed the position of a contract an active strategy holds.
    POSITION_CHANGED = "position_changed"
    #: The quantity differs from what the strategies expect.
    QUANTITY_MISMATCH = "quantity_mismatch"


class ReconciliationMismatch(Event, tag="reconciliation.mismatch", frozen=True, kw_only=True):
    """``expected``: sum of the strategies' expected quantities (None when none set one);
    ``actual``: IB's position summed over accounts; ``previous``: for POSITION_CHANGED,
    the quantity before the change."""

    version: ClassVar[int] = 1
    conid: Conid
    kind: MismatchKind
    strategies: list[str] = []
    expected: float | None = None
    actual: float | None = None
    detail: str = ""
    previous: float | None = None


class ReconciliationResolved(Event, tag="reconciliation.resolved", frozen=True, kw_only=True):
    """An open mismatch of ``kind`` on ``conid`` cleared; ``detail`` says why."""

    version: ClassVar[int] = 1
    conid: Conid
    kind: MismatchKind
    actual: float | None = None
    detail: str = ""


class Reconcile(Command, tag="reconciliation.reconcile", frozen=True, kw_only=True):
    """Judge every active contract (and every open mismatch) now. Asked: answered with a report."""


class ListMismatches(Command, tag="reconciliation.list", frozen=True, kw_only=True):
    """The open mismatches, without judging anything."""


class ReconciliationReport(Reply, tag="reconciliation.report", frozen=True, kw_only=True):
    open: list[ReconciliationMismatch] = msgspec.field(default_factory=list)
    positions_complete: bool = False
