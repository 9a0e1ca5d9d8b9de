"""The StreamRouter: which contracts stream, which wait in the queue, and the one line ledger.

Active contracts (held by a strategy in the registry) stream on a market
data line; every other known contract is refreshed by snapshots through the
queue. The router is the only actor that decides this, and it owns the
:class:`~actors.line_ledger.LineLedger`, the one place that counts lines:
streams, and the snapshot lines it lends the worker.

Lines. Streams may use the limit less ``min_snapshot_lines``; every line
not streaming is lent to snapshots. A stream holds its line from the
decision until the IB actor confirms with ``StreamEnded`` that its cancel
has left (the IB actor keeps a minimum stream age before cancelling and
sends in order), so a freed line is reused only after that confirmation.
The account's true limit is learned from IB's 101 and kept as an event
(``LineLimitLearned``); it is re-probed upward one line per ``line_probe_s``.

Ranking. When active contracts outnumber stream slots, the best-ranked
stream (strategy priority, nearest expiry, |delta| x position x multiplier)
and the rest are served by the queue at the overflow target. A waiting
contract takes a stream's line only when it outranks it *materially*
(:func:`actors.freshness.outranks`) and the stream has held its line for
``min_dwell_s``: no flapping. Every promotion and demotion is an event with
its reason.

Scheduling. There is no refresh timer. Every contract on the queue path has
one queue item due when its newest quote passes its target age
(``monitoring_s``, or ``overflow_s`` for active contracts without a line);
the queue hands out the most overdue first, and after each snapshot the
router owes the contract its next refresh. A slow sweep re-owes contracts
that somehow have no item (idle-only enqueues), so nothing is forgotten.

Persist before effect: each decision is a stored event; the IB request and
the queue command it causes go out once that event is durable. Streams do
not survive a restart (IB forgets them with the connection): recovery keeps
the learned limit and starts with no streams (``RouterRestarted``).

Handles: ContractActivated, ContractDeactivated, LegAdded, LegRemoved (from
the registry); PositionChanged, MarketUpdate(s), ConnectionStateChanged,
StreamEnded (from IB; a "refused" one demotes the stream, and its 101 teaches the limit); ActiveAtStart (runtime); AcquireLines, ReleaseLines,
SnapshotDone (worker); RouterStatus, ContractsQuery (ask); RouterTick (timer).
Emits: StreamStarted, StreamStopped, OverflowQueued, StreamPromoted,
StreamDemoted, LineLimitLearned, LineLimitProbed, RouterRestarted (stored);
Subscribe / Unsubscribe to IB; Enqueue / EnqueueMany / Cancel to the queue;
MarketUpdate to the handlers.
"""

from __future__ import annotations

import datetime as dt
import operator
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

import msgspec
import pykka
from loguru import logger

from actors.base import EventSourcedActor
from actors.freshness import Rank, age_summary, days_to_expiry, outranks
from actors.handlers import HandlerSet
from actors.line_ledger import PEAK_SETTLE_S, LineLedger
from actors.ticker import Ticker
from events.base import Command, Event, Reply
from events.ib import (
    DATA_FLOWS,
    ConnectionState,
    ConnectionStateChanged,
    MarketUpdate,
    MarketUpdates,
    PositionChanged,
    StreamEnded,
    Subscribe,
    Unsubscribe,
)
from events.queue import NEVER_PRICED_DUE_US, Cancel, Enqueue, EnqueueMany, Priority
from events.registry import ContractActivated, ContractDeactivated, LegAdded, LegRemoved
from events.router import (
    AcquireLines,
    ContractRow,
    ContractsQuery,
    ContractsReply,
    LineGrant,
    LineLimitLearned,
    LineLimitProbed,
    LinesGranted,
    OverflowQueued,
    ReleaseLines,
    RouterRestarted,
    SnapshotDone,
    StreamDemoted,
    StreamPromoted,
    StreamStarted,
    StreamStopped,
)
from storage.event_log import EventLog
from storage.snapshots import SnapshotStore

__all__ = [
    "ActiveAtStart",
    "RouterSettings",
    "RouterState",
    "RouterStatus",
    "RouterStatusReply",
    "RouterTick",
    "StreamRouter",
    "SweepNow",
]


#: Module constants: an enum member looked up on its class costs ~150 ns, and every refresh owed reads one.
_ACTIVE_OVERFLOW, _MONITORING = Priority.ACTIVE_OVERFLOW, Priority.MONITORING
_CONID = operator.attrgetter("conid")
_SOURCE = operator.attrgetter("source")
_OPTION_TYPES = frozenset({"OPT", "FOP"})
#: A stream IB refused for a reason other than lines waits (first, cap) seconds, doubling, before it is asked
#: for again: no subscription or no contract will not change soon.
_REFUSED_BACKOFF_S = (60.0, 3600.0)
#: 10197 "No market data during competing live session": the account's other login (TWS or the mobile app)
#: took the data. Account-wide and over when that login ends, typically within minutes: a shorter wait.
_COMPETING_SESSION = 10197
_COMPETING_BACKOFF_S = (30.0, 300.0)
#: After IB refused a stream's request past its message rate (100): a matter of the moment, not of the contract.
#: Longer than the IB actor's pause after a 100 (one pacing window, ~1.1 s), so the retry meets an empty window.
_PACING_RETRY_S = 2.0


class RouterSettings(msgspec.Struct, frozen=True, kw_only=True):
    max_lines: int = 100
    #: Lines streams never take: snapshots always have at least these.
    min_snapshot_lines: int = 2
    #: Target age of a non-active contract's price.
    monitoring_s: float = 60.0
    #: Target age of an active contract's price while it has no line.
    overflow_s: float = 5.0
    #: After a limit is learned, try one more line this often.
    line_probe_s: float = 300.0
    #: A line held this long without a 101 counts as accepted by IB (IB refuses on receipt).
    proof_s: float = 1.0
    #: A 101 caps a peak proven this soon before it: the proof may have raced the refusal (line_ledger.PEAK_SETTLE_S).
    peak_settle_s: float = PEAK_SETTLE_S
    #: A stream keeps its line at least this long before a better-ranked contract may take it.
    min_dwell_s: float = 30.0
    #: At equal priority and expiry, a waiting contract needs this many times the risk to take a line.
    risk_factor: float = 2.0
    #: Re-owe a refresh to every queue-path contract without an item this often (a safety net).
    sweep_s: float = 30.0
    #: The first sweep comes this soon after the start (after the first positions and portfolio), if
    #: sooner than ``sweep_s``.
    first_sweep_s: float = 3.0
    #: Housekeeping period: proofs by age, probes, re-ranking, reclaiming lost lines.
    tick_s: float = 0.5
    #: A lent snapshot line not given back within this is reclaimed (its answer was lost).
    lost_line_s: float = 120.0
    #: Snapshot lines before any limit is learned: this many above the proven level at a time.
    ramp_step: int = 2

    @classmethod
    def from_config(cls, fresh: Any, *, max_lines: int, snapshot_timeout_s: float) -> RouterSettings:
        """The router's settings from ``[freshness]`` (actors.config.FreshnessSettings), the runtime's
        ``max_lines`` and IB's snapshot timeout: one mapping for the runtime and the what-if replay."""
        return cls(
            max_lines=max_lines,
            min_snapshot_lines=fresh.min_snapshot_lines,
            monitoring_s=fresh.monitoring_s,
            overflow_s=fresh.overflow_s,
            line_probe_s=fresh.line_probe_s,
            min_dwell_s=fresh.min_dwell_s,
            risk_factor=fresh.risk_factor,
            lost_line_s=max(60.0, 4 * snapshot_timeout_s),
        )


class RouterStatus(Command, tag="router.status", frozen=True, kw_only=True):
    pass


class RouterTick(Command, tag="router.tick", frozen=True, kw_only=True):
    """Housekeeping (the router's timer sends it; tests may too)."""


class SweepNow(Command, tag="router.sweep_now", frozen=True, kw_only=True):
    """Owe a refresh now to every queue-path contract that has no queue item (the sweep, on demand)."""


class ActiveAtStart(Command, tag="router.active_at_start", frozen=True, kw_only=True):
    """What the registry holds when the runtime starts (told after subscribing to it, so nothing is missed)."""

    conids: list[int]
    #: conid -> {strategy: priority} for legs with a non-zero priority (absent: 0).
    priorities: dict[int, dict[str, int]] = {}


class RouterStatusReply(Reply, tag="router.status_reply", frozen=True, kw_only=True):
    streams: int
    cancelling: int
    overflow: int
    active: int
    known: int
    #: Stream slots: the limit less min_snapshot_lines.
    budget: int
    #: The learned limit (None until IB's first 101).
    line_cap: int | None = None
    max_lines: int = 0
    line_limit: int = 0
    lines_in_use: int = 0
    lines_free: int = 0
    snapshot_lines: int = 0
    proven_lines: int = 0
    #: path -> {count, never_priced, p50_s, p99_s, max_s, le}: the age of each contract's newest quote.
    ages: dict[str, dict[str, Any]] = {}


class RouterState:
    """Streams, the overflow, and the learned line limit; changed only by apply(event)."""

    snapshot_version: ClassVar[int] = 2

    def __init__(self) -> None:
        self.streams: set[int] = set()
        self.overflow: OrderedDict[int, None] = OrderedDict()
        self.learned_limit: int | None = None

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
            case LineLimitLearned(limit=limit) | LineLimitProbed(limit=limit):
                self.learned_limit = limit
            case RouterRestarted():
                self.streams.clear()
                self.overflow.clear()
            case _:
                pass

    def dump(self) -> bytes:
        return msgspec.json.encode(
            {"streams": sorted(self.streams), "overflow": list(self.overflow), "learned_limit": self.learned_limit}
        )

    @classmethod
    def load(cls, data: bytes) -> RouterState:
        raw = msgspec.json.decode(data)
        state = cls()
        state.streams = set(raw["streams"])
        state.overflow = OrderedDict((c, None) for c in raw["overflow"])
        state.learned_limit = raw.get("learned_limit")
        return state


@dataclass(slots=True)
class _Contract:
    """What the router knows of a contract from IB's positions (no line needed)."""

    symbol: str = ""
    local_symbol: str = ""
    sec_type: str = ""
    position: float = 0.0
    multiplier: float = 1.0
    expiry: str = ""


class StreamRouter(EventSourcedActor[RouterState]):
    """The hybrid decision and the line ledger (see the module docstring)."""

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
        snapshots: SnapshotStore | None = None,
        timer: bool = True,
        clock: Any = time.monotonic,
    ) -> None:
        super().__init__(log, snapshots)
        self.settings = settings
        self.ib = ib
        self.queue = queue
        self.handlers = handlers
        self._timer = timer
        self._clock = clock
        self.ledger = LineLedger(
            max_lines=settings.max_lines,
            min_snapshot_lines=min(settings.min_snapshot_lines, settings.max_lines - 1),
            ramp_step=settings.ramp_step,
            peak_settle_s=settings.peak_settle_s,
        )
        self.active: set[int] = set()
        self.contracts: dict[int, _Contract] = {}
        self.priorities: dict[int, dict[str, int]] = {}
        #: The newest quote of each contract: stream or snapshot; a portfolio mark only until the first of those.
        self.latest: dict[int, MarketUpdate] = {}
        self.last_error: dict[int, str] = {}
        #: Contracts whose snapshots cannot succeed (no subscription, no contract): priced by the portfolio only.
        self.unpriceable: set[int] = set()
        self.subscribed_at: dict[int, float] = {}
        #: Streams decided off but whose cancel has not reached the IB actor yet: they still hold a line.
        self.cancelling: set[int] = set()
        self._ticker: Ticker | None = None
        self._next_probe = 0.0
        self._probe_step = 1
        self._next_sweep = 0.0
        self._swap_pending = False
        self._demoted_at: dict[int, float] = {}
        #: Contracts IB refused to stream for a reason other than lines: not promoted again before this time.
        self._refused_until: dict[int, float] = {}
        self._refusals: dict[int, int] = {}
        self.ticks_forwarded = 0
        #: Whether IB's market data flowed at the last connection change logged (None: none logged by this run).
        self._data_flowing: bool | None = None

    # ------------------------------------------------------------------ lifecycle

    def on_recovered(self) -> None:
        self.ledger.learned = self.state.learned_limit
        if self.ledger.learned is not None:
            self.ledger.proven = self.ledger.limit  # IB accepted that many lines before
            logger.info("router: line limit {} learned earlier (max_lines {})", self.ledger.limit, self.ledger.max_lines)
        if self.state.streams or self.state.overflow:
            self.persist(RouterRestarted())
        now = self._clock()
        self._next_probe = now + self.settings.line_probe_s
        self._next_sweep = now + min(self.settings.sweep_s, self.settings.first_sweep_s)
        if self._timer:
            self._ticker = Ticker(self.actor_ref, RouterTick(), self.settings.tick_s, name="router-tick").start()

    def on_stop(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        if self.recovery_error is None:  # a router that never started holds no stream of this run
            for conid in sorted(self.state.streams | self.cancelling):
                self._tell_ib(Unsubscribe(conid=conid))
        super().on_stop()

    # ------------------------------------------------------------------ messages

    def on_receive(self, message: Any) -> Any:
        # The streaming hot path: every tick of every stream passes here, so it skips the base
        # class's envelope checks and the match below (benchmarks/ticks.py).
        kind = type(message)
        if kind is MarketUpdates:
            updates = message.updates
            if "portfolio" in set(map(_SOURCE, updates)):
                # the IB actor batches IB's portfolio marks with the ticks of the same socket read: each goes
                # through _note_quote, so that a mark neither hides a quote nor proves a stream's line
                for update in updates:
                    self._note_quote(update)
            else:
                # every quote is stamped when it arrives, so the last to arrive is the newest (one C-level update)
                self.latest.update(zip(map(_CONID, updates), updates, strict=True))
                if self.ledger.unproven:
                    for update in updates:
                        self._prove_stream(update.conid)
                if self._refusals:
                    for update in updates:
                        self._refusals.pop(update.conid, None)
            self.ticks_forwarded += len(message.updates)
            self.handlers.publish(message)
            return None
        if kind is MarketUpdate:
            self._note_quote(message)
            self.ticks_forwarded += 1
            self.handlers.publish(message)
            return None
        return super().on_receive(message)

    def handle_command(self, command: Any) -> Any:
        match command:
            case AcquireLines(n=n):  # the worker's, one a snapshot: first
                return self._lend(n)
            case RouterStatus():
                return self.status()
            case ContractsQuery():
                return self.contract_rows()
            case RouterTick():
                self._tick()
                return self.status()
            case SweepNow():
                self._sweep()
                return self.status()
        raise TypeError(f"router takes no command {type(command).__name__}")

    def handle_message(self, message: Any) -> Any:
        hot = _HOT_MESSAGES.get(type(message))
        if hot is not None:  # a few a snapshot, and the timer: looked up by type instead of matched in turn
            hot(self, message)
            return None
        match message:
            case ContractActivated(conid=conid):
                if conid not in self.active:
                    self.active.add(conid)
                    self._activate(conid, "activated")
            case ActiveAtStart(conids=conids, priorities=priorities):
                for conid, legs in priorities.items():
                    self.priorities.setdefault(conid, {}).update(legs)  # later LegAdded events update them
                # the highest priorities take the lines first (expiry and risk are known once IB sends positions;
                # the re-ranking then moves lines where they materially belong)
                top = {c: max(legs.values(), default=0) for c, legs in priorities.items()}
                for conid in sorted(conids, key=lambda c: (-top.get(c, 0), c)):
                    if conid not in self.active:
                        self.active.add(conid)
                        self._activate(conid, "active at start")
            case ContractDeactivated(conid=conid):
                if conid in self.active:
                    self.active.discard(conid)
                    self.priorities.pop(conid, None)
                    self._deactivate(conid)
            case LegAdded(conid=conid, strategy=strategy):
                self.priorities.setdefault(conid, {})[strategy] = getattr(message, "priority", 0)
            case LegRemoved(conid=conid, strategy=strategy):
                self.priorities.get(conid, {}).pop(strategy, None)
            case PositionChanged():
                self._position(message)
            case ConnectionStateChanged(resubscribe=resubscribe, state=state):
                self._journal_connection(message)
                if resubscribe or state == ConnectionState.CONNECTED:
                    # also on the first connect: subscribes sent while IB was still connecting were refused
                    # (the IB actor ignores a Subscribe for a stream it already has)
                    self._resubscribe_all(message)
            case StreamEnded(conid=conid, reason="refused", code=code):
                # stream-specific: an IbError's conid may belong to a snapshot of the same contract
                self._stream_refused(conid, code)
            case StreamEnded(conid=conid):
                self._line_freed(conid)
            case SweepNow():
                self._sweep()
            case _:
                pass
        return None

    # ------------------------------------------------------------------ the ledger

    def stream_lines(self) -> int:
        """Lines streams hold: streaming, plus cancels that have not left yet."""
        return len(self.state.streams) + len(self.cancelling)

    def lines_held(self) -> int:
        return self.ledger.lines_held(self.stream_lines())

    def _lend(self, n: int) -> LinesGranted:
        # streams first: lines an overflowed active contract could stream on are not lent to snapshots
        ledger, streams = self.ledger, len(self.state.streams) + len(self.cancelling)  # stream_lines(), one a snapshot
        promotable = min(len(self.state.overflow), max(0, ledger.stream_slots - streams))
        n = min(n, ledger.snapshot_room(streams) - promotable)
        lent = ledger.lend(n, streams, self._clock()) if n > 0 else []
        return LinesGranted(
            lines=[LineGrant(line_id=line.line_id, level=line.level) for line in lent],
            limit=ledger.limit,
            lines_held=ledger.lines_held(streams),
        )

    def _lines_returned(self, released: ReleaseLines) -> None:
        for line_id in released.line_ids:
            self.ledger.give_back(line_id)
        self._fill_lines()

    def _learn_limit(self, why: str) -> None:
        """IB refused a request: what is still held is what it accepts."""
        climbing = self.ledger.below_peak
        limit = self.ledger.limit_after_refusal(self.stream_lines(), self._clock())
        if limit is None:
            if climbing and not self.ledger.below_peak:  # the peak it climbed towards raced this 101: slow down
                self._probe_step = 1
                self._next_probe = self._clock() + self._probe_interval()
            return
        previous = self.state.learned_limit
        self.persist(LineLimitLearned(limit=limit, previous=previous, reason=why[:200]))
        self.ledger.learned = limit
        self.ledger.proven = min(self.ledger.proven, limit)
        self._probe_step = 1
        self._next_probe = self._clock() + self._probe_interval()
        self.announce("WARNING", "router: IB accepts {} lines ({}; max_lines {})", limit, why, self.ledger.max_lines)
        self._shed_streams(f"line limit {limit} learned")

    def _probe_interval(self) -> float:
        """A tenth of line_probe_s while below the level this run once held, else line_probe_s."""
        return self.settings.line_probe_s / (10 if self.ledger.below_peak else 1)

    def _shed_streams(self, why: str) -> None:
        """Streams above the stream slots give their lines back, worst-ranked first."""
        excess = len(self.state.streams) - self.ledger.stream_slots  # cancels under way are leaving already
        if excess <= 0:
            return
        for conid in sorted(self.state.streams, key=lambda c: self._rank(c).key(), reverse=True)[:excess]:
            self._demote(conid, why, code=None, cancel=True)

    # ------------------------------------------------------------------ decisions

    def _activate(self, conid: int, reason: str) -> None:
        if conid in self.state.streams or conid in self.state.overflow:
            return
        self.unpriceable.discard(conid)
        if self.ledger.stream_room(self.stream_lines()):
            self._start(conid, reason)
        else:
            self.persist(
                OverflowQueued(conid=conid, lines_in_use=self.lines_held(), budget=self.ledger.stream_slots)
            )
            self.after_durable(lambda: self._tell_queue(self._owed(conid, "overflow")))

    def _start(self, conid: int, reason: str, promoted: bool = False) -> None:
        level = self.lines_held() + 1
        if promoted:
            self.persist(StreamPromoted(conid=conid, reason=reason[:200]))
        else:
            self.persist(
                StreamStarted(conid=conid, reason=reason, lines_in_use=level, budget=self.ledger.stream_slots)
            )
        self.ledger.unproven[conid] = level

        def effect() -> None:
            self.subscribed_at[conid] = self._clock()
            self._tell_queue(Cancel(conid=conid, reason="streaming"))
            self._tell_ib(Subscribe(conid=conid))

        self.after_durable(effect)

    def _deactivate(self, conid: int) -> None:
        if conid in self.state.overflow:
            self.persist(StreamStopped(conid=conid, reason="deactivated while waiting for a line"))
            self.after_durable(lambda: self._tell_queue(self._owed(conid, "deactivated")))
            return
        if conid not in self.state.streams:
            return
        self.persist(StreamStopped(conid=conid, reason="deactivated"))
        self.ledger.unproven.pop(conid, None)
        self.cancelling.add(conid)  # holds its line until the IB actor says the cancel is out

        def effect() -> None:
            self._tell_queue(self._owed(conid, "deactivated"))
            self._tell_ib(Unsubscribe(conid=conid))

        self.after_durable(effect)

    def _demote(self, conid: int, why: str, *, code: int | None, cancel: bool) -> None:
        """The stream leaves its line for the queue at the overflow target (``cancel``: we end it at IB)."""
        self.persist(StreamDemoted(conid=conid, code=code, reason=why[:200]))
        self.ledger.unproven.pop(conid, None)
        self.announce("INFO", "router: stream {} demoted to the queue ({})", conid, why)
        if cancel:
            self.cancelling.add(conid)
        else:
            self.subscribed_at.pop(conid, None)

        def effect() -> None:
            self._tell_queue(self._owed(conid, "demoted"))
            if cancel:
                self._tell_ib(Unsubscribe(conid=conid))

        self.after_durable(effect)

    def _line_freed(self, conid: int) -> None:
        if conid in self.cancelling:
            self.cancelling.discard(conid)
            if conid not in self.state.streams:  # re-activated meanwhile: the new stream keeps its start time
                self.subscribed_at.pop(conid, None)
            self._swap_pending = False
            self._fill_lines()

    def _may_stream(self, conid: int, now: float) -> bool:
        """False while a contract IB refused to stream (no subscription, competing session, ...) waits out its backoff."""
        return self._refused_until.get(conid, 0.0) <= now

    def _fill_lines(self) -> None:
        """Give free stream slots to the best-ranked contracts waiting for a line."""
        now = self._clock()
        while self.state.overflow and self.ledger.stream_room(self.stream_lines()):
            waiting = [c for c in self.state.overflow if self._may_stream(c, now)]
            if not waiting:
                return
            best = min(waiting, key=lambda c: self._rank(c).key())
            self._start(best, "line free", promoted=True)

    def _stream_refused(self, conid: int, code: int | None) -> None:
        """IB refused or killed the stream: it holds no line (StreamEnded "refused" follows the IbError)."""
        if conid in self.state.streams:
            self.cancelling.discard(conid)  # the refusal answers a cancel still pending for it too
            self._demote(conid, f"IB refused the stream (error {code})", code=code, cancel=False)
        elif conid in self.cancelling:
            self.cancelling.discard(conid)  # shed meanwhile; its cancel is moot
        else:
            return
        self.last_error[conid] = f"stream refused: {code}"
        if code == 101:
            self._learn_limit(f"101 on stream {conid}")
        elif code == 100:
            # IB did not process the request (too many messages that second): nothing about lines or the
            # contract, so no doubling backoff -- stream it again once the IB actor's pause is over
            self._refused_until[conid] = self._clock() + _PACING_RETRY_S
        else:
            # not a matter of lines (no subscription, no contract, a competing session): the queue serves it,
            # and promoting it again at once would only earn the same refusal -- back off, doubling. The count
            # is the contract's refusals since it last streamed a quote (see _note_quote).
            n = self._refusals[conid] = self._refusals.get(conid, 0) + 1
            first, cap = _COMPETING_BACKOFF_S if code == _COMPETING_SESSION else _REFUSED_BACKOFF_S
            self._refused_until[conid] = self._clock() + min(cap, first * 2 ** (n - 1))
        self._fill_lines()

    def _journal_connection(self, change: ConnectionStateChanged) -> None:
        """Log when market data stops or starts flowing: the record of IB's outages (what-if replays them).

        Only a change between flowing and not is an event: a reconnect loop's
        connecting/disconnected churn during one outage is not news.
        """
        flowing = change.state in DATA_FLOWS
        if flowing != self._data_flowing:
            self._data_flowing = flowing
            self.persist(msgspec.structs.replace(change, detail=change.detail[:200]))

    def _resubscribe_all(self, change: ConnectionStateChanged) -> None:
        streams = sorted(self.state.streams)
        logger.info("router: IB {}; (re)submitting {} streams", change.state, len(streams))

        def resubscribe() -> None:
            # after_durable keeps these behind the Subscribes of StreamStarted/StreamPromoted events that are
            # not durable yet (persist before effect), and in order with the Unsubscribes already queued
            now = self._clock()
            for conid in streams:
                self.subscribed_at[conid] = now
                self._tell_ib(Subscribe(conid=conid))

        self.after_durable(resubscribe)
        # cancels that were waiting are moot: IB forgot those streams too
        self.cancelling.clear()
        self._swap_pending = False
        self._fill_lines()

    def _position(self, change: PositionChanged) -> None:
        info = self.contracts.get(change.conid)
        previous = None if info is None else info.position
        if info is None:
            info = self.contracts[change.conid] = _Contract()
        info.symbol, info.sec_type, info.position = change.symbol, change.sec_type, change.position
        info.multiplier, info.expiry = change.multiplier or 1.0, change.expiry
        if change.conid in self.active or change.position in (previous, 0):
            return  # streaming, unchanged, or closed (nothing left to price; refreshed again if it reopens)
        if previous is None:
            self._tell_queue(self._owed(change.conid, "new position"))
        else:
            self._tell_queue(Enqueue(conid=change.conid, reason="position changed"))  # owed a price now

    # ------------------------------------------------------------------ the scheduler

    def target_s(self, conid: int) -> float:
        if conid in self.state.streams:
            return 0.0
        return self.settings.overflow_s if conid in self.active else self.settings.monitoring_s

    def _owed(self, conid: int, reason: str, *, idle_only: bool = False) -> Enqueue:
        """The queue item that keeps ``conid`` within its target: due when its newest quote passes the target.

        ``idle_only`` (the sweep's): only if the contract has no item; and one priced only by the portfolio so
        far has its never-priced item, if any, dated by that price.
        """
        latest = self.latest.get(conid)
        priority = _ACTIVE_OVERFLOW if conid in self.active else _MONITORING
        # never priced: the stalest there is (due at the epoch), so it goes before every priced contract
        due = NEVER_PRICED_DUE_US if latest is None else latest.ts_us + int(self.target_s(conid) * 1_000_000)
        return Enqueue(
            conid=conid,
            priority=priority,
            reason=reason,
            due_us=max(1, due),
            only_if_idle=idle_only,
            reschedule_never_priced=idle_only and latest is not None and latest.source == "portfolio",
        )

    def _on_queue_path(self, conid: int) -> bool:
        if conid in self.state.streams:
            return False
        if conid in self.active:
            return conid in self.state.overflow
        info = self.contracts.get(conid)
        return info is not None and info.position != 0

    def _snapshot_done(self, done: SnapshotDone) -> None:
        line = self.ledger.give_back(done.line_id)
        conid = done.conid
        if done.update is not None:
            self._note_quote(done.update)
        match done.outcome:
            case "ok":
                if line is not None:
                    self.ledger.prove(line.level, self._clock())
                self.unpriceable.discard(conid)
                self.last_error.pop(conid, None)
                if self._on_queue_path(conid):
                    self._tell_queue(self._owed(conid, "refreshed"))
            case "refused":
                self.last_error[conid] = done.error
                self._learn_limit(f"101 on a snapshot of {conid}")
            case _:
                if done.error:
                    self.last_error[conid] = done.error
                if done.terminal:
                    self.unpriceable.add(conid)
        self._fill_lines()

    def _sweep(self) -> None:
        """Owe a refresh to queue-path contracts without an item; date never-priced items by a portfolio price."""
        on_path = self._on_queue_path
        owed = [self._owed(c, "sweep", idle_only=True) for c in [*self.contracts, *self.state.overflow] if on_path(c)]
        for start in range(0, len(owed), 1000):
            self._tell_queue(EnqueueMany(items=owed[start : start + 1000]))

    # ------------------------------------------------------------------ housekeeping

    def _tick(self) -> None:
        now = self._clock()
        for conid, level in list(self.ledger.unproven.items()):
            sent = self.subscribed_at.get(conid)
            if sent is not None and now - sent >= self.settings.proof_s:
                self._prove_stream(conid, level)
        proof_s = self.settings.proof_s
        # IB answers a 101 at once: a line it kept this long was accepted (the highest proves the others' levels)
        kept = [line.level for line in self.ledger.snapshots.values() if now - line.granted_at >= proof_s]
        if kept:
            self.ledger.prove(max(kept), now)
        for line in self.ledger.overdue(now, self.settings.lost_line_s):
            logger.warning("router: snapshot line {} lent {:.0f} s ago never came back; reclaimed", line.line_id, now - line.granted_at)
            self.ledger.give_back(line.line_id)
        if self.ledger.learned is None and self.ledger.proven >= self.ledger.max_lines:
            # every configured line was held without a refusal: the ceiling is the limit (a restart skips the ramp)
            self.persist(LineLimitLearned(limit=self.ledger.max_lines, previous=None, reason="max_lines held without a 101"))
            self.ledger.learned = self.ledger.max_lines
        if now >= self._next_probe:
            # below a level this run once held (other clients took lines for a while): climb back quickly,
            # doubling the step each probe IB accepts; above it, one line per line_probe_s
            climbing = self.ledger.below_peak
            target = self.ledger.probe_target(self._probe_step if climbing else 1)
            if target is not None:
                self.persist(LineLimitProbed(limit=target, previous=self.ledger.limit))
                self.ledger.learned = target
                logger.info("router: probing for more lines (limit {})", target)
            self._probe_step = min(64, self._probe_step * 2) if climbing else 1
            self._next_probe = now + self._probe_interval()
        if now >= self._next_sweep:
            self._next_sweep = now + self.settings.sweep_s
            self._sweep()
        self._fill_lines()
        self._rerank(now)

    def _prove_stream(self, conid: int, level: int | None = None) -> None:
        level = self.ledger.unproven.pop(conid, level)
        if level is not None:
            self.ledger.prove(level, self._clock())

    def _note_quote(self, update: MarketUpdate) -> None:
        if update.source == "portfolio":
            known = self.latest.get(update.conid)
            if known is not None and known.source != "portfolio":
                # a portfolio mark prices the position; it does not make its market data fresh: ages, the
                # status line and the refresh owed go by the newest stream or snapshot quote
                return
        self.latest[update.conid] = update
        if update.source == "stream":
            if self.ledger.unproven:
                self._prove_stream(update.conid)
            if self._refusals:
                self._refusals.pop(update.conid, None)  # it streams: its earlier refusals are history

    def _rank(self, conid: int) -> Rank:
        info = self.contracts.get(conid)
        priority = max(self.priorities.get(conid, {}).values(), default=0)
        if info is None:
            return Rank(priority=priority, days=days_to_expiry("", dt.date.today()), risk=0.0, conid=conid)
        latest = self.latest.get(conid)
        if latest is not None and latest.delta is not None:
            delta = latest.delta
        else:  # not known yet: an at-the-money guess for options, so a quote arriving moves ranks both ways
            delta = 0.5 if info.sec_type in _OPTION_TYPES else 1.0
        risk = abs(delta * info.position * info.multiplier)
        return Rank(priority=priority, days=days_to_expiry(info.expiry, dt.date.today()), risk=risk, conid=conid)

    def _rerank(self, now: float) -> None:
        """One swap at a time: the best waiting contract takes the worst stream's line if it materially outranks it."""
        if self._swap_pending or not self.state.overflow or not self.state.streams:
            return
        dwell = self.settings.min_dwell_s
        # both sides dwell: a stream keeps its line a while, and a contract that just lost one cannot claim it back
        waiting = [
            c
            for c in self.state.overflow
            if now - self._demoted_at.get(c, -dwell) >= dwell and self._may_stream(c, now)
        ]
        settled = [c for c in self.state.streams if now - self.subscribed_at.get(c, now) >= dwell]
        if not waiting or not settled:
            return
        best = min(waiting, key=lambda c: self._rank(c).key())
        worst = max(settled, key=lambda c: self._rank(c).key())
        if outranks(self._rank(best), self._rank(worst), self.settings.risk_factor):
            self._swap_pending = True
            self._demoted_at[worst] = now
            self._demote(worst, f"outranked by {best}", code=None, cancel=True)

    # ------------------------------------------------------------------ outside world

    def _path(self, conid: int) -> str:
        if conid in self.state.streams:
            return "stream"
        if conid in self.state.overflow:
            return "overflow"
        if conid in self.unpriceable:
            return "portfolio"
        return "queue"

    def _known(self) -> list[int]:
        known = {c for c, info in self.contracts.items() if info.position != 0}
        return sorted(known | self.active)

    def status(self) -> RouterStatusReply:
        now_us = time.time_ns() // 1000
        by_path: dict[str, list[float | None]] = {"stream": [], "overflow": [], "queue": [], "portfolio": []}
        for conid in self._known():
            latest = self.latest.get(conid)
            priced = latest is not None and latest.source != "portfolio"  # a mark alone is not market data
            by_path[self._path(conid)].append(max(0.0, (now_us - latest.ts_us) / 1e6) if priced else None)
        streams = self.stream_lines()
        return RouterStatusReply(
            streams=len(self.state.streams),
            cancelling=len(self.cancelling),
            overflow=len(self.state.overflow),
            active=len(self.active),
            known=len(self.contracts),
            budget=self.ledger.stream_slots,
            line_cap=self.ledger.learned,
            max_lines=self.ledger.max_lines,
            line_limit=self.ledger.limit,
            lines_in_use=self.ledger.lines_held(streams),
            lines_free=self.ledger.lines_free(streams),
            snapshot_lines=len(self.ledger.snapshots),
            proven_lines=self.ledger.proven,
            ages={path: age_summary(ages) for path, ages in by_path.items()},
        )

    def contract_rows(self) -> ContractsReply:
        now_us = time.time_ns() // 1000
        rows = []
        for conid in self._known():
            info = self.contracts.get(conid) or _Contract()
            latest = self.latest.get(conid)
            rows.append(
                ContractRow(
                    conid=conid,
                    symbol=info.symbol,
                    local_symbol=info.local_symbol,
                    sec_type=info.sec_type,
                    path=self._path(conid),  # type: ignore[arg-type]
                    active=conid in self.active,
                    position=info.position,
                    last_quote_us=None if latest is None else latest.ts_us,
                    age_s=None if latest is None else round(max(0.0, (now_us - latest.ts_us) / 1e6), 3),
                    source="" if latest is None else latest.source,
                    data_type="" if latest is None else latest.data_type,
                    target_s=self.target_s(conid),
                    last_error=self.last_error.get(conid, ""),
                )
            )
        return ContractsReply(rows=rows, now_us=now_us)

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


#: Told messages the router takes a few times a snapshot (and its timer's), handled before the match.
_HOT_MESSAGES: dict[type, Any] = {
    SnapshotDone: StreamRouter._snapshot_done,
    ReleaseLines: StreamRouter._lines_returned,
    RouterTick: lambda router, _: router._tick(),
}
