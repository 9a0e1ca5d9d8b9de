"""Messages of the Reconciliation handler: IB positions against the registry.

Emits (stored): ReconciliationMismatch.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar

from events.base import Conid, Event

__all__ = ["MismatchKind", "ReconciliationMismatch"]


class MismatchKind(StrEnum):
    #: An active contract for which IB reports no (or a zero) position.
    NO_POSITION = "no_position"
    #: IB changed the position of a contract an active strategy holds.
    POSITION_CHANGED = "position_changed"
    #: The quantity differs from what the strategies expect.
    QUANTITY_MISMATCH = "quantity_mismatch"


class ReconciliationMismatch(Event, tag="reconciliation.mismatch", frozen=True, kw_only=True):
    version: ClassVar[int] = 1
    conid: Conid
    kind: MismatchKind
    strategies: list[str] = []
    expected: float | None = None
    actual: float | None = None
    detail: str = ""
