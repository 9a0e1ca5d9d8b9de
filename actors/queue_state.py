"""The queue's pure state: items, their statuses, and the heaps that make claims O(log n).

Changed only by ``apply(event)``; no clock, no I/O. Every time it needs
(enqueue time, lease deadline, not-before time) arrives inside an event, so a
replay of the log rebuilds exactly the state the live actor had.

Indexes (derived, never stored; rebuilt by ``load``):

* ``_ready``: heap of ``(due_us, priority, enqueued_us, item_id, gen)``
  over waiting items that may run now -- the claim order of DESIGN.md section 4:
  the item whose quote is furthest past its target (earliest ``due_us``) first,
  the better priority on a tie.
* ``_ready_top``: the same entries of the items at the top priority (active
  contracts waiting for a line). When such an item is due and the last claim
  went to another priority, it is claimed next: when both are late, claims
  alternate, so a backlog of monitoring contracts (all priced by the
  portfolio at connect fall due together) cannot hold an active contract back
  for the whole backlog, nor the other way round. Which one went last is
  scheduling state, not queue state: it is not stored, and a restart starts
  with the heap's order.
* ``_delayed``: heap of ``(not_before_us, item_id, gen)`` over items waiting
  out a retry backoff; :meth:`take_ready` moves the due ones to ``_ready``.
* ``_leases``: heap of ``(lease_until_us, item_id, gen)`` over PROCESSING items.

Entries are never removed from the middle of a heap: each item carries a
``gen`` bumped on every change, and an entry whose ``gen`` is old is dropped
when it surfaces (lazy invalidation). Each event pushes at most one entry and
each entry is popped at most once, so every operation is O(log n) amortised.

Contracts: at most one *waiting* (PENDING) item per conid (``_waiting``) and
at most one PROCESSING item per conid (``_processing``). A waiting item whose
contract is still being processed is parked by :meth:`take_ready` and becomes
claimable again when the processing item ends, so a contract is never
snapshotted twice at once. SUCCESS and CANCELLED items leave the state (the
log keeps their story); FAILED items stay as dead letters.
"""

from __future__ import annotations

import heapq
import operator
from typing import Any, ClassVar

import msgspec

from events.base import Event
from events.queue import (
    ItemCancelled,
    ItemClaimed,
    ItemDeadLettered,
    ItemEnqueued,
    ItemHoldLifted,
    ItemReleased,
    ItemReprioritized,
    ItemRequeued,
    ItemRetryScheduled,
    ItemSucceeded,
    Priority,
)

__all__ = ["FAILED", "PENDING", "PROCESSING", "QueueItem", "QueueState", "QueueStateError"]

PENDING, PROCESSING, FAILED = "PENDING", "PROCESSING", "FAILED"
#: The priority whose due items take turns with the rest (see ``_ready_top``).
_TOP = int(Priority.ACTIVE_OVERFLOW)


class QueueStateError(ValueError):
    """An event that does not fit the state: the history is inconsistent."""


class QueueItem:
    """One item; mutable, private to the state (replies carry frozen copies)."""

    __slots__ = (
        "attempt",
        "code",
        "conid",
        "delayed",
        "due_us",
        "enqueued_us",
        "failures",
        "gen",
        "item_id",
        "last_error",
        "lease_until_us",
        "not_before_us",
        "priority",
        "reason",
        "status",
        "worker",
    )

    def __init__(
        self, item_id: int, conid: int, priority: int, reason: str, enqueued_us: int, due_us: int = 0
    ) -> None:
        self.item_id = item_id
        self.conid = conid
        self.priority = priority
        self.reason = reason
        self.enqueued_us = enqueued_us
        self.due_us = due_us or enqueued_us
        self.not_before_us = enqueued_us
        self.status = PENDING
        self.attempt = 0  # attempt number of the latest claim
        self.failures = 0  # failed attempts so far (reset by a requeue)
        self.lease_until_us = 0
        self.worker = ""
        self.last_error = ""
        self.code: int | None = None
        self.delayed = False  # index bookkeeping: sits in the delayed heap
        self.gen = 0

    _DUMPED: ClassVar[tuple[str, ...]] = (
        "item_id", "conid", "priority", "reason", "enqueued_us", "not_before_us", "status",
        "attempt", "failures", "lease_until_us", "worker", "last_error", "code", "due_us",
    )  # fmt: skip

    def row(self) -> tuple[Any, ...]:
        return _ROW_OF(self)

    @classmethod
    def from_row(cls, row: list[Any]) -> QueueItem:
        """One dumped row; rows of snapshot version 1 have no ``due_us`` (it was the enqueue time)."""
        item = cls(row[0], row[1], row[2], row[3], row[4])
        for name, value in zip(cls._DUMPED[5:], row[5:], strict=False):
            setattr(item, name, value)
        return item


#: One C call per item instead of a getattr per field: the queue is dumped on the actor's
#: thread for every snapshot, and at 100,000 items this took the dump from ~210 to ~85 ms.
_ROW_OF = operator.attrgetter(*QueueItem._DUMPED)


class QueueState:
    """Items by id, the one waiting item per contract, and the claim/lease/backoff heaps."""

    #: 2: rows end with ``due_us``.
    snapshot_version: ClassVar[int] = 2

    def __init__(self) -> None:
        self.items: dict[int, QueueItem] = {}
        self.next_item_id = 1
        self._waiting: dict[int, int] = {}  # conid -> PENDING item id
        self._processing: dict[int, int] = {}  # conid -> PROCESSING item id
        self._failed: dict[int, list[int]] = {}  # conid -> dead-lettered item ids, oldest first
        self._failed_count = 0
        self._pending_by_priority: dict[int, int] = {}
        self._ready: list[tuple[int, int, int, int, int]] = []
        self._delayed: list[tuple[int, int, int]] = []
        self._leases: list[tuple[int, int, int]] = []
        self._parked: dict[int, tuple[int, int, int, int, int]] = {}  # conid -> ready entry
        self._ready_top: list[tuple[int, int, int, int, int]] = []
        #: The last claim went to a lower priority: a due top-priority item goes next.
        self._top_turn = False

    # ------------------------------------------------------------------ queries

    def waiting_item(self, conid: int) -> QueueItem | None:
        item_id = self._waiting.get(conid)
        return None if item_id is None else self.items[item_id]

    def processing_item(self, conid: int) -> QueueItem | None:
        item_id = self._processing.get(conid)
        return None if item_id is None else self.items[item_id]

    def holds(self, conid: int) -> bool:
        """Whether ``conid`` has any item: waiting, processing or dead-lettered (one call, no list built)."""
        return conid in self._waiting or conid in self._processing or conid in self._failed

    def dead_letters(self, conid: int) -> list[QueueItem]:
        return [self.items[i] for i in self._failed.get(conid, ())]

    def failed_items(self) -> list[QueueItem]:
        """Every dead letter, by item id."""
        return sorted((self.items[i] for ids in self._failed.values() for i in ids), key=lambda it: it.item_id)

    def counts(self) -> tuple[int, int, int]:
        """(pending, processing, failed)."""
        return len(self._waiting), len(self._processing), self._failed_count

    def pending_by_priority(self) -> dict[int, int]:
        return {p: n for p, n in sorted(self._pending_by_priority.items()) if n}

    def summary(self, items: bool = False) -> dict[str, Any]:
        """Counts, and (with ``items``) every live item: what ``replay --json`` prints."""
        pending, processing, failed = self.counts()
        out: dict[str, Any] = {"pending": pending, "processing": processing, "failed": failed}
        out["items"] = (
            [
                {
                    "conid": it.conid,
                    "item_id": it.item_id,
                    "status": it.status,
                    "priority": it.priority,
                    "attempt": it.attempt,
                    "reason": it.reason,
                    "last_error": it.last_error,
                }
                for it in sorted(self.items.values(), key=lambda it: it.item_id)
            ]
            if items
            else []
        )
        return out

    # ------------------------------------------------------------------ index work for the actor

    def take_ready(self, now_us: int, n: int) -> list[QueueItem]:
        """Up to ``n`` claimable items in claim order; the caller claims every one it gets.

        Moves retry items whose not-before time has come from the delayed heap
        to the ready heap first. Items of a contract that is being processed
        are parked until that processing ends.
        """
        delayed, ready = self._delayed, self._ready
        while delayed and delayed[0][0] <= now_us:
            _, item_id, gen = heapq.heappop(delayed)
            item = self.items.get(item_id)
            if item is not None and item.gen == gen and item.status == PENDING and item.delayed:
                item.delayed = False
                self._push_ready((item.due_us, item.priority, item.enqueued_us, item_id, gen))
        if len(ready) > 2 * len(self._waiting) + 4096:
            self._rebuild_ready()
            ready = self._ready
        top = self._ready_top
        taken: list[QueueItem] = []
        seen: set[int] = set()
        while len(taken) < n:
            if self._top_turn and top and top[0][0] <= now_us:
                entry = heapq.heappop(top)  # a due top-priority item, after a claim of another priority
            elif ready:
                entry = heapq.heappop(ready)
            else:
                break
            item = self.items.get(entry[3])
            if item is None or item.gen != entry[4] or item.status != PENDING or item.delayed or entry[3] in seen:
                continue
            seen.add(entry[3])
            if item.conid in self._processing:
                self._parked[item.conid] = entry
                continue
            taken.append(item)
            self._top_turn = item.priority != _TOP
        return taken

    def expired(self, now_us: int) -> list[QueueItem]:
        """PROCESSING items whose lease ended at or before ``now_us`` (popped from the lease heap)."""
        if len(self._leases) > 2 * len(self._processing) + 4096:
            self._rebuild_leases()
        leases = self._leases
        if not leases or leases[0][0] > now_us:
            return []  # what a Claim almost always finds: no set made for it
        out: list[QueueItem] = []
        seen: set[int] = set()
        while leases and leases[0][0] <= now_us:
            _, item_id, gen = heapq.heappop(leases)
            item = self.items.get(item_id)
            if item is not None and item.gen == gen and item.status == PROCESSING and item_id not in seen:
                seen.add(item_id)
                out.append(item)
        return out

    def processing_items(self) -> list[QueueItem]:
        """Every PROCESSING item, by item id."""
        return sorted((self.items[i] for i in self._processing.values()), key=lambda it: it.item_id)

    def _rebuild_leases(self, skip: int = 0) -> None:
        """Drop stale lease entries (items acked before their deadline) in one O(n) pass, amortised O(1)."""
        items = (self.items[i] for i in self._processing.values() if i != skip)
        self._leases = [(it.lease_until_us, it.item_id, it.gen) for it in items]
        heapq.heapify(self._leases)

    def _rebuild_ready(self, skip: int = 0) -> None:
        """Drop stale ready entries in one O(n) pass (amortised O(1) per event that made them)."""
        self._ready = [
            (it.due_us, it.priority, it.enqueued_us, it.item_id, it.gen)
            for it in (self.items[i] for i in self._waiting.values() if i != skip)
            if not it.delayed
        ]
        heapq.heapify(self._ready)
        self._ready_top = [entry for entry in self._ready if entry[1] == _TOP]
        heapq.heapify(self._ready_top)
        self._parked.clear()  # parked items are in the rebuilt heap and get parked again when popped

    def _push_ready(self, entry: tuple[int, int, int, int, int]) -> None:
        heapq.heappush(self._ready, entry)
        if entry[1] == _TOP:
            heapq.heappush(self._ready_top, entry)

    def _push(self, item: QueueItem) -> None:
        item.gen += 1
        if item.status == PROCESSING:
            if len(self._leases) > 2 * len(self._processing) + 4096:
                self._rebuild_leases(skip=item.item_id)  # bounds stale entries also in a long replay
            heapq.heappush(self._leases, (item.lease_until_us, item.item_id, item.gen))
        elif item.delayed:
            heapq.heappush(self._delayed, (item.not_before_us, item.item_id, item.gen))
        elif item.status == PENDING:
            if len(self._ready) + len(self._ready_top) > 2 * len(self._waiting) + 4096:
                self._rebuild_ready(skip=item.item_id)
            entry = (item.due_us, item.priority, item.enqueued_us, item.item_id, item.gen)
            heapq.heappush(self._ready, entry)  # _push_ready, written out: once a snapshot
            if entry[1] == _TOP:
                heapq.heappush(self._ready_top, entry)

    # ------------------------------------------------------------------ status bookkeeping

    def _get(self, event: Any) -> QueueItem:
        item = self.items.get(event.item_id)
        if item is None or item.conid != event.conid:
            raise QueueStateError(f"{type(event).__name__} for unknown item {event.item_id} (conid {event.conid})")
        return item

    def _leave(self, item: QueueItem) -> None:
        """Take ``item`` out of the index of its current status."""
        if item.status == PENDING:
            if self._waiting.get(item.conid) == item.item_id:
                del self._waiting[item.conid]
            self._pending_by_priority[item.priority] -= 1
        elif item.status == PROCESSING:
            if self._processing.get(item.conid) == item.item_id:
                del self._processing[item.conid]
            parked = self._parked.pop(item.conid, None)
            if parked is not None:
                self._push_ready(parked)
        elif item.status == FAILED:
            ids = self._failed[item.conid]
            ids.remove(item.item_id)
            if not ids:
                del self._failed[item.conid]
            self._failed_count -= 1

    def _enter(self, item: QueueItem, status: str) -> None:
        """Put ``item`` into ``status`` and its index; at most one waiting/processing item per contract."""
        item.status = status
        if status == PENDING:
            other = self._waiting.get(item.conid)
            if other is not None and other != item.item_id:
                raise QueueStateError(f"conid {item.conid} already has waiting item {other}, not {item.item_id}")
            self._waiting[item.conid] = item.item_id
            self._pending_by_priority[item.priority] = self._pending_by_priority.get(item.priority, 0) + 1
        elif status == PROCESSING:
            other = self._processing.get(item.conid)
            if other is not None and other != item.item_id:
                raise QueueStateError(f"conid {item.conid} already has processing item {other}")
            self._processing[item.conid] = item.item_id
        elif status == FAILED:
            self._failed.setdefault(item.conid, []).append(item.item_id)
            self._failed_count += 1
        self._push(item)

    # ------------------------------------------------------------------ events

    def apply(self, event: Event) -> None:
        # the three events of every snapshot first: each case is an isinstance check
        match event:
            case ItemEnqueued():
                item_id = event.item_id
                if item_id in self.items:
                    raise QueueStateError(f"item {item_id} enqueued twice")
                item = QueueItem(item_id, event.conid, event.priority, event.reason, event.enqueued_us, event.due_us)
                self.items[item_id] = item
                if item_id >= self.next_item_id:
                    self.next_item_id = item_id + 1
                self._enter(item, PENDING)
            case ItemClaimed():
                item = self._get(event)
                self._leave(item)
                item.attempt, item.lease_until_us, item.worker = event.attempt, event.lease_until_us, event.worker
                item.delayed = False
                self._enter(item, PROCESSING)
            case ItemSucceeded() | ItemCancelled():
                item = self._get(event)
                self._leave(item)
                item.gen += 1
                del self.items[item.item_id]
            case ItemReprioritized():
                item = self._get(event)
                self._leave(item)
                item.priority = event.priority
                if event.reason:
                    item.reason = event.reason
                if event.due_us:
                    item.due_us = event.due_us if event.exact_due else min(item.due_us, event.due_us)
                self._enter(item, item.status)
            case ItemRetryScheduled():
                item = self._get(event)
                self._leave(item)
                item.failures, item.not_before_us = event.failures, event.not_before_us
                item.last_error, item.code, item.delayed = event.error, event.code, True
                self._enter(item, PENDING)
            case ItemDeadLettered():
                item = self._get(event)
                self._leave(item)
                item.failures, item.last_error, item.code = event.failures, event.error, event.code
                self._enter(item, FAILED)
            case ItemReleased():
                item = self._get(event)
                self._leave(item)
                if event.not_before_us:  # held back (a farm outage): waits in the delayed heap, as a retry does
                    item.not_before_us, item.delayed = event.not_before_us, True
                self._enter(item, PENDING)
            case ItemHoldLifted():
                item = self._get(event)
                if item.status != PENDING:
                    raise QueueStateError(f"hold lifted from item {item.item_id}, which is {item.status}, not waiting")
                self._leave(item)
                item.not_before_us = event.not_before_us  # still delayed: the delayed heap hands it over at once
                self._enter(item, PENDING)
            case ItemRequeued():
                item = self._get(event)
                self._leave(item)
                item.failures = item.attempt = 0
                item.not_before_us = event.requeued_us or item.not_before_us
                item.due_us = event.requeued_us or item.due_us
                self._enter(item, PENDING)
            case _:
                raise TypeError(f"QueueState cannot apply {type(event).__name__}")

    # ------------------------------------------------------------------ snapshots

    def dump(self) -> bytes:
        """Canonical bytes of the logical state (items by id); the heaps are rebuilt on load."""
        items = self.items
        rows = [_ROW_OF(items[i]) for i in sorted(items)]  # ids ascend in insertion order: the sort is one pass
        return msgspec.json.encode({"next_item_id": self.next_item_id, "items": rows})

    @classmethod
    def load(cls, data: bytes) -> QueueState:
        raw = msgspec.json.decode(data)
        state = cls()
        state.next_item_id = raw["next_item_id"]
        for row in raw["items"]:
            item = QueueItem.from_row(row)
            state.items[item.item_id] = item
            status = item.status
            # waiting out a retry or a hold (a release's not-before time, later than its enqueue): the delayed heap
            # moves it to the ready heap at the first claim after that time, as the live state's would
            item.delayed = status == PENDING and (item.failures > 0 or item.not_before_us > item.enqueued_us)
            state._enter(item, status)
        return state

    def check_invariants(self) -> None:
        """Raise AssertionError if the indexes disagree with the items (tests and ``verify``)."""
        waiting: dict[int, int] = {}
        processing: dict[int, int] = {}
        failed = 0
        for item in self.items.values():
            if item.status == PENDING:
                assert item.conid not in waiting, f"two waiting items for conid {item.conid}"
                waiting[item.conid] = item.item_id
            elif item.status == PROCESSING:
                assert item.conid not in processing, f"two processing items for conid {item.conid}"
                processing[item.conid] = item.item_id
            else:
                assert item.status == FAILED, item.status
                failed += 1
            assert item.item_id < self.next_item_id
        assert waiting == self._waiting, "waiting index out of step"
        assert processing == self._processing, "processing index out of step"
        assert failed == self._failed_count == sum(len(v) for v in self._failed.values())
