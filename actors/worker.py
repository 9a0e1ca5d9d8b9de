"""The QueueWorker: refreshes queued contracts with snapshots that hold no line between refreshes.

Every ``poll_interval_s`` it claims up to ``batch_size`` items, snapshots
them through the IB actor in chunks that fit the snapshot reserve (the IB
actor's own count of snapshots still open at IB is subtracted first, since a
snapshot can stay open after its first complete quote), publishes each
``MarketUpdate`` to the handlers, and acknowledges each item: Succeed,
Fail (the queue retries with backoff, then dead-letters), or Release when IB
is disconnected, which counts no attempt. While IB is disconnected it claims
nothing.

The worker never blocks its own thread on IB or the queue: each step is an
``ask_async`` whose answer comes back as a message, so disconnects and
status questions are handled while a batch is in flight.

Handles: Poll (timer), ConnectionStateChanged (from IB), WorkerStatus (ask).
Emits: Claim / Succeed / Fail / Release to the queue; Snapshot and IbStats
to IB; MarketUpdate(source="queue") to the handlers.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import msgspec
import pykka
from loguru import logger

from actors.handlers import HandlerSet
from actors.messaging import ReplyFuture, Request, ask_async
from actors.ticker import Ticker
from events.base import Command, Reply
from events.ib import (
    ConnectionState,
    ConnectionStateChanged,
    IbErrorKind,
    IbStats,
    Snapshot,
    SnapshotResult,
)
from events.queue import Claim, ClaimedItem, Fail, Release, Succeed

__all__ = ["Poll", "QueueWorker", "WorkerSettings", "WorkerStatus", "WorkerStatusReply"]

_UP = {ConnectionState.CONNECTED, ConnectionState.RESTORED_DATA_KEPT, ConnectionState.RESTORED_DATA_LOST}


class WorkerSettings(msgspec.Struct, frozen=True, kw_only=True):
    poll_interval_s: float = 5.0
    batch_size: int = 50
    snapshot_reserve: int = 10
    lease_s: float = 60.0
    snapshot_timeout_s: float = 11.0
    #: When the reserve is full, look again after this long.
    reserve_retry_s: float = 0.05


class Poll(Command, tag="worker.poll", frozen=True, kw_only=True):
    """Start a cycle now if none is running (the timer sends it; tests may too)."""


class WorkerStatus(Command, tag="worker.status", frozen=True, kw_only=True):
    pass


class WorkerStatusReply(Reply, tag="worker.status_reply", frozen=True, kw_only=True):
    connected: bool
    busy: bool
    cycles: int
    succeeded: int
    failed: int
    released: int
    updates_published: int
    snapshots_in_flight: int


class _Claimed(msgspec.Struct, frozen=True):
    items: list[ClaimedItem]
    error: str = ""


class _Capacity(msgspec.Struct, frozen=True):
    in_flight: int
    connected: bool


class _Snapshotted(msgspec.Struct, frozen=True):
    items: list[ClaimedItem]
    result: SnapshotResult | None
    error: str = ""


class _Retry(msgspec.Struct, frozen=True):
    pass


class QueueWorker(pykka.ThreadingActor):
    """See the module docstring."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        queue: pykka.ActorRef[Any],
        ib: pykka.ActorRef[Any],
        handlers: HandlerSet,
        connected: bool = False,
        timer: bool = True,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.queue = queue
        self.ib = ib
        self.handlers = handlers
        self.connected = connected
        self._timer = timer
        self._ticker: Ticker | None = None
        self._pending: deque[ClaimedItem] = deque()
        self.busy = False
        self.in_flight = 0
        self.cycles = 0
        self.succeeded = 0
        self.failed = 0
        self.released = 0
        self.updates_published = 0

    def on_start(self) -> None:
        if self._timer:
            self._ticker = Ticker(self.actor_ref, Poll(), self.settings.poll_interval_s, name="worker-poll").start()

    def on_stop(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        if self._pending:
            self._release(list(self._pending), "released")
            self._pending.clear()

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Request):
            if isinstance(message.command, WorkerStatus):
                message.reply.set(self.status())
            elif isinstance(message.command, Poll):
                self._poll()
                message.reply.set(self.status())
            else:
                message.reply.set_exception(TypeError(f"worker takes no command {type(message.command).__name__}"))
            return None
        match message:
            case Poll():
                self._poll()
            case ConnectionStateChanged(state=state):
                was = self.connected
                self.connected = state in _UP
                if was and not self.connected:
                    logger.warning("worker: IB disconnected ({}); claimed items go back without an attempt", state)
            case _Claimed():
                self._claimed(message)
            case _Capacity():
                self._send_chunk(message)
            case _Snapshotted():
                self._snapshotted(message)
            case _Retry():
                self._next_chunk()
            case _:
                pass
        return None

    def status(self) -> WorkerStatusReply:
        return WorkerStatusReply(
            connected=self.connected,
            busy=self.busy,
            cycles=self.cycles,
            succeeded=self.succeeded,
            failed=self.failed,
            released=self.released,
            updates_published=self.updates_published,
            snapshots_in_flight=self.in_flight,
        )

    # ------------------------------------------------------------------ one cycle

    def _poll(self) -> None:
        if self.busy or not self.connected:
            return
        self.busy = True
        self.cycles += 1
        claim = Claim(n=self.settings.batch_size, lease_s=self.settings.lease_s, worker="worker")
        self._pipe(
            ask_async(self.queue, claim), lambda r: _Claimed(items=r.items), lambda e: _Claimed(items=[], error=e)
        )

    def _claimed(self, message: _Claimed) -> None:
        if message.error:
            logger.error("worker: claim failed: {}", message.error)
        self._pending.extend(message.items)
        self._next_chunk()

    def _next_chunk(self) -> None:
        if not self._pending:
            self.busy = False
            return
        if not self.connected:
            self._release(list(self._pending), "disconnected")
            self._pending.clear()
            self.busy = False
            return
        self._pipe(
            ask_async(self.ib, IbStats()),
            lambda r: _Capacity(in_flight=r.snapshots_in_flight, connected=r.connected),
            lambda e: _Capacity(in_flight=self.settings.snapshot_reserve, connected=False),
        )

    def _send_chunk(self, capacity: _Capacity) -> None:
        if not capacity.connected:
            self.connected = False
            self._next_chunk()
            return
        room = self.settings.snapshot_reserve - capacity.in_flight
        if room <= 0:
            timer = threading.Timer(self.settings.reserve_retry_s, self._tell_self, args=(_Retry(),))
            timer.daemon = True
            timer.start()
            return
        chunk = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
        self.in_flight = len(chunk)
        request = Snapshot(conids=[item.conid for item in chunk], timeout_s=self.settings.snapshot_timeout_s)
        self._pipe(
            ask_async(self.ib, request),
            lambda r: _Snapshotted(items=chunk, result=r),
            lambda e: _Snapshotted(items=chunk, result=None, error=e),
        )

    def _snapshotted(self, message: _Snapshotted) -> None:
        self.in_flight = 0
        items_by_conid: dict[int, list[ClaimedItem]] = {}
        for item in message.items:
            items_by_conid.setdefault(item.conid, []).append(item)
        if message.result is None:
            logger.error("worker: snapshot request failed: {}", message.error)
            self._release(message.items, "released")
            self._next_chunk()
            return
        done: list[int] = []
        for update in message.result.updates:
            self.handlers.publish(update)
            self.updates_published += 1
            done.extend(item.item_id for item in items_by_conid.pop(update.conid, []))
        release: list[ClaimedItem] = []
        for failure in message.result.failures:
            items = items_by_conid.pop(failure.conid, [])
            if failure.kind == IbErrorKind.DISCONNECTED:
                release.extend(items)
                continue
            for item in items:
                self.failed += 1
                error = f"{failure.kind}: {failure.message}"[:200]
                self._tell_queue(Fail(item_id=item.item_id, error=error, code=failure.code))
        for items in items_by_conid.values():  # the IB actor answered nothing for these
            release.extend(items)
        if done:
            self.succeeded += len(done)
            self._tell_queue(Succeed(item_ids=done))
        if release:
            self._release(release, "disconnected")
        self._next_chunk()

    # ------------------------------------------------------------------ plumbing

    def _release(self, items: list[ClaimedItem], reason: str) -> None:
        if not items:
            return
        self.released += len(items)
        try:
            self.queue.tell(Release(item_ids=[i.item_id for i in items], reason=reason))
        except pykka.ActorDeadError:
            logger.warning("worker: queue gone; {} claimed items return at lease expiry", len(items))

    def _tell_queue(self, message: Any) -> None:
        try:
            self.queue.tell(message)
        except pykka.ActorDeadError:  # only while shutting down: the leases bring the items back
            logger.warning("worker: queue gone; {} not sent, the lease returns the items", type(message).__name__)

    def _tell_self(self, message: Any) -> None:
        try:
            self.actor_ref.tell(message)
        except pykka.ActorDeadError:
            pass

    def _pipe(self, future: ReplyFuture, ok: Any, fail: Any) -> None:
        """When ``future`` settles, tell this actor ``ok(result)`` or ``fail(error text)``."""

        def done(f: ReplyFuture) -> None:
            try:
                message = ok(f.get(timeout=0))
            except Exception as exc:  # noqa: BLE001 - any failure becomes a message the actor handles
                message = fail(repr(exc))
            self._tell_self(message)

        future.add_done_callback(done)
