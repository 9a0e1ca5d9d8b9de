"""The Queue: the persistent refresh queue of DESIGN.md section 4, as an event-sourced actor.

The state (:class:`~actors.queue_state.QueueState`) is pure; this actor
reads the clock, decides which events a command causes, persists them, and
answers once they are durable. Times travel inside the events, so a replay
is deterministic.

Rules, including the ones section 4 leaves open:

* **Coalescing.** At most one *waiting* (PENDING) item per contract. An
  Enqueue for a contract already waiting is absorbed; a better (lower)
  priority upgrades the waiting item (ItemReprioritized).
* **Enqueue while processing.** A contract whose item is PROCESSING may get
  one new waiting item (the refresh asked for after the claim must not be
  lost). It is not handed out while the first is still processing.
* **Back to waiting, with a waiting item already there.** When a PROCESSING
  item would return to PENDING (release, lease expiry, restart, retry after
  Fail) and its contract already has a waiting item, it is cancelled
  instead, "merged into" the waiting item, which takes the better of the two
  priorities and the earlier of the two due times. One refresh is owed, not two; the failure count of the merged
  item is dropped with it.
* **Claim order: staleness.** The item whose contract's quote is furthest
  past its target age (earliest ``due_us``) first, then the better priority,
  then enqueue time (then item id). A coalesced Enqueue keeps the better
  priority and the earlier due time. Items waiting out a retry backoff are
  not claimable before their not-before time. Leases expire by
  ``ExpireLeases`` and before every Claim.
* **Idle-only enqueue** (``only_if_idle``): absorbed when the contract has any
  waiting, processing or dead-lettered item.
* **Never priced, then priced elsewhere** (``reschedule_never_priced``): a
  waiting item due as never priced takes the command's (later) due time, so
  the portfolio floor's price lets active contracts without a line go first.
* **Fail:** retry after ``min(backoff_base_s * 2**(attempt-1), backoff_cap_s)``
  until ``max_attempts`` attempts have failed, then FAILED (dead letter). A
  ``terminal`` Fail (no subscription even for delayed data, no such contract)
  dead-letters at once: retrying cannot help and would only storm IB.
  Release and lease expiry do not count an attempt.
* **Leases expire on their own:** a timer in the actor tells it
  ``ExpireLeases`` every ``lease_check_s``, so work a worker dropped returns
  even when no Claim comes (with an injected test clock the test drives it).
* **Stale acks** (Succeed/Fail/Release of an item that is not PROCESSING, or
  under an older lease when ``leases``/``lease_until_us`` is given) change
  nothing and are listed in ``QueueAck.ignored`` (item id -> why).
* **Cancel** drops the contract's waiting *and* processing item (it streams
  now); the in-flight snapshot's ack is then reported stale.
* **Requeue** puts the newest dead letter of the contract back to PENDING
  with its attempts reset; older dead letters of the same contract, or all of
  them when the contract is already waiting, are cancelled as merged.
* **Stop and restart:** a clean stop releases every PROCESSING item (reason
  ``restart``, no attempt counted) before the final snapshot. An item still
  PROCESSING at recovery was therefore in flight when the runtime died
  (crash, kill, power cut): that attempt counts, as a failure would (the
  retry is not delayed: the restart spaced it), so a contract whose snapshot
  crashes the process dead-letters after ``max_attempts`` runs instead of
  crashing every restart forever.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from loguru import logger

from actors.base import EventSourcedActor
from actors.messaging import CommandRejected, reject
from actors.queue_state import PROCESSING, QueueItem, QueueState
from actors.ticker import Ticker
from events.commands import CommandError, validate_command
from events.ib import TERMINAL_KINDS, classify_ib_code
from events.queue import (
    NEVER_PRICED_DUE_US,
    Cancel,
    Claim,
    Claimed,
    ClaimedItem,
    Enqueue,
    EnqueueMany,
    ExpireLeases,
    Fail,
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
    LiftHolds,
    QueueAck,
    QueueStats,
    QueueStatsReply,
    Release,
    Requeue,
    Succeed,
)
from events.registry import ContractActivated
from storage.event_log import EventLog, LogFailedError
from storage.snapshots import SnapshotStore

__all__ = ["QueueActor", "QueueState"]

_RELEASE_REASONS = frozenset({"lease_expired", "disconnected", "restart", "released"})
#: What a crash-counted attempt records as its error.
CRASHED_IN_FLIGHT = "in flight when the runtime died (no clean stop)"


def _passing(item: QueueItem) -> bool:
    """Whether a dead letter's failures may pass by themselves: not a lasting IB refusal, not a crash.

    A contract in flight each time the runtime died may be what kills it: only an operator brings it back.
    """
    if item.last_error == CRASHED_IN_FLIGHT:
        return False
    return item.code is None or classify_ib_code(item.code) not in TERMINAL_KINDS


def wall_clock_us() -> int:
    return time.time_ns() // 1000


def _cut(text: str) -> str:
    return text if len(text) <= 200 else text[:197] + "..."


class QueueActor(EventSourcedActor[QueueState]):
    """Owns the refresh queue; stream ``queue``.

    Handles (asked, in a Request): Enqueue, EnqueueMany, Succeed, Fail,
    Release, LiftHolds, Cancel, Requeue, ExpireLeases -> QueueAck; Claim -> Claimed;
    QueueStats -> QueueStatsReply. Told: the same commands (a refusal is
    logged), and the registry's ContractActivated (cancels the contract's items).
    Emits (stored): ItemEnqueued, ItemReprioritized, ItemClaimed, ItemSucceeded,
    ItemRetryScheduled, ItemDeadLettered, ItemReleased, ItemHoldLifted, ItemCancelled, ItemRequeued.
    Proxy queries: ``stats()``, ``summary(items)``.
    """

    stream: ClassVar[str] = "queue"
    state_type: ClassVar[type[Any]] = QueueState

    def __init__(
        self,
        log: EventLog,
        snapshots: SnapshotStore | None = None,
        *,
        clock: Callable[[], int] = wall_clock_us,
        max_attempts: int = 5,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 300.0,
        snapshot_every: int | None = None,
        lease_check_s: float | None = None,
        dead_letter_retry_s: float = 0.0,
    ) -> None:
        """``lease_check_s``: how often expired leases are returned; None: every second with the wall
        clock, never with an injected ``clock`` (a test that moves time sends ExpireLeases itself).

        ``dead_letter_retry_s``: a dead letter whose failures may pass (timeouts, no data: a closed or quiet
        market) is requeued this long after it failed for the last time; 0: only by an operator."""
        super().__init__(log, snapshots, snapshot_every=snapshot_every)
        if max_attempts < 1 or backoff_base_s < 0 or backoff_cap_s < backoff_base_s:
            raise ValueError("need max_attempts >= 1 and 0 <= backoff_base_s <= backoff_cap_s")
        if lease_check_s is None:
            lease_check_s = 1.0 if clock is wall_clock_us else 0.0
        if lease_check_s < 0:
            raise ValueError("lease_check_s must be >= 0 (0: no timer)")
        self.lease_check_s = lease_check_s
        self._lease_timer: Ticker | None = None
        self.clock = clock
        self.max_attempts = max_attempts
        self.backoff_base_us = int(backoff_base_s * 1_000_000)
        self.backoff_cap_us = int(backoff_cap_s * 1_000_000)
        if dead_letter_retry_s < 0:
            raise ValueError("dead_letter_retry_s must be >= 0 (0: never)")
        self.dead_letter_retry_us = int(dead_letter_retry_s * 1_000_000)
        #: Dead letters that may come back: item id -> when it failed for good (this run's clock; a restart
        #: starts their wait again), oldest first. Scheduling, not state: the requeue itself is an event.
        self._dead_since: dict[int, int] = {}

    def on_recovered(self) -> None:
        now = self.clock()
        for item in self.state.failed_items():
            self._note_dead(item, now)
        items = self.state.processing_items()
        for item in items:
            self._count_crash(item)
        if items:
            logger.warning(
                "queue: {} items were in flight when the last run died; each counts as a failed attempt", len(items)
            )
        if self.lease_check_s > 0:
            self._lease_timer = Ticker(self.actor_ref, ExpireLeases(), self.lease_check_s, name="queue-leases").start()

    def on_stop(self) -> None:
        """Stop the lease timer; give back the work in flight (a clean stop counts no attempt), then snapshot."""
        if self._lease_timer is not None:
            self._lease_timer.stop()
        if self.recovery_error is not None:
            return  # recovery stopped: the state is not the log's, so nothing is given back or stored
        try:
            for item in self.state.processing_items():
                self._return(item, "restart", "clean stop")
        except LogFailedError:
            logger.error("queue: the log failed, in-flight items stay PROCESSING (the next start counts them)")
        super().on_stop()

    def on_failure(self, *_: object) -> None:
        if self._lease_timer is not None:
            self._lease_timer.stop()

    # ------------------------------------------------------------------ queries (proxy)

    def stats(self) -> QueueStatsReply:
        pending, processing, failed = self.state.counts()
        by_priority = {str(p): n for p, n in self.state.pending_by_priority().items()}
        return QueueStatsReply(pending=pending, processing=processing, failed=failed, by_priority=by_priority)

    def summary(self, items: bool = False) -> dict[str, Any]:
        return self.state.summary(items)

    # ------------------------------------------------------------------ commands

    def handle_command(self, command: Any) -> Any:
        handler = _HANDLERS.get(type(command))
        if handler is None:
            config = getattr(type(command), "__struct_config__", None)
            raise reject(str(getattr(config, "tag", type(command).__name__)), "unknown_command", "not a queue command")
        try:
            command = validate_command(command)
        except CommandError as exc:
            raise reject(command, "invalid", exc.message, exc.field) from None
        return handler(self, command)

    def handle_message(self, message: Any) -> Any:
        handler = _TOLD.get(type(message))
        if handler is not None:  # a told command (the worker's acks, the router's refreshes owed): first
            try:
                handler(self, validate_command(message))
            except CommandError as exc:
                logger.warning("queue refused a told command: {}", reject(message, "invalid", exc.message, exc.field))
            except CommandRejected as exc:
                logger.warning("queue refused a told command: {}", exc)
            return None
        if isinstance(message, ContractActivated):
            self._cancel(message.conid, "activated", {})
            return None
        return super().handle_message(message)

    # ------------------------------------------------------------------ one handler a command, valid already

    def _on_enqueue(self, command: Enqueue) -> QueueAck:
        ignored: dict[str, str] = {}
        return QueueAck(changed=self._enqueue(command, self.clock(), ignored), ignored=ignored)

    def _on_enqueue_many(self, command: EnqueueMany) -> QueueAck:
        now, ignored = self.clock(), {}
        return QueueAck(changed=sum(self._enqueue(item, now, ignored) for item in command.items), ignored=ignored)

    def _on_succeed(self, command: Succeed) -> QueueAck:
        ignored: dict[str, str] = {}
        return QueueAck(changed=self._succeed(command, ignored), ignored=ignored)

    # A told command's reply is read by nobody: these handlers build neither the ack nor its reasons.

    def _told_enqueue(self, command: Enqueue) -> None:
        self._enqueue(command, self.clock(), None)

    def _told_enqueue_many(self, command: EnqueueMany) -> None:
        now, enqueue, holds = self.clock(), self._enqueue, self.state.holds
        for item in command.items:
            # The router's sweep: ~450 idle-only items, most not idle. One that cannot reschedule a never-priced
            # item is ignored by _enqueue exactly when the contract holds an item: skipped here for one call, not three.
            if item.only_if_idle and not item.reschedule_never_priced and holds(item.conid):
                continue
            enqueue(item, now, None)

    def _on_fail(self, command: Fail) -> QueueAck:
        now, ignored = self.clock(), {}
        item = self._live(command.item_id, command.lease_until_us, ignored)
        if item is not None:
            self._fail(item, command, now)
        return QueueAck(changed=0 if ignored else 1, ignored=ignored)

    def _on_release(self, command: Release) -> QueueAck:
        reason = command.reason
        kind = reason if reason in _RELEASE_REASONS else "released"
        not_before = self.clock() + int(command.hold_s * 1_000_000) if command.hold_s > 0 else 0
        ignored: dict[str, str] = {}
        changed = 0
        for item in self._live_items(command, ignored):
            self._return(item, kind, reason, not_before)
            changed += 1
        return QueueAck(changed=changed, ignored=ignored)

    def _on_lift_holds(self, command: LiftHolds) -> QueueAck:
        """Each named contract's waiting item, if it waits out a hold (not yet over), is claimable from now on.

        A hold's delay and a retry's backoff look alike in the state (a not-before time in the future): the
        worker names only contracts whose last snapshot was cut, not failed, so a delay it lifts is a hold.
        """
        now, state = self.clock(), self.state
        ignored: dict[str, str] = {}
        changed = 0
        for conid in command.conids:
            waiting = state.waiting_item(conid)
            if waiting is None or not waiting.delayed or waiting.not_before_us <= now:
                ignored[str(conid)] = "no held item"
                continue
            self.persist(
                ItemHoldLifted(item_id=waiting.item_id, conid=conid, not_before_us=now, reason=command.reason)
            )
            changed += 1
        return QueueAck(changed=changed, ignored=ignored)

    def _succeed(self, command: Succeed, ignored: dict[str, str] | None = None) -> int:
        """End each item of ``command`` still PROCESSING under the lease it names; how many ended.

        Told (no ``ignored``: nobody reads the reasons), it is the handler itself.
        """
        changed = 0
        for item in self._live_items(command, ignored):
            self.persist(ItemSucceeded(item_id=item.item_id, conid=item.conid))
            changed += 1
        return changed

    def _live_items(self, command: Succeed | Release, ignored: dict[str, str] | None) -> Iterator[QueueItem]:
        """The items of ``command`` still PROCESSING under the lease it names; why the others are not, in ``ignored``."""
        ids, leases = command.item_ids, command.leases
        if leases and len(leases) != len(ids):
            raise reject(command, "invalid", "leases must match item_ids one to one", "leases")
        for i, item_id in enumerate(ids):
            item = self._live(item_id, leases[i] if leases else None, ignored)
            if item is not None:
                yield item

    def _on_cancel(self, command: Cancel) -> QueueAck:
        ignored: dict[str, str] = {}
        return QueueAck(changed=self._cancel(command.conid, command.reason, ignored), ignored=ignored)

    def _on_requeue(self, command: Requeue) -> QueueAck:
        ignored: dict[str, str] = {}
        return QueueAck(changed=self._requeue(command, self.clock(), ignored), ignored=ignored)

    def _on_expire_leases(self, _: ExpireLeases) -> QueueAck:
        return QueueAck(changed=self._expire(self.clock()))

    def _on_stats(self, _: QueueStats) -> QueueStatsReply:
        return self.stats()

    # ------------------------------------------------------------------ decisions

    def _enqueue(self, command: Enqueue, now: int, ignored: dict[str, str] | None) -> int:
        """Owe ``command.conid`` a refresh; 1 if that changed the queue, else 0 and why in ``ignored`` (None: told)."""
        conid = command.conid
        state = self.state
        waiting = state.waiting_item(conid)
        if (
            command.reschedule_never_priced
            and waiting is not None
            and waiting.due_us == NEVER_PRICED_DUE_US
            and command.due_us > NEVER_PRICED_DUE_US
        ):
            self.persist(
                ItemReprioritized(
                    item_id=waiting.item_id,
                    conid=conid,
                    priority=waiting.priority,
                    reason="priced elsewhere: due by that price",
                    due_us=command.due_us,
                    exact_due=True,
                )
            )
            return 1
        if command.only_if_idle and (waiting is not None or state.holds(conid)):
            if ignored is not None:
                ignored[str(conid)] = "not idle: waiting, processing or dead-lettered"
            return 0
        due = command.due_us or now
        if waiting is None:
            self.persist(
                ItemEnqueued(
                    item_id=state.next_item_id,
                    conid=conid,
                    priority=command.priority,
                    reason=command.reason,
                    enqueued_us=now,
                    due_us=due,
                )
            )
            return 1
        if self._absorb(waiting, command.priority, due, command.reason):
            return 1
        if ignored is not None:
            ignored[str(conid)] = f"coalesced into waiting item {waiting.item_id}"
        return 0

    def _absorb(self, target: QueueItem, priority: int, due_us: int, reason: str) -> bool:
        """``target`` keeps the better priority and the earlier due time of what merges into it; True if it changed."""
        better = priority < target.priority
        sooner = due_us < target.due_us
        if not (better or sooner):
            return False
        self.persist(
            ItemReprioritized(
                item_id=target.item_id,
                conid=target.conid,
                priority=min(priority, target.priority),
                reason=reason if better else "",
                due_us=due_us if sooner else 0,
            )
        )
        return True

    def _on_claim(self, command: Claim) -> Claimed:
        now = self.clock()
        self._expire(now)
        lease_until = now + int(command.lease_s * 1_000_000)
        worker = command.worker
        claimed = []
        for item in self.state.take_ready(now, command.n):
            attempt = item.failures + 1
            self.persist(
                ItemClaimed(
                    item_id=item.item_id,
                    conid=item.conid,
                    attempt=attempt,
                    lease_until_us=lease_until,
                    worker=worker,
                )
            )
            claimed.append(
                ClaimedItem(
                    item_id=item.item_id,
                    conid=item.conid,
                    priority=item.priority,
                    attempt=attempt,
                    lease_until_us=lease_until,
                    due_us=item.due_us,
                )
            )
        return Claimed(items=claimed)

    def _live(self, item_id: int, lease: int | None, ignored: dict[str, str] | None) -> QueueItem | None:
        """The PROCESSING item an ack is about, or None (and why, in ``ignored`` unless None) if the ack is stale."""
        item = self.state.items.get(item_id)
        if item is not None and item.status == PROCESSING and (lease is None or lease == item.lease_until_us):
            return item
        if ignored is not None:
            if item is None:
                ignored[str(item_id)] = "unknown item (finished, cancelled or never enqueued)"
            elif item.status != PROCESSING:
                ignored[str(item_id)] = f"not processing (status {item.status})"
            else:
                ignored[str(item_id)] = f"stale lease {lease}: item was claimed again (lease {item.lease_until_us})"
        return None

    def _fail(self, item: QueueItem, command: Fail, now: int) -> None:
        attempt = item.attempt
        if attempt >= self.max_attempts or command.terminal:
            self.persist(
                ItemDeadLettered(
                    item_id=item.item_id, conid=item.conid, failures=attempt, error=command.error, code=command.code
                )
            )
            if not command.terminal:
                self._note_dead(item, now)
            return
        waiting = self.state.waiting_item(item.conid)
        if waiting is not None:
            self._merge(item, waiting, f"failed, retry merged into waiting item {waiting.item_id}: {command.error}")
            return
        delay = min(self.backoff_base_us * 2 ** (attempt - 1), self.backoff_cap_us)
        self.persist(
            ItemRetryScheduled(
                item_id=item.item_id,
                conid=item.conid,
                failures=attempt,
                not_before_us=now + delay,
                error=command.error,
                code=command.code,
            )
        )

    def _count_crash(self, item: QueueItem) -> None:
        """A PROCESSING item found at recovery: its attempt counts, and the last one dead-letters it.

        The count must stay with the contract: a waiting item of the same
        contract merges into the crashed one (not the other way round, as in
        ``_merge``), or a contract re-enqueued while in flight would start
        from zero after every crash and never dead-letter.
        """
        attempt = max(item.attempt, 1)
        waiting = self.state.waiting_item(item.conid)
        if waiting is not None:
            why = f"merged into item {item.item_id}, {CRASHED_IN_FLIGHT}"
            self.persist(ItemCancelled(item_id=waiting.item_id, conid=item.conid, reason=_cut(why)))
        if attempt >= self.max_attempts:
            self.persist(
                ItemDeadLettered(item_id=item.item_id, conid=item.conid, failures=attempt, error=CRASHED_IN_FLIGHT)
            )
            return
        self.persist(
            ItemRetryScheduled(
                item_id=item.item_id,
                conid=item.conid,
                failures=attempt,
                not_before_us=item.not_before_us,
                error=CRASHED_IN_FLIGHT,
            )
        )
        if waiting is not None:
            self._absorb(item, waiting.priority, waiting.due_us, waiting.reason)

    def _return(self, item: QueueItem, kind: str, detail: str, not_before_us: int = 0) -> None:
        """A PROCESSING item goes back to waiting (claimable from ``not_before_us``, 0: at once), or merges into the
        contract's waiting item (which keeps its own time: it was owed a refresh for another reason)."""
        waiting = self.state.waiting_item(item.conid)
        if waiting is None:
            self.persist(
                ItemReleased(item_id=item.item_id, conid=item.conid, reason=kind, detail=detail, not_before_us=not_before_us)  # type: ignore[arg-type]
            )
        else:
            self._merge(item, waiting, f"{kind}: merged into waiting item {waiting.item_id}")

    def _merge(self, item: QueueItem, waiting: QueueItem, why: str) -> None:
        priority, due_us, reason = item.priority, item.due_us, item.reason
        self.persist(ItemCancelled(item_id=item.item_id, conid=item.conid, reason=_cut(why)))
        self._absorb(waiting, priority, due_us, reason)

    def _expire(self, now: int) -> int:
        expired = self.state.expired(now)
        for item in expired:
            self._return(item, "lease_expired", "")
        if self._dead_since:
            self._revive(now)
        return len(expired)

    def _note_dead(self, item: QueueItem, now: int) -> None:
        """Start the wait of a dead letter that may come back by itself (see ``dead_letter_retry_s``)."""
        if self.dead_letter_retry_us and _passing(item):
            self._dead_since.pop(item.item_id, None)  # re-inserted: the dict stays in order of time
            self._dead_since[item.item_id] = now

    def _revive(self, now: int) -> None:
        """Requeue the dead letters whose wait is over (their failures may have passed: a market opened)."""
        due = []
        for item_id, since in self._dead_since.items():  # oldest first: stop at the first still waiting
            if now - since < self.dead_letter_retry_us:
                break
            due.append(item_id)
        for item_id in due:
            del self._dead_since[item_id]
            item = self.state.items.get(item_id)
            if item is None or item not in self.state.dead_letters(item.conid):
                continue  # an operator requeued or cancelled it meanwhile
            wait_s = self.dead_letter_retry_us // 1_000_000
            reason = _cut(f"dead letter retried after {wait_s} s: {item.last_error}")
            if self._requeue(Requeue(conid=item.conid, reason=reason), now, {}):
                self.announce("INFO", "queue: contract {} retried {} s after it was dead-lettered", item.conid, wait_s)

    def _cancel(self, conid: int, reason: str, ignored: dict[str, str]) -> int:
        items = [it for it in (self.state.waiting_item(conid), self.state.processing_item(conid)) if it is not None]
        for item in items:
            self.persist(ItemCancelled(item_id=item.item_id, conid=conid, reason=reason))
        if not items:
            ignored[str(conid)] = "nothing waiting or processing"
        return len(items)

    def _requeue(self, command: Requeue, now: int, ignored: dict[str, str]) -> int:
        dead = self.state.dead_letters(command.conid)
        if not dead:
            ignored[str(command.conid)] = "no dead-lettered item"
            return 0
        waiting = self.state.waiting_item(command.conid)
        if waiting is None:
            newest = dead.pop()
            self.persist(
                ItemRequeued(item_id=newest.item_id, conid=newest.conid, reason=command.reason, requeued_us=now)
            )
            target = newest.item_id
        else:
            target = waiting.item_id
        for item in dead:
            self.persist(
                ItemCancelled(item_id=item.item_id, conid=item.conid, reason=f"requeue: merged into item {target}")
            )
        return 1


#: The handler of each command type (asked), looked up by its exact type: three commands a snapshot come in.
_HANDLERS: dict[type, Callable[[QueueActor, Any], Any]] = {
    Enqueue: QueueActor._on_enqueue,
    EnqueueMany: QueueActor._on_enqueue_many,
    Claim: QueueActor._on_claim,
    Succeed: QueueActor._on_succeed,
    Fail: QueueActor._on_fail,
    Release: QueueActor._on_release,
    LiftHolds: QueueActor._on_lift_holds,
    Cancel: QueueActor._on_cancel,
    Requeue: QueueActor._on_requeue,
    ExpireLeases: QueueActor._on_expire_leases,
    QueueStats: QueueActor._on_stats,
}
#: The handler of each told command: the same, but the worker's Succeed and the router's Enqueue(Many) build
#: no reply nobody would read (the router's sweep ignores most of its ~450 items as not idle).
_TOLD: dict[type, Callable[[QueueActor, Any], Any]] = {
    **_HANDLERS,
    Enqueue: QueueActor._told_enqueue,
    EnqueueMany: QueueActor._told_enqueue_many,
    Succeed: QueueActor._succeed,
}
