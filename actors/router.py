"""The StreamRouter: which contracts stream, which wait in the queue, and the slot budget.

Active contracts (held by a strategy in the registry) stream on a market
data line; every other known contract is refreshed through the queue. The
router is the only actor that decides this, so the line count has one owner.

The budget. ``max_lines - snapshot_reserve`` lines are for streams; the
worker keeps at most ``snapshot_reserve`` snapshots in flight. Streams are
counted from the moment the router decides to subscribe until the IB actor
confirms with ``StreamEnded`` that the cancel has left for IB (the IB actor
delays a cancel until the stream is old enough -- IB answers 354/300 to a
cancel a few ms after the request -- and sends in order). A freed line is
reused only after that confirmation, so lines in use never exceed
``max_lines``, not even between an unsubscribe and the subscribe it makes
room for.

Overflow. Active contracts beyond the budget are served by the queue at
priority 1 and promoted, oldest first, when a line frees. A 101 from IB
("max tickers": other clients of the account use lines too) demotes the
contract the same way and caps new streams at what IB accepted, for
``line_cap_hold_s``.

Persist before effect: each decision is a stored event (StreamStarted,
StreamStopped, OverflowQueued, StreamPromoted, StreamDemoted); the IB
request and the queue command it causes go out once that event is durable.
The router does not rebuild its streams from the log on restart: IB
forgets every stream with the connection, so it starts from the registry
and the positions IB reports.

Handles: ContractActivated, ContractDeactivated, LegAdded, LegRemoved (from
the registry); PositionChanged, MarketUpdate, IbError, ConnectionStateChanged
StreamEnded (from IB); ActiveAtStart (from the runtime); RefreshAll, RouterStatus (ask).
Emits: StreamStarted, StreamStopped, OverflowQueued, StreamPromoted,
StreamDemoted (stored); Subscribe / Unsubscribe to IB; Enqueue / EnqueueMany
/ Cancel to the queue; MarketUpdate to the handlers.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, ClassVar

import msgspec
import pykka
from loguru import logger

from actors.base import EventSourcedActor
from actors.handlers import HandlerSet
from actors.ticker import Ticker
from events.base import Command, Event, Reply
from events.ib import (
    ConnectionState,
    ConnectionStateChanged,
    IbError,
    IbErrorKind,
    MarketUpdate,
    MarketUpdates,
    PositionChanged,
    StreamEnded,
    Subscribe,
    Unsubscribe,
)
from events.queue import Cancel, Enqueue, EnqueueMany, Priority
from events.registry import ContractActivated, ContractDeactivated
from events.router import OverflowQueued, StreamDemoted, StreamPromoted, StreamStarted, StreamStopped
from storage.event_log import EventLog

__all__ = [
    "ActiveAtStart",
    "RefreshAll",
    "RouterSettings",
    "RouterState",
    "RouterStatus",
    "RouterStatusReply",
    "StreamRouter",
]


class RouterSettings(msgspec.Struct, frozen=True, kw_only=True):
    max_lines: int = 100
    snapshot_reserve: int = 10
    refresh_interval_s: float = 60.0
    line_cap_hold_s: float = 300.0

    @property
    def stream_budget(self) -> int:
        return max(0, self.max_lines - self.snapshot_reserve)


class RefreshAll(Command, tag="router.refresh_all", frozen=True, kw_only=True):
    """Enqueue every known non-streaming contract (the periodic refresh)."""


class RouterStatus(Command, tag="router.status", frozen=True, kw_only=True):
    pass


class ActiveAtStart(Command, tag="router.active_at_start", frozen=True, kw_only=True):
    """What the registry holds when the runtime starts (told after subscribing to it, so nothing is missed)."""

    conids: list[int]


class RouterStatusReply(Reply, tag="router.status_reply", frozen=True, kw_only=True):
    streams: int
    cancelling: int
    overflow: int
    active: int
    known: int
    budget: int
    line_cap: int | None = None


class RouterState:
    """Which contracts stream or wait for a line; changed only by apply(event)."""

    def __init__(self) -> None:
        self.streams: set[int] = set()
        self.overflow: OrderedDict[int, None] = OrderedDict()

    def apply(self, event: Event) -> None:
        match event:
            case StreamStarted(conid=c) | StreamPromoted(conid=c):
                self.streams.add(c)
                self.overflow.pop(c, None)
            case StreamStopped(conid=c):
                self.streams.discard(c)
                self.overflow.pop(c, None)
            case OverflowQueued(conid=c):
                self.overflow[c] = None
            case StreamDemoted(conid=c):
                self.streams.discard(c)
                self.overflow[c] = None
            case _:
                pass

    def dump(self) -> bytes:
        return msgspec.json.encode({"streams": sorted(self.streams), "overflow": list(self.overflow)})

    @classmethod
    def load(cls, data: bytes) -> RouterState:
        raw = msgspec.json.decode(data)
        state = cls()
        state.streams = set(raw["streams"])
        state.overflow = OrderedDict((c, None) for c in raw["overflow"])
        return state


class StreamRouter(EventSourcedActor[RouterState]):
    """The hybrid decision and the slot budget (see the module docstring)."""

    stream: ClassVar[str] = "router"
    state_type: ClassVar[type[Any]] = RouterState

    def __init__(
        self,
        log: EventLog,
        settings: RouterSettings,
        *,
        ib: pykka.ActorRef[Any],
        queue: pykka.ActorRef[Any],
        handlers: HandlerSet,
    ) -> None:
        super().__init__(log, None)
        self.settings = settings
        self.ib = ib
        self.queue = queue
        self.handlers = handlers
        self.active: set[int] = set()
        self.positions: dict[int, float] = {}
        self.subscribed_at: dict[int, float] = {}
        #: Streams decided off but whose cancel has not reached the IB actor yet: they still hold a line.
        self.cancelling: set[int] = set()
        self.line_cap: int | None = None
        self._cap_until = 0.0
        self._ticker: Ticker | None = None
        self.ticks_forwarded = 0

    # ------------------------------------------------------------------ lifecycle

    def recover(self) -> None:
        """Streams do not survive a restart (IB drops them with the connection): start empty."""

    def on_recovered(self) -> None:
        self._ticker = Ticker(
            self.actor_ref, RefreshAll(), self.settings.refresh_interval_s, name="router-refresh"
        ).start()

    def on_stop(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        for conid in sorted(self.state.streams | self.cancelling):
            self._tell_ib(Unsubscribe(conid=conid))
        super().on_stop()

    # ------------------------------------------------------------------ messages

    def on_receive(self, message: Any) -> Any:
        # The streaming hot path: every tick of every stream passes here, so it skips the base
        # class's envelope checks and the match below (benchmarks/ticks.py).
        kind = type(message)
        if kind is MarketUpdates:
            self.ticks_forwarded += len(message.updates)
            self.handlers.publish(message)
            return None
        if kind is MarketUpdate:
            self.ticks_forwarded += 1
            self.handlers.publish(message)
            return None
        return super().on_receive(message)

    def handle_command(self, command: Any) -> Any:
        match command:
            case RouterStatus():
                return self.status()
            case RefreshAll():
                return self._refresh_all()
        raise TypeError(f"router takes no command {type(command).__name__}")

    def handle_message(self, message: Any) -> Any:
        match message:
            case MarketUpdate():
                self.ticks_forwarded += 1
                self.handlers.publish(message)
            case ContractActivated(conid=conid):
                if conid not in self.active:
                    self.active.add(conid)
                    self._activate(conid, "activated")
            case ActiveAtStart(conids=conids):
                for conid in conids:  # an activation told meanwhile by the registry is not repeated
                    if conid not in self.active:
                        self.active.add(conid)
                        self._activate(conid, "active at start")
            case ContractDeactivated(conid=conid):
                if conid in self.active:
                    self.active.discard(conid)
                    self._deactivate(conid)
            case PositionChanged():
                self._position(message)
            case IbError(kind=IbErrorKind.MAX_TICKERS, conid=conid) if conid is not None:
                self._demote(conid, message)
            case ConnectionStateChanged(resubscribe=True) | ConnectionStateChanged(state=ConnectionState.CONNECTED):
                # also on the first connect: subscribes sent while IB was still connecting were refused
                # (the IB actor ignores a Subscribe for a stream it already has)
                self._resubscribe_all(message)
            case StreamEnded(conid=conid):
                self._line_freed(conid)
            case RefreshAll():
                self._refresh_all()
            case _:
                pass
        return None

    # ------------------------------------------------------------------ decisions

    def lines_held(self) -> int:
        return len(self.state.streams) + len(self.cancelling)

    def _limit(self) -> int:
        limit = self.settings.stream_budget
        if self.line_cap is not None:
            if time.monotonic() >= self._cap_until:
                logger.info("router: line cap of {} after IB's 101 lifted", self.line_cap)
                self.line_cap = None
            else:
                limit = min(limit, self.line_cap)
        return limit

    def _has_free_line(self) -> bool:
        return self.lines_held() < self._limit()

    def _activate(self, conid: int, reason: str) -> None:
        if conid in self.state.streams or conid in self.state.overflow:
            return
        if self._has_free_line():
            self.persist(
                StreamStarted(conid=conid, reason=reason, lines_in_use=self.lines_held() + 1, budget=self._limit())
            )
            self._start_stream_after_durable(conid)
        else:
            self.persist(OverflowQueued(conid=conid, lines_in_use=self.lines_held(), budget=self._limit()))
            self.announce("INFO", "router: no free line for active {}; served by the queue at top priority", conid)
            self.after_durable(
                lambda: self._tell_queue(Enqueue(conid=conid, priority=Priority.ACTIVE_OVERFLOW, reason="overflow"))
            )

    def _start_stream_after_durable(self, conid: int) -> None:
        def effect() -> None:
            self.subscribed_at[conid] = time.monotonic()
            self._tell_queue(Cancel(conid=conid, reason="streaming"))
            self._tell_ib(Subscribe(conid=conid))

        self.after_durable(effect)

    def _deactivate(self, conid: int) -> None:
        if conid in self.state.overflow:
            self.persist(StreamStopped(conid=conid, reason="deactivated while waiting for a line"))
            self.after_durable(lambda: self._tell_queue(Enqueue(conid=conid, reason="deactivated")))
            return
        if conid not in self.state.streams:
            return
        self.persist(StreamStopped(conid=conid, reason="deactivated"))
        self.cancelling.add(conid)  # holds its line until the IB actor says the cancel is out
        self._cancel_after_durable(conid)

    def _cancel_after_durable(self, conid: int) -> None:
        def effect() -> None:
            self._tell_queue(Enqueue(conid=conid, reason="deactivated"))
            self._tell_ib(Unsubscribe(conid=conid))

        self.after_durable(effect)

    def _line_freed(self, conid: int) -> None:
        if conid in self.cancelling:
            self.cancelling.discard(conid)
            self.subscribed_at.pop(conid, None)
            self._promote()

    def _promote(self) -> None:
        while self.state.overflow and self._has_free_line():
            conid = next(iter(self.state.overflow))
            self.persist(StreamPromoted(conid=conid))
            self.announce("INFO", "router: line free, {} promoted from the queue to a stream", conid)
            self._start_stream_after_durable(conid)

    def _demote(self, conid: int, error: IbError) -> None:
        if conid not in self.state.streams:
            return
        accepted = max(0, len(self.state.streams) - 1 + len(self.cancelling))
        self.line_cap = accepted
        self._cap_until = time.monotonic() + self.settings.line_cap_hold_s
        self.persist(StreamDemoted(conid=conid, code=error.code, reason=error.message[:200]))
        self.announce(
            "WARNING",
            "router: IB refused a stream for {} ({}); demoted to the queue, streams capped at {} for {:.0f}s",
            conid,
            error.code,
            accepted,
            self.settings.line_cap_hold_s,
        )
        self.subscribed_at.pop(conid, None)
        self.after_durable(
            lambda: self._tell_queue(Enqueue(conid=conid, priority=Priority.ACTIVE_OVERFLOW, reason="demoted"))
        )

    def _resubscribe_all(self, change: ConnectionStateChanged) -> None:
        streams = sorted(self.state.streams)
        logger.info("router: IB {}; (re)submitting {} streams", change.state, len(streams))

        def resubscribe() -> None:
            # after_durable keeps these behind the Subscribes of StreamStarted/StreamPromoted events that are
            # not durable yet (persist before effect), and in order with the Unsubscribes already queued
            now = time.monotonic()
            for conid in streams:
                self.subscribed_at[conid] = now
                self._tell_ib(Subscribe(conid=conid))

        self.after_durable(resubscribe)
        # cancels that were waiting are moot: IB forgot those streams too
        for conid in list(self.cancelling):
            self.cancelling.discard(conid)
        self._promote()

    def _position(self, change: PositionChanged) -> None:
        previous = self.positions.get(change.conid)
        self.positions[change.conid] = change.position
        if change.conid in self.active or previous == change.position:
            return
        if change.position == 0:
            return  # closed: nothing left to price (it is refreshed again if it reopens)
        reason = "new position" if previous is None else "position changed"
        self._tell_queue(Enqueue(conid=change.conid, reason=reason))

    def _refresh_all(self) -> Reply | None:
        due = [
            Enqueue(conid=c, reason="refresh") for c, qty in self.positions.items() if qty != 0 and c not in self.active
        ]
        # Active contracts waiting for a line are owed refreshes too, at top priority: without this an
        # overflowed contract got one snapshot and then nothing until a line freed.
        due += [
            Enqueue(conid=c, priority=Priority.ACTIVE_OVERFLOW, reason="overflow refresh") for c in self.state.overflow
        ]
        for start in range(0, len(due), 1000):
            self._tell_queue(EnqueueMany(items=due[start : start + 1000]))
        if self.line_cap is not None:
            self._promote()
        return self.status()

    # ------------------------------------------------------------------ outside world

    def status(self) -> RouterStatusReply:
        return RouterStatusReply(
            streams=len(self.state.streams),
            cancelling=len(self.cancelling),
            overflow=len(self.state.overflow),
            active=len(self.active),
            known=len(self.positions),
            budget=self.settings.stream_budget,
            line_cap=self.line_cap,
        )

    def _tell_ib(self, message: Any) -> None:
        try:
            self.ib.tell(message)
        except pykka.ActorDeadError:
            logger.error("router: the IB actor is gone; {} not sent", message)

    def _tell_queue(self, message: Any) -> None:
        try:
            self.queue.tell(message)
        except pykka.ActorDeadError:
            logger.error("router: the queue actor is gone; {} not sent", message)
