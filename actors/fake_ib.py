"""An in-memory, deterministic stand-in for the IB actor, for actor tests, benchmarks and the demo.

It answers the same messages as :class:`actors.ib.IbActor`, with the same
constructor shape, and keeps IB's rules that the rest of the system depends
on: a line limit answered with 101 (IbError MAX_TICKERS carrying the conid),
open snapshots holding lines, typed failures while disconnected, 1101 and
reconnects forgetting every stream and telling subscribers to resubscribe,
StreamEnded with the real actor's semantics (a cancel waits for
``min_stream_age_s``; see :class:`events.ib.StreamEnded`), and every position
then PositionsComplete before CONNECTED at each (re)connect.
Prices and greeks are functions of the conid and a tick counter, so two runs
produce the same updates. Faults are injected by settings or by the
``Inject*``/``Set*`` commands below; streaming ticks come on a timer
(``tick_interval_s``) and on demand (``PushTicks``).

IB's data realities, as the real actor meets them (see docs/operations.md,
"IB's data realities"): the true line limit (``line_limit``, below the
router's ``max_lines`` if you like), snapshot delays drawn from a seeded
range, resets on a socket that stays up (1100, 1101, 1102), farm blips (2103,
10182 per stream, streams re-requested once the farm is back or after a
backoff), unsubscribed contracts (354 with market data type 1/2; delayed data
with 3/4), a closed market (no live bid/ask; frozen values with type 2/4),
the snapshot rate limit (321) and portfolio updates (source "portfolio").
Every random choice comes from ``seed``.

Handles:
    Connect, Disconnect, Subscribe, Unsubscribe, RequestPositions,
    PushTicks, InjectDisconnect, InjectError, ClearError, InjectFarmBlip, InjectFarmOk,
    SetNeverAnswer, SetSnapshotLatency, SetLineLimit, SetMarketClosed (told);
    Request(Snapshot) -> SnapshotResult; Request(IbStats) -> IbStatsReply;
    AddSubscriber / RemoveSubscriber envelopes.
Emits: PositionChanged, PositionsComplete, MarketUpdate(source="stream"),
MarketUpdate(s)(source="portfolio"), StreamEnded, ConnectionStateChanged, IbError.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pykka
from loguru import logger

from actors.fake_ib_demo import demo_positions
from actors.ib_base import AddSubscriber, Publisher, RemoveSubscriber
from actors.messaging import Request, reject
from events.base import Command
from events.ib import (
    IB_NOT_CONNECTED,
    MARKET_DATA_TYPES,
    Connect,
    ConnectionState,
    ConnectionStateChanged,
    DataType,
    Disconnect,
    IbError,
    IbErrorKind,
    IbStats,
    IbStatsReply,
    MarketUpdate,
    MarketUpdates,
    PositionChanged,
    PositionsComplete,
    RequestPositions,
    Snapshot,
    SnapshotFailed,
    SnapshotResult,
    StreamEnded,
    StreamEndReason,
    Subscribe,
    Unsubscribe,
    classify_ib_code,
)

__all__ = [
    "AddSubscriber",
    "ClearError",
    "FakeIbActor",
    "FakeIbSettings",
    "InjectDisconnect",
    "InjectError",
    "InjectFarmBlip",
    "InjectFarmOk",
    "PushTicks",
    "RemoveSubscriber",
    "SetLineLimit",
    "SetMarketClosed",
    "SetNeverAnswer",
    "SetSnapshotLatency",
    "demo_positions",
]

_TERMINAL_CODES = frozenset({101, 200, 321, 354, 10089, 10168, 10182, 10186, 10197})
#: IB's texts, so that the fake's IbErrors classify like the real ones (321 is classified by its text).
_TEXTS = {
    321: "Error validating request.-'bW' : cause - Snapshot requests limitation exceeded:{n} per 1 second(s)",
    354: "Requested market data is not subscribed.",
    2103: "Market data farm connection is broken:usfarm",
    10182: "Failed to request live updates (disconnected).",
}
_CONNECTIVITY = {
    1100: ConnectionState.CONNECTIVITY_LOST,
    1101: ConnectionState.RESTORED_DATA_LOST,
    1102: ConnectionState.RESTORED_DATA_KEPT,
}


class FakeIbSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The fake account and its faults."""

    positions: list[PositionChanged] = msgspec.field(default_factory=list)
    #: Conids with a contract but no position (they can be streamed and snapshotted too).
    extra_conids: list[int] = msgspec.field(default_factory=list)
    line_limit: int = 100
    #: Streaming ticks for every stream this often (0 = only on PushTicks).
    tick_interval_s: float = 0.0
    #: Delay before a snapshot answers.
    snapshot_latency_s: float = 0.0
    #: Snapshots of these conids never answer (they time out).
    never_answer: list[int] = msgspec.field(default_factory=list)
    #: conid -> IB error code answered to every Subscribe or Snapshot of it.
    errors: dict[int, int] = msgspec.field(default_factory=dict)
    #: After an injected disconnect, reconnect after this long.
    reconnect_after_s: float = 0.0
    #: Drop the connection this often, as a gateway restart or a network blip does (0 = never) ...
    disconnect_every_s: float = 0.0
    #: ... and come back after this long.
    disconnect_for_s: float = 3.0
    #: An Unsubscribe's cancel waits until the stream is this old (the real actor's setting of the same name).
    min_stream_age_s: float = 0.0
    #: With a value above ``snapshot_latency_s``, each snapshot's delay is drawn from [latency, this] (seeded).
    snapshot_latency_max_s: float = 0.0
    #: Seed of every random choice (snapshot delays): two runs with one seed answer alike.
    seed: int = 0
    #: The reqMarketDataType the real actor sends (IbSettings.market_data_type): 1 live, 2 frozen, 3 delayed,
    #: 4 delayed-frozen.
    market_data_type: int = 4
    #: Contracts without a live data subscription: 354 with type 1/2, delayed quotes with type 3/4.
    unsubscribed: list[int] = msgspec.field(default_factory=list)
    #: The market is closed: live bid/ask are absent (IB's -1); with type 2/4 the last values, as "frozen".
    market_closed: bool = False
    #: Snapshot requests accepted in any ``snapshot_rate_window_s`` (0 = no limit); beyond it, 321.
    snapshot_rate_limit: int = 0
    snapshot_rate_window_s: float = 1.0
    #: Portfolio updates (updatePortfolio's marketPrice for every position) at connect and this often (0 = none).
    portfolio_interval_s: float = 0.0
    #: Re-request of streams a farm blip killed when the farm does not say it is back (the real actor's names).
    reissue_initial_s: float = 2.0
    reissue_max_s: float = 60.0


class PushTicks(Command, tag="fake_ib.push_ticks", frozen=True, kw_only=True):
    """Emit ``n`` rounds of streaming updates for every open stream, now."""

    n: int = 1


class InjectDisconnect(Command, tag="fake_ib.inject_disconnect", frozen=True, kw_only=True):
    """Drop the connection: DISCONNECTED, then CONNECTED with resubscribe=True (streams forgotten)."""


class InjectError(Command, tag="fake_ib.inject_error", frozen=True, kw_only=True):
    """Emit IB error ``code`` (1100/1101/1102 act on the connection); with a conid, it sticks to that conid."""

    code: int
    conid: int | None = None


class ClearError(Command, tag="fake_ib.clear_error", frozen=True, kw_only=True):
    """Stop answering ``conid``'s market data requests with the error an ``InjectError`` stuck to it."""

    conid: int


class SetNeverAnswer(Command, tag="fake_ib.set_never_answer", frozen=True, kw_only=True):
    conid: int
    never: bool = True


class SetSnapshotLatency(Command, tag="fake_ib.set_snapshot_latency", frozen=True, kw_only=True):
    seconds: float


class SetLineLimit(Command, tag="fake_ib.set_line_limit", frozen=True, kw_only=True):
    limit: int


class SetMarketClosed(Command, tag="fake_ib.set_market_closed", frozen=True, kw_only=True):
    closed: bool = True


class InjectFarmBlip(Command, tag="fake_ib.inject_farm_blip", frozen=True, kw_only=True):
    """A market data farm drops: 2103, then 10182 for every stream and open snapshot; the socket stays up.

    The farm comes back after ``down_s`` (None: on InjectFarmOk only); meanwhile every new market data
    request is answered 10182 too.
    """

    down_s: float | None = None


class InjectFarmOk(Command, tag="fake_ib.inject_farm_ok", frozen=True, kw_only=True):
    """The farm is back (2104, quiet as at the real actor): interrupted streams are re-requested at once."""


class _Due:
    """Timer envelope: something scheduled is due (a snapshot answer, a timeout, a tick, a reconnect)."""

    __slots__ = ("args", "what")

    def __init__(self, what: str, *args: Any) -> None:
        self.what = what
        self.args = args


@dataclass(eq=False)
class _Stream:
    """One open stream; ``started`` on the monotonic clock."""

    conid: int
    started: float
    cancel_pending: bool = False
    #: A Subscribe came while the cancel was pending: subscribe anew once the cancel is out.
    resubscribe: bool = False
    #: Killed by a farm blip (10182): holds no line; re-requested by the fake itself.
    interrupted: bool = False


@dataclass(eq=False)
class _Batch:
    conids: list[int]
    reply: pykka.Future[Any]
    answers: dict[int, MarketUpdate | SnapshotFailed] = field(default_factory=dict)
    open: set[int] = field(default_factory=set)  # conids holding a line while in flight


def _now_us() -> int:
    return time.time_ns() // 1000


class FakeIbActor(pykka.ThreadingActor):
    """The in-memory IB; see the module docstring."""

    def __init__(self, settings: FakeIbSettings, subscribers: Sequence[pykka.ActorRef[Any]] = ()) -> None:
        super().__init__()
        self.settings = settings
        self._publisher = Publisher(subscribers)
        self._contracts: dict[int, PositionChanged | None] = {p.conid: p for p in settings.positions}
        for conid in settings.extra_conids:
            self._contracts.setdefault(conid, None)
        self._line_limit = settings.line_limit
        self._latency = settings.snapshot_latency_s
        self._never = set(settings.never_answer)
        self._errors = dict(settings.errors)
        self._state = ConnectionState.DISCONNECTED
        self._ever_connected = False
        self._streams: dict[int, _Stream] = {}
        self._batches: set[_Batch] = set()
        self._tick = 0
        self._quote_cache: dict[tuple[int, int], dict[str, float]] = {}
        self._peak = 0
        self._requests = 0
        self._generation = itertools.count()
        self._timers: set[threading.Timer] = set()
        self._rng = random.Random(settings.seed)
        self._closed = settings.market_closed
        self._unsubscribed = frozenset(settings.unsubscribed)
        self._snapshot_times: deque[float] = deque()
        self._farm_down = False
        self._reissue_attempt = 0
        self._reissue_round = 0  # a due re-request round of an older number is stale
        self._connections = 0  # a portfolio timer of an older connection is stale

    # ------------------------------------------------------------- lifecycle
    def on_start(self) -> None:
        if self.settings.tick_interval_s > 0:
            self._later(self.settings.tick_interval_s, _Due("tick"))
        if self.settings.disconnect_every_s > 0:
            self._later(self.settings.disconnect_every_s, _Due("drop"))

    def on_stop(self) -> None:
        for timer in list(self._timers):
            timer.cancel()
        self._timers.clear()

    def _later(self, delay: float, due: _Due) -> None:
        ref = self.actor_ref

        def fire() -> None:
            self._timers.discard(timer)
            try:
                ref.tell(due)
            except pykka.ActorDeadError:
                pass

        timer = threading.Timer(delay, fire)
        timer.daemon = True
        self._timers.add(timer)
        timer.start()

    # -------------------------------------------------------------- helpers
    @property
    def _connected(self) -> bool:
        return self._state not in (ConnectionState.DISCONNECTED, ConnectionState.CONNECTING)

    def _lines(self) -> int:
        streams = sum(1 for s in self._streams.values() if not s.interrupted)
        return streams + sum(len(b.open) for b in self._batches)

    def _track(self) -> None:
        self._peak = max(self._peak, self._lines())

    def _set_state(self, state: ConnectionState, detail: str = "", resubscribe: bool = False) -> None:
        self._state = state
        self._publisher.publish(ConnectionStateChanged(state=state, detail=detail, resubscribe=resubscribe))

    def _error(self, code: int, conid: int | None = None, message: str = "", kind: IbErrorKind | None = None) -> None:
        message = message or _TEXTS.get(code, f"fake error {code}").format(n=self.settings.snapshot_rate_limit)
        kind = kind or classify_ib_code(code, message)
        logger.warning("fake IB error {} {} (conid {})", code, kind, conid)
        self._publisher.publish(IbError(code=code, kind=kind, conid=conid, message=message))

    def _quote(self, conid: int, source: str) -> MarketUpdate:
        """Deterministic prices: a function of the conid and the tick counter.

        The price fields depend only on the conid and ``tick % 7``, so they are
        computed once per (conid, phase) and reused: building a tick is on the
        streaming hot path that ``benchmarks/ticks.py`` measures.
        """
        self._tick += 1
        key = (conid, self._tick % 7)
        fields = self._quote_cache.get(key)
        if fields is None:
            fields = self._quote_fields(conid, key[1])
            self._quote_cache[key] = fields
        update = MarketUpdate(conid=conid, source=source, ts_us=time.time_ns() // 1000, **fields)  # type: ignore[arg-type]
        if self._closed or conid in self._unsubscribed:
            kind = self._data_type(conid)
            if self._closed and kind in ("live", "delayed"):  # IB's -1: no quote, never a price
                return msgspec.structs.replace(update, bid=None, ask=None, bid_size=None, ask_size=None, data_type=kind)
            return msgspec.structs.replace(update, data_type=kind)
        return update

    def _data_type(self, conid: int) -> DataType:
        """What IB would send for ``conid`` with the requested market data type, as its tick 58 says."""
        frozen = self._closed and self.settings.market_data_type in (2, 4)
        if conid in self._unsubscribed:  # only reached with type 3/4 (1/2 are refused with 354)
            return MARKET_DATA_TYPES[4 if frozen else 3]
        return MARKET_DATA_TYPES[2 if frozen else 1]

    def _quote_fields(self, conid: int, phase: int) -> dict[str, float]:
        base = 20.0 + (conid * 7919) % 400 + (conid % 100) / 100.0
        bid = round(base + 0.01 * phase, 2)
        pos = self._contracts.get(conid)
        greeks: dict[str, float] = {}
        if pos is not None and pos.sec_type in ("OPT", "FOP"):
            sign = 1.0 if pos.right == "C" else -1.0
            bid = round(1.0 + (conid % 50) / 10.0 + 0.01 * phase, 2)
            greeks = {
                "iv": 0.2 + (conid % 10) / 100.0,
                "delta": sign * (0.3 + (conid % 40) / 100.0),
                "gamma": 0.02,
                "vega": 0.11,
                "theta": -0.05,
                "und_price": round(pos.strike * (1 + ((conid % 11) - 5) / 100.0), 2),
            }
        return {
            "bid": bid,
            "ask": round(bid + 0.02, 2),
            "last": round(bid + 0.01, 2),
            "close": round(bid - 0.5, 2),
            "bid_size": 100.0,
            "ask_size": 200.0,
            **greeks,
        }

    # -------------------------------------------------------------- messages
    def on_receive(self, message: Any) -> Any:
        if self._publisher.handle(message):
            return None
        match message:
            case Request(command=Snapshot(conids=conids, timeout_s=timeout_s), reply=reply):
                self._snapshot(list(conids), timeout_s, reply)
            case Request(command=IbStats(), reply=reply):
                reply.set(self._stats())
            case Request(command=command, reply=reply):
                if isinstance(command, Command) and not isinstance(command, Snapshot | IbStats):
                    self.on_receive(command)
                    reply.set(None)
                else:
                    reply.set_exception(reject(type(command).__name__, "unsupported", "not an IB command"))
            case Connect():
                self._connect()
            case Disconnect():
                self._drop("disconnect requested")
            case Subscribe(conid=conid):
                self._subscribe(conid)
            case Unsubscribe(conid=conid):
                self._unsubscribe(conid)
            case RequestPositions():
                if self._connected:
                    self._requests += 1
                    self._publish_positions()
                else:
                    self._error(IB_NOT_CONNECTED, kind=IbErrorKind.DISCONNECTED, message="not connected")
            case PushTicks(n=n):
                for _ in range(n):
                    self._push_ticks()
            case InjectDisconnect():
                self._inject_disconnect()
            case InjectError(code=code, conid=conid):
                self._inject_error(code, conid)
            case ClearError(conid=conid):
                self._errors.pop(conid, None)
            case SetNeverAnswer(conid=conid, never=never):
                (self._never.add if never else self._never.discard)(conid)
            case SetSnapshotLatency(seconds=seconds):
                self._latency = seconds
            case SetLineLimit(limit=limit):
                self._line_limit = limit
            case SetMarketClosed(closed=closed):
                self._closed = closed
            case InjectFarmBlip(down_s=down_s):
                self._farm_blip(down_s)
            case InjectFarmOk():
                self._farm_ok()
            case _Due():
                self._due(message)
            case _:
                logger.warning("FakeIbActor ignored {!r}", message)
        return None

    # ------------------------------------------------------------ connection
    def _connect(self) -> None:
        if self._connected:
            return
        # As the real actor (ib_insync syncs positions inside connectAsync): positions first, then CONNECTED.
        self._publish_positions()
        self._connections += 1
        if self.settings.portfolio_interval_s > 0:  # connectAsync's account download, then IB's own cadence
            self._publish_portfolio()
            self._later(self.settings.portfolio_interval_s, _Due("portfolio", self._connections))
        self._set_state(ConnectionState.CONNECTED, "fake connected", resubscribe=self._ever_connected)
        self._ever_connected = True

    def _publish_positions(self) -> None:
        for pos in self.settings.positions:
            self._publisher.publish(pos)
        self._publisher.publish(PositionsComplete(ts_us=_now_us()))

    def _publish_portfolio(self) -> None:
        """updatePortfolio for every position: its marketPrice as ``last``, no line used."""
        updates = [
            MarketUpdate(
                conid=p.conid,
                source="portfolio",
                ts_us=_now_us(),
                last=self._quote_fields(p.conid, 0)["last"],
                data_type=self._data_type(p.conid),
            )
            for p in self.settings.positions
        ]
        if len(updates) == 1:
            self._publisher.publish(updates[0])
        elif updates:
            self._publisher.publish(MarketUpdates(updates=updates))

    def _drop(self, detail: str) -> None:
        if not self._connected:
            return
        self._streams.clear()
        self._reissue_round += 1
        for batch in list(self._batches):
            self._fail_rest(batch, IbErrorKind.DISCONNECTED, IB_NOT_CONNECTED, "disconnected from IB")
        self._set_state(ConnectionState.DISCONNECTED, detail)

    def _inject_disconnect(self) -> None:
        self._drop("injected disconnect")
        if self.settings.reconnect_after_s > 0:
            self._later(self.settings.reconnect_after_s, _Due("reconnect"))
        else:
            self._connect()

    def _inject_error(self, code: int, conid: int | None) -> None:
        if code in _CONNECTIVITY:
            self._error(code)
            if code in (1100, 1101):  # a reset interrupts every open snapshot: back to the queue
                self._interrupt_snapshots(code, f"injected {code}")
            if code == 1101:
                self._streams.clear()
                self._reissue_round += 1
            if code == 1102:
                self._farm_ok()
            self._set_state(_CONNECTIVITY[code], f"injected {code}", resubscribe=code == 1101)
            if code == 1101:  # IB drops the account subscriptions too: the real actor asks for the positions again
                self._publish_positions()
            return
        if conid is None:
            self._error(code)
            return
        self._errors[conid] = code
        if conid in self._streams and code in _TERMINAL_CODES:
            del self._streams[conid]
            self._error(code, conid)
            self._stream_ended(conid, "refused", code)

    # ------------------------------------------------------------ farm blips
    def _farm_blip(self, down_s: float | None) -> None:
        if not self._connected:
            return
        self._farm_down = True
        self._error(2103, kind=IbErrorKind.INFO)
        for stream in list(self._streams.values()):
            if not stream.interrupted:
                self._interrupt(stream)
        self._interrupt_snapshots(10182, _TEXTS[10182])
        if down_s is not None:
            self._later(down_s, _Due("farm_ok"))

    def _interrupt(self, stream: _Stream) -> None:
        """10182 for ``stream``; as the real actor: re-requested later, StreamEnded only if a cancel was pending."""
        self._error(10182, stream.conid)
        if stream.cancel_pending:
            del self._streams[stream.conid]
            self._stream_ended(stream.conid, "cancelled")
            if stream.resubscribe:
                self._subscribe(stream.conid)
            return
        stream.interrupted = True
        delay = min(self.settings.reissue_max_s, self.settings.reissue_initial_s * 2**self._reissue_attempt)
        self._later(delay, _Due("reissue", self._reissue_round))

    def _interrupt_snapshots(self, code: int, message: str) -> None:
        for batch in list(self._batches):
            for conid in sorted(batch.open):
                if code == 10182:
                    self._error(code, conid)
                batch.answers[conid] = SnapshotFailed(
                    conid=conid, kind=IbErrorKind.DATA_INTERRUPTED, code=code, message=message
                )
            batch.open.clear()
            self._maybe_reply(batch)

    def _farm_ok(self) -> None:
        """The data is back (2104, quiet in the log; published as the real actor does): re-request interrupted
        streams now, backoff reset."""
        self._farm_down = False
        self._publisher.publish(IbError(code=2104, kind=IbErrorKind.INFO, message="Market data farm connection is OK:usfarm"))
        self._reissue_attempt = 0
        self._reissue()

    def _reissue(self) -> None:
        self._reissue_round += 1  # any round still due is covered by this one
        waiting = [s for s in self._streams.values() if s.interrupted]
        if not self._connected or not waiting:
            return
        self._reissue_attempt += 1
        for stream in waiting:
            self._requests += 1
            if self._farm_down:
                self._interrupt(stream)
            elif self._lines() >= self._line_limit:
                del self._streams[stream.conid]
                self._error(101, stream.conid)
                self._stream_ended(stream.conid, "refused", 101)
            else:
                stream.interrupted = False
                stream.started = time.monotonic()
                self._track()
                self._publisher.publish(self._quote(stream.conid, "stream"))

    # --------------------------------------------------------------- streams
    def _subscribe(self, conid: int) -> None:
        stream = self._streams.get(conid)
        if stream is not None:
            if stream.cancel_pending:
                stream.resubscribe = True  # the cancel goes out first, then a new stream (as the real actor)
            return
        if not self._connected:
            self._error(IB_NOT_CONNECTED, conid, "not connected", kind=IbErrorKind.DISCONNECTED)
            return
        self._requests += 1
        code = self._refusal(conid)
        if code is None and self._lines() >= self._line_limit:
            code = 101
        if code is not None:
            self._error(code, conid)
            if code in _TERMINAL_CODES:
                self._stream_ended(conid, "refused", code)
                return
        stream = _Stream(conid=conid, started=time.monotonic())
        self._streams[conid] = stream
        if self._farm_down:
            self._interrupt(stream)
            return
        self._track()
        self._publisher.publish(self._quote(conid, "stream"))

    def _unsubscribe(self, conid: int) -> None:
        stream = self._streams.get(conid)
        if stream is None:  # nothing held
            self._stream_ended(conid, "cancelled" if self._connected else "disconnected")
            return
        if stream.interrupted:  # dead at IB since the blip: nothing to cancel
            del self._streams[conid]
            self._stream_ended(conid, "cancelled")
            return
        stream.resubscribe = False
        if stream.cancel_pending:
            return  # already on its way; its StreamEnded answers this Unsubscribe too
        stream.cancel_pending = True
        wait = stream.started + self.settings.min_stream_age_s - time.monotonic()
        if wait > 0:
            self._later(wait, _Due("cancel", stream))
        else:
            self._cancel(stream)

    def _cancel(self, stream: _Stream) -> None:
        if self._streams.get(stream.conid) is not stream or not stream.cancel_pending:
            return  # gone with the connection, or refused, meanwhile
        self._requests += 1
        del self._streams[stream.conid]
        self._stream_ended(stream.conid, "cancelled")
        if stream.resubscribe:
            self._subscribe(stream.conid)

    def _stream_ended(self, conid: int, reason: StreamEndReason, code: int | None = None) -> None:
        self._publisher.publish(StreamEnded(conid=conid, reason=reason, code=code, ts_us=_now_us()))

    def _refusal(self, conid: int) -> int | None:
        if conid not in self._contracts:
            return 200
        code = self._errors.get(conid)
        if code is None and conid in self._unsubscribed and self.settings.market_data_type in (1, 2):
            return 354  # with 3/4 IB sends 10167 (advisory) and delayed data instead
        return code

    def _push_ticks(self) -> None:
        # one message per round, as the real actor sends one per socket read
        updates = [self._quote(c, "stream") for c in sorted(self._streams) if not self._streams[c].interrupted]
        if len(updates) == 1:
            self._publisher.publish(updates[0])
        elif updates:
            self._publisher.publish(MarketUpdates(updates=updates))

    # ------------------------------------------------------------- snapshots
    def _snapshot(self, conids: list[int], timeout_s: float, reply: pykka.Future[Any]) -> None:
        batch = _Batch(conids=list(dict.fromkeys(conids)), reply=reply)
        if not self._connected:
            self._fail_rest(batch, IbErrorKind.DISCONNECTED, IB_NOT_CONNECTED, "not connected")
            return
        if self._state == ConnectionState.CONNECTIVITY_LOST:  # as the real actor: nothing answers until 1101/1102
            self._fail_rest(batch, IbErrorKind.DATA_INTERRUPTED, 1100, "IB connectivity lost")
            return
        self._batches.add(batch)
        generation = next(self._generation)
        for conid in batch.conids:
            self._requests += 1
            code = self._refusal(conid)
            if code is None and self._farm_down:
                code = 10182
            if code is None and self._rate_limited():
                code = 321
            if code is None and self._lines() >= self._line_limit:
                code = 101
            if code is not None and code in _TERMINAL_CODES:
                self._error(code, conid)
                message = _TEXTS.get(code, "").format(n=self.settings.snapshot_rate_limit)
                kind = classify_ib_code(code, message)
                batch.answers[conid] = SnapshotFailed(conid=conid, kind=kind, code=code, message=message)
                continue
            batch.open.add(conid)
            self._track()
            if conid in self._never:
                continue
            latency = self._latency
            if self.settings.snapshot_latency_max_s > latency:
                latency = self._rng.uniform(latency, self.settings.snapshot_latency_max_s)
            if latency > 0:
                self._later(latency, _Due("answer", batch, conid, generation))
            else:
                self._answer(batch, conid)
        self._later(timeout_s, _Due("timeout", batch))
        self._maybe_reply(batch)

    def _rate_limited(self) -> bool:
        """IB's snapshot rate limit: True (321) past ``snapshot_rate_limit`` accepted requests in the window."""
        limit = self.settings.snapshot_rate_limit
        if limit <= 0:
            return False
        now = time.monotonic()
        times = self._snapshot_times
        while times and now - times[0] >= self.settings.snapshot_rate_window_s:
            times.popleft()
        if len(times) >= limit:
            return True
        times.append(now)
        return False

    def _answer(self, batch: _Batch, conid: int) -> None:
        if batch not in self._batches or conid in batch.answers:
            return
        batch.open.discard(conid)
        batch.answers[conid] = self._quote(conid, "queue")
        self._maybe_reply(batch)

    def _maybe_reply(self, batch: _Batch) -> None:
        # a batch whose last conid was answered inside _snapshot's loop has replied already
        if batch in self._batches and len(batch.answers) >= len(batch.conids):
            self._reply(batch)

    def _reply(self, batch: _Batch) -> None:
        self._batches.discard(batch)
        batch.open.clear()
        answers = [batch.answers[c] for c in batch.conids]
        batch.reply.set(
            SnapshotResult(
                updates=[a for a in answers if isinstance(a, MarketUpdate)],
                failures=[a for a in answers if isinstance(a, SnapshotFailed)],
            )
        )

    def _fail_rest(self, batch: _Batch, kind: IbErrorKind, code: int | None, message: str) -> None:
        for conid in batch.conids:
            batch.answers.setdefault(conid, SnapshotFailed(conid=conid, kind=kind, code=code, message=message))
        self._reply(batch)

    def _due(self, due: _Due) -> None:
        match due.what:
            case "tick":
                self._push_ticks()
                self._later(self.settings.tick_interval_s, _Due("tick"))
            case "answer":
                self._answer(due.args[0], due.args[1])
            case "timeout":
                batch = due.args[0]
                if batch in self._batches:
                    self._fail_rest(batch, IbErrorKind.TIMEOUT, None, "no complete quote within the timeout")
            case "reconnect":
                self._connect()
            case "drop":
                if self._connected:
                    self._drop("scheduled disconnect")
                    self._later(self.settings.disconnect_for_s, _Due("reconnect"))
                self._later(self.settings.disconnect_every_s, _Due("drop"))
            case "cancel":
                self._cancel(due.args[0])
            case "reissue":
                if due.args[0] == self._reissue_round:
                    self._reissue()
            case "farm_ok":
                self._farm_ok()
            case "portfolio":
                if due.args[0] == self._connections and self._connected:
                    self._publish_portfolio()
                    self._later(self.settings.portfolio_interval_s, _Due("portfolio", self._connections))

    # ----------------------------------------------------------------- stats
    def _stats(self) -> IbStatsReply:
        return IbStatsReply(
            connected=self._connected,
            state=self._state,
            streams=sum(1 for s in self._streams.values() if not s.interrupted),
            snapshots_in_flight=sum(len(b.open) for b in self._batches),
            lines_in_use=self._lines(),
            peak_lines=self._peak,
            requests_sent=self._requests,
        )
