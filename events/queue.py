"""Messages of the Queue actor: the persistent refresh queue (DESIGN.md section 4).

Handles: Enqueue, EnqueueMany, Claim, Succeed, Fail, Release, LiftHolds, Cancel, Requeue,
ExpireLeases, QueueStats.
Emits (stored): ItemEnqueued, ItemReprioritized, ItemClaimed, ItemSucceeded,
ItemRetryScheduled, ItemDeadLettered, ItemReleased, ItemHoldLifted, ItemCancelled, ItemRequeued.
Every stored queue event is keyed by its conid, so one filter on ``key``
tells a contract's whole story.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Annotated, Any, ClassVar, Literal

import msgspec

from events.base import Command, Conid, Event, Reply

__all__ = [
    "NEVER_PRICED_DUE_US",
    "Cancel",
    "Claim",
    "Claimed",
    "ClaimedItem",
    "Enqueue",
    "EnqueueMany",
    "ExpireLeases",
    "Fail",
    "ItemCancelled",
    "ItemClaimed",
    "ItemDeadLettered",
    "ItemEnqueued",
    "ItemHoldLifted",
    "ItemReleased",
    "ItemReprioritized",
    "ItemRequeued",
    "ItemRetryScheduled",
    "ItemSucceeded",
    "LiftHolds",
    "Priority",
    "QueueAck",
    "QueueStats",
    "QueueStatsReply",
    "Release",
    "Requeue",
    "Succeed",
    "failures_from_attempt",
]


class Priority(IntEnum):
    """Lower is served first."""

    ACTIVE_OVERFLOW = 1
    MONITORING = 2


PriorityValue = Annotated[int, msgspec.Meta(ge=1, le=9)]
Reason = Annotated[str, msgspec.Meta(max_length=200)]
ItemId = Annotated[int, msgspec.Meta(gt=0)]
#: Microseconds since the epoch (UTC); every time in the queue is one of these.
Micros = Annotated[int, msgspec.Meta(ge=0)]


#: The due time of a contract that has never had a price: before any real time, the stalest there is.
NEVER_PRICED_DUE_US = 1


class Enqueue(Command, tag="queue.enqueue", frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Owe ``conid`` a refresh.

    ``due_us`` is when its newest quote passes its target age (0: now); claims
    take the item furthest past its due time first, so the queue is ordered by
    staleness, not by arrival. With ``only_if_idle`` nothing happens when the
    contract already has a waiting, processing or dead-lettered item (the
    router's safety sweep must neither double work nor revive a dead letter).
    """

    conid: Conid
    priority: PriorityValue = Priority.MONITORING
    reason: Reason = ""
    due_us: Micros = 0
    only_if_idle: bool = False
    #: A waiting item due as never priced (``NEVER_PRICED_DUE_US``) takes ``due_us`` instead, even if later:
    #: the contract got a price elsewhere (the portfolio floor), so it is no longer the stalest there is.
    reschedule_never_priced: bool = False


class EnqueueMany(Command, tag="queue.enqueue_many", frozen=True, kw_only=True, forbid_unknown_fields=True):
    items: list[Enqueue]


class Claim(Command, tag="queue.claim", frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Lease up to ``n`` ready items for ``lease_s`` seconds."""

    n: Annotated[int, msgspec.Meta(ge=1, le=10_000)]
    lease_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    worker: Annotated[str, msgspec.Meta(max_length=64)] = "worker"


class Succeed(Command, tag="queue.succeed", frozen=True, kw_only=True, forbid_unknown_fields=True):
    """End claimed items. ``leases`` (optional, same order as ``item_ids``) are the
    ``lease_until_us`` values Claimed handed out: an ack under an older lease is stale and ignored."""

    item_ids: list[ItemId]
    leases: list[Micros] = []


class Fail(Command, tag="queue.fail", frozen=True, kw_only=True, forbid_unknown_fields=True):
    item_id: ItemId
    error: Reason = ""
    code: int | None = None
    #: The lease Claimed handed out; when given, a Fail under an older lease is stale and ignored.
    lease_until_us: Micros | None = None
    #: No retry can help (no market data subscription, no such contract): dead-letter at once.
    terminal: bool = False


class Release(Command, tag="queue.release", frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Give claimed items back without counting an attempt (e.g. IB disconnected)."""

    item_ids: list[ItemId]
    reason: Reason = "released"
    leases: list[Micros] = []
    #: Not claimable again for this long (s): the contract's data is away (a farm outage), and as the stalest
    #: item it would otherwise be claimed again at once, ahead of every contract IB can serve. 0: at once.
    hold_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 0.0


class LiftHolds(Command, tag="queue.lift_holds", frozen=True, kw_only=True, forbid_unknown_fields=True):
    """IB says a market data farm is back: the waiting items of these contracts, held since a farm outage cut
    their snapshots (a Release's ``hold_s``), may be claimed at once instead of when their holds end."""

    conids: list[Conid]
    reason: Reason = "market data farm back"


class Cancel(Command, tag="queue.cancel", frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Drop the waiting item of ``conid`` (it became active and streams now)."""

    conid: Conid
    reason: Reason = "activated"


class Requeue(Command, tag="queue.requeue", frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Operator: put a dead-lettered item back to PENDING with its attempts reset."""

    conid: Conid
    reason: Reason = "operator requeue"


class ExpireLeases(Command, tag="queue.expire_leases", frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Return every item whose lease has passed to PENDING."""


class QueueStats(Command, tag="queue.stats", frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class ClaimedItem(msgspec.Struct, frozen=True, kw_only=True):
    item_id: int
    conid: int
    priority: int
    attempt: int
    lease_until_us: int
    due_us: int = 0


class Claimed(Reply, tag="queue.claimed", frozen=True, kw_only=True):
    items: list[ClaimedItem]


class QueueAck(Reply, tag="queue.ack", frozen=True, kw_only=True):
    """How many items a command changed, and which it had to leave alone and why."""

    changed: int
    ignored: dict[str, str] = {}


class QueueStatsReply(Reply, tag="queue.stats_reply", frozen=True, kw_only=True):
    pending: int
    processing: int
    failed: int
    by_priority: dict[str, int] = {}


class ItemEnqueued(Event, tag="queue.item_enqueued", frozen=True, kw_only=True):
    version: ClassVar[int] = 1
    item_id: ItemId
    conid: Conid
    priority: PriorityValue
    reason: Reason = ""
    enqueued_us: Micros
    #: When the contract's quote passes its target age; 0 (events before v2 of the scheduler) means enqueued_us.
    due_us: Micros = 0


class ItemReprioritized(Event, tag="queue.item_reprioritized", frozen=True, kw_only=True):
    """A coalesced enqueue with a better priority, or an earlier due time, upgraded the waiting item."""

    version: ClassVar[int] = 1
    item_id: ItemId
    conid: Conid
    priority: PriorityValue
    reason: Reason = ""
    #: A coalesced enqueue that was due earlier moves the item's due time forward (0: unchanged).
    due_us: Micros = 0
    #: ``due_us`` replaces the item's due time even if later (a never-priced item that got a price elsewhere).
    exact_due: bool = False


class ItemClaimed(Event, tag="queue.item_claimed", frozen=True, kw_only=True):
    version: ClassVar[int] = 1
    item_id: ItemId
    conid: Conid
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    lease_until_us: Micros
    worker: str = "worker"


class ItemSucceeded(Event, tag="queue.item_succeeded", frozen=True, kw_only=True):
    version: ClassVar[int] = 1
    item_id: ItemId
    conid: Conid


class ItemRetryScheduled(Event, tag="queue.item_retry_scheduled", frozen=True, kw_only=True):
    """A snapshot failed; the item waits until ``not_before_us``, then may be claimed again.

    v2 renamed v1's ``attempt`` to ``failures`` (see :func:`failures_from_attempt`).
    """

    version: ClassVar[int] = 2
    item_id: ItemId
    conid: Conid
    #: Failed attempts of this item so far, this one included.
    failures: Annotated[int, msgspec.Meta(ge=1)]
    not_before_us: Micros
    error: Reason = ""
    code: int | None = None


class ItemDeadLettered(Event, tag="queue.item_dead_lettered", frozen=True, kw_only=True):
    """The item failed ``failures`` times (``max_attempts``): FAILED until an operator requeues it.

    v2 renamed v1's ``attempt`` to ``failures`` (see :func:`failures_from_attempt`).
    """

    version: ClassVar[int] = 2
    item_id: ItemId
    conid: Conid
    #: Failed attempts of this item, the last one included.
    failures: Annotated[int, msgspec.Meta(ge=1)]
    error: Reason = ""
    code: int | None = None


class ItemReleased(Event, tag="queue.item_released", frozen=True, kw_only=True):
    """Back to PENDING without an attempt counted: lease expired, IB down, restart."""

    version: ClassVar[int] = 1
    item_id: ItemId
    conid: Conid
    reason: Literal["lease_expired", "disconnected", "restart", "released"] = "released"
    #: Free text of the Release command that caused it, if any.
    detail: Reason = ""
    #: Claimable again from then (a Release's ``hold_s``); 0: at once. Added after version 1 was stored: an
    #: older event decodes with 0, which is what it meant.
    not_before_us: Micros = 0


class ItemCancelled(Event, tag="queue.item_cancelled", frozen=True, kw_only=True):
    version: ClassVar[int] = 1
    item_id: ItemId
    conid: Conid
    reason: Reason = ""


class ItemRequeued(Event, tag="queue.item_requeued", frozen=True, kw_only=True):
    version: ClassVar[int] = 1
    item_id: ItemId
    conid: Conid
    reason: Reason = ""
    #: When the operator requeued it; the item's not-before time from then on.
    requeued_us: Micros = 0


class ItemHoldLifted(Event, tag="queue.item_hold_lifted", frozen=True, kw_only=True):
    """A held item (ItemReleased ``not_before_us``) is claimable from ``not_before_us`` on: its farm is back."""

    version: ClassVar[int] = 1
    item_id: ItemId
    conid: Conid
    not_before_us: Micros
    reason: Reason = ""


def failures_from_attempt(data: dict[str, Any]) -> dict[str, Any]:
    """Upcaster v1 -> v2 of ItemRetryScheduled and ItemDeadLettered: ``attempt`` became ``failures``.

    In v1 the field was called ``attempt``, the same name ItemClaimed uses for
    "the n-th claim of this item". The two count different things (a lost
    lease or a disconnect is a claim but not a failure), so an audit line
    ``attempt=3`` on a dead letter read as "the third try" when it meant "failed
    three times". The value is unchanged: v1 stored the failure count.
    Registered in :mod:`events.codec`.
    """
    data["failures"] = data.pop("attempt")
    return data
