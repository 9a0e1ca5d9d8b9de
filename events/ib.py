"""Messages to and from the IB connection actor (real, or the fake one).

ib_insync's mutable camelCase objects never leave the IB actor: they are
turned into these frozen snake_case messages at its boundary.

Handles: Connect, Disconnect, Subscribe, Unsubscribe, Snapshot, RequestPositions.
Emits: PositionChanged, PositionsComplete, MarketUpdate, StreamEnded, SnapshotFailed,
ConnectionStateChanged, IbError (with ``kind`` naming the mapped IB code).
ConnectionStateChanged and IbError are also stored for audit.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, ClassVar, Literal

import msgspec

from events.base import Command, Conid, Event, Message, Reply

__all__ = [
    "DATA_FLOWS",
    "IB_NOT_CONNECTED",
    "MARKET_DATA_FARM_BACK_CODES",
    "MARKET_DATA_TYPES",
    "SNAPSHOT_LIMIT_TEXT",
    "TERMINAL_KINDS",
    "Connect",
    "ConnectionState",
    "ConnectionStateChanged",
    "DataType",
    "Disconnect",
    "IbError",
    "IbErrorKind",
    "IbSettings",
    "IbStats",
    "IbStatsReply",
    "MarketUpdate",
    "MarketUpdates",
    "PositionChanged",
    "PositionsComplete",
    "RequestPositions",
    "Snapshot",
    "SnapshotFailed",
    "SnapshotResult",
    "StreamEndReason",
    "StreamEnded",
    "Subscribe",
    "Unsubscribe",
    "UpdateSource",
    "classify_ib_code",
]


#: IB's notes that a market data farm can serve again: 2104 "Market data farm connection is OK:usfarm" and 2108
#: "... is inactive but should be available upon demand.usfarm.nj". Quiet in the log; published as IbError (kind
#: INFO) when they end an outage IB reported (2103, 2110), because the worker lifts the holds of snapshots it cut.
MARKET_DATA_FARM_BACK_CODES = frozenset({2104, 2108})


class ConnectionState(StrEnum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    #: 1100: the gateway lost IB; our socket is still up.
    CONNECTIVITY_LOST = "connectivity_lost"
    #: 1101: back, but IB dropped every market data subscription: resubmit.
    RESTORED_DATA_LOST = "restored_data_lost"
    #: 1102: back, subscriptions kept.
    RESTORED_DATA_KEPT = "restored_data_kept"


#: The states in which IB answers requests and streams tick; in the others no market data flows.
DATA_FLOWS = frozenset({ConnectionState.CONNECTED, ConnectionState.RESTORED_DATA_KEPT, ConnectionState.RESTORED_DATA_LOST})


class IbErrorKind(StrEnum):
    MAX_TICKERS = "max_tickers"  # 101
    NOT_SUBSCRIBED = "not_subscribed"  # 354, 10089, 10168, 10186 (10167, 10090, 10091 are advisory: INFO)
    NO_CONTRACT = "no_contract"  # 200
    NO_DATA = "no_data"  # 162 (historical/snapshot: no data / query cancelled)
    COMPETING_SESSION = "competing_session"  # 10197
    PACING = "pacing"  # 100
    CONNECTIVITY_LOST = "connectivity_lost"  # 1100
    RESTORED_DATA_LOST = "restored_data_lost"  # 1101
    RESTORED_DATA_KEPT = "restored_data_kept"  # 1102
    INFO = "info"  # 2104, 2106, 2158 and other farm status notes
    #: 10182 / a farm blip or reset killed this request; IB says when data is back (2104/2106/1102).
    #: Not the contract's fault: a snapshot killed this way goes back to the queue without an attempt.
    DATA_INTERRUPTED = "data_interrupted"
    #: 321 "Snapshot requests limitation exceeded": back off, never dead-letter for it.
    SNAPSHOT_RATE_LIMITED = "snapshot_rate_limited"
    TIMEOUT = "timeout"  # ours: a snapshot or request did not complete in time
    DISCONNECTED = "disconnected"  # ours: the socket is down
    UNKNOWN = "unknown"


#: Failures no retry fixes, only a change of subscription or contract: dead-lettered at once, and left to
#: an operator (the worker, the queue and what-if's record all read failures by this).
TERMINAL_KINDS = frozenset({IbErrorKind.NOT_SUBSCRIBED, IbErrorKind.NO_CONTRACT})


_KIND_BY_CODE: dict[int, IbErrorKind] = {
    101: IbErrorKind.MAX_TICKERS,
    354: IbErrorKind.NOT_SUBSCRIBED,
    10089: IbErrorKind.NOT_SUBSCRIBED,
    10168: IbErrorKind.NOT_SUBSCRIBED,
    10186: IbErrorKind.NOT_SUBSCRIBED,
    # "Requested market data is not subscribed. Displaying delayed market data": delayed ticks 66-76 follow.
    10167: IbErrorKind.INFO,
    # "Part of requested market data is not subscribed. Subscription-independent ticks are still active" and
    # "Part of requested market data requires additional subscription for API ... Delayed market data is
    # available": the request goes on with what the account may see (e.g. an option without its greeks).
    10090: IbErrorKind.INFO,
    10091: IbErrorKind.INFO,
    # "Failed to request live updates (disconnected)": a farm blip killed the request; IB says 2104 when back.
    10182: IbErrorKind.DATA_INTERRUPTED,
    200: IbErrorKind.NO_CONTRACT,
    162: IbErrorKind.NO_DATA,
    10197: IbErrorKind.COMPETING_SESSION,
    100: IbErrorKind.PACING,
    1100: IbErrorKind.CONNECTIVITY_LOST,
    1101: IbErrorKind.RESTORED_DATA_LOST,
    1102: IbErrorKind.RESTORED_DATA_KEPT,
    2104: IbErrorKind.INFO,
    2106: IbErrorKind.INFO,
    2158: IbErrorKind.INFO,
    2103: IbErrorKind.INFO,
    2105: IbErrorKind.INFO,
    2107: IbErrorKind.INFO,
    2108: IbErrorKind.INFO,
    2119: IbErrorKind.INFO,
    # "Connectivity between TWS and server is broken. It will be restored automatically."
    2110: IbErrorKind.INFO,
    # "Sec-def data farm connection is broken": contract details wait for 2158 ("... is OK").
    2157: IbErrorKind.INFO,
    504: IbErrorKind.DISCONNECTED,  # "Not connected": IB's own code, also used for our refusals
}

#: IB's code for "Not connected"; carried by the failures the actor answers while the socket is down.
IB_NOT_CONNECTED = 504


#: Error 321 is IB's "Error validating request" for many causes; only this text makes it the snapshot rate limit.
SNAPSHOT_LIMIT_TEXT = "snapshot requests limitation"


def classify_ib_code(code: int, message: str = "") -> IbErrorKind:
    """Map an IB error code (and, for the shared code 321, its text) to the kind the rest of the system reacts to.

    321 covers every request validation failure (no exchange, generic ticks on
    a snapshot, ...), which are our bugs and stay UNKNOWN; only "Snapshot
    requests limitation exceeded" is the rate limit the worker backs off from.
    """
    if code == 321:
        return IbErrorKind.SNAPSHOT_RATE_LIMITED if SNAPSHOT_LIMIT_TEXT in message.lower() else IbErrorKind.UNKNOWN
    return _KIND_BY_CODE.get(code, IbErrorKind.UNKNOWN)


Price = float | None

#: What kind of market data a quote is (IB's reqMarketDataType 1-4 and the marketDataType tick).
DataType = Literal["live", "frozen", "delayed", "delayed_frozen"]
#: IB's market data type ids (reqMarketDataType, and the marketDataType message, id 58) by name.
MARKET_DATA_TYPES: dict[int, DataType] = {1: "live", 2: "frozen", 3: "delayed", 4: "delayed_frozen"}
#: Which path served a quote: a stream, a queued snapshot, or the account's portfolio updates (no line).
UpdateSource = Literal["stream", "queue", "portfolio"]

PositiveSeconds = Annotated[float, msgspec.Meta(gt=0)]


class IbSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How the IB actor connects, paces and waits. Decoded from the config file's ``[ib]`` table.

    ``generic_ticks`` is empty by default on purpose: option greeks arrive as
    tickOptionComputation (tick types 10-13, model greeks = 13) with *no*
    generic tick requested, and prices and sizes come with every request.
    Generic ticks are extras (100 option volume, 101 open interest, 104
    historical vol, 106 the underlying's 30-day implied vol): set ``"106"``
    to have a stock's ``MarketUpdate.iv`` filled. Snapshots never send generic
    ticks: IB refuses them with snapshot=True (error 321).
    """

    #: The client library the IB actor drives (actors/ib_client.py): "ib_async" needs the extra `.[ib_async]`.
    client: Literal["ib_insync", "ib_async"] = "ib_insync"
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 7497
    client_id: int = 1
    account: str = ""
    #: Messages per second towards IB, every request and cancel counted (IB's limit is 50).
    pacing_per_s: PositiveSeconds = 45.0
    #: Extra length of the pacing window, so that delivery jitter cannot squeeze
    #: ``pacing_per_s`` + a few messages into one 1 s window at the receiving end.
    pacing_guard_s: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.1
    snapshot_timeout_s: PositiveSeconds = 11.0
    min_stream_age_s: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    reconnect_initial_s: PositiveSeconds = 1.0
    reconnect_max_s: PositiveSeconds = 60.0
    connect_timeout_s: PositiveSeconds = 10.0
    generic_ticks: str = ""
    #: Connect without order requests (open/completed orders): Slotwise never trades.
    readonly: bool = True
    #: reqMarketDataType sent at every (re)connect before any market data request: 1 live, 2 frozen,
    #: 3 delayed, 4 delayed-frozen. 4 (the default) gives live data where subscribed, delayed data (10167,
    #: ticks 66-76) where not, and the last values (frozen) after the close instead of -1 bid/ask.
    market_data_type: Annotated[int, msgspec.Meta(ge=1, le=4)] = 4
    #: First wait before re-requesting streams a farm blip (10182) killed when IB has not said the data
    #: is back (2104/2106/1102 re-request at once); doubled per try up to ``reissue_max_s``.
    reissue_initial_s: PositiveSeconds = 2.0
    reissue_max_s: PositiveSeconds = 60.0
    #: A snapshot that gets no price while IB reports a farm broken (2103) or its data server away (2110) is the
    #: outage's, not the contract's (no attempt) -- until the newest outage is this old and prices come through
    #: all the same: then the broken farm is evidently not the one that serves every contract, and a contract
    #: that never answers would otherwise be asked again (held) forever, instead of backing off to a dead letter.
    outage_excuse_s: PositiveSeconds = 300.0


class Connect(Command, tag="ib.connect", frozen=True, kw_only=True):
    pass


class Disconnect(Command, tag="ib.disconnect", frozen=True, kw_only=True):
    pass


class Subscribe(Command, tag="ib.subscribe", frozen=True, kw_only=True):
    """Start streaming ``conid`` (one market data line)."""

    conid: Conid


class Unsubscribe(Command, tag="ib.unsubscribe", frozen=True, kw_only=True):
    """Stop streaming ``conid``; :class:`StreamEnded` tells when its line is free (and when it is not sent)."""

    conid: Conid


class Snapshot(Command, tag="ib.snapshot", frozen=True, kw_only=True):
    """One snapshot per conid; each answers a MarketUpdate or a SnapshotFailed."""

    conids: list[Conid]
    timeout_s: Annotated[float, msgspec.Meta(gt=0, le=120)] = 11.0


class RequestPositions(Command, tag="ib.request_positions", frozen=True, kw_only=True):
    pass


class PositionChanged(Message, tag="ib.position_changed", frozen=True, kw_only=True):
    """One position update from IB (reqPositions): quantity and average cost, no prices."""

    account: str
    conid: Conid
    symbol: str
    sec_type: str
    position: float
    avg_cost: float
    currency: str = "USD"
    exchange: str = ""
    right: str = ""
    strike: float = 0.0
    expiry: str = ""
    multiplier: float = 1.0
    ts_us: int = 0


class PositionsComplete(Message, tag="ib.positions_complete", frozen=True, kw_only=True):
    """IB's positionEnd: every position of the current reqPositions round has been sent.

    Only after it may a missing position be read as "no position" (reconciliation).
    A round runs at every (re)connect -- its positions and this message come
    before the ConnectionStateChanged(CONNECTED) of that connect -- and after
    every RequestPositions.
    """

    ts_us: int = 0


#: Why a stream ended: our cancel left for IB; IB refused the stream; the socket was down.
StreamEndReason = Literal["cancelled", "refused", "disconnected"]


class StreamEnded(Message, tag="ib.stream_ended", frozen=True, kw_only=True):
    """The market data line of ``conid`` is no longer held at IB from our side.

    Guarantee: after this message, the IB actor will send nothing more for
    that stream and the cancel precedes any later request in the wire order.
    (For a refused stream there is no cancel: IB itself freed the line.) So a
    Subscribe (for any contract) sent after receiving it can never find the
    line still taken by this stream, not even transiently -- unless IB
    refuses the cancel past its message rate (100): the IB actor then sends
    the cancel again after a pause, and until it leaves IB counts the line.

    Sent exactly once per stream that ends, and only:

    - ``"cancelled"``: after an Unsubscribe, when its cancelMktData has been
      handed to the socket (it left the pacer; a cancel waits for the
      stream's ``min_stream_age_s`` first). Also at once for an Unsubscribe
      of a conid with no stream (nothing held), so that its sender never
      waits forever. A second Unsubscribe while a cancel is pending is
      answered by that cancel's StreamEnded.
    - ``"refused"``: IB refused or killed the stream (101, 200, 354, 10089,
      10168, ...; see actors.ib_quotes.TERMINAL_MD_CODES; also 100, the
      message rate: IB did not process the request), or its contract
      could not be resolved; sent right after the IbError that says so. A
      refusal also answers a pending Unsubscribe and any Subscribe of that
      conid still pending.
    - ``"disconnected"``: an Unsubscribe arrived (or its delayed cancel fell
      due) while the socket is down; the stream went with the connection.

    NOT sent for streams a farm blip or a reset killed with 10182 while the
    socket stayed up: the IB actor re-requests those itself once IB says the
    data is back (2104/2106/1102), or after a backoff, and the line stays the
    holder's.

    NOT sent for streams lost with the connection or to 1101: those are
    covered by ConnectionStateChanged(resubscribe=True), after which the
    holder resubmits every stream it keeps; a cancel still waiting at that
    moment is moot and is never confirmed. Nor for a Subscribe answered
    IbError(DISCONNECTED): it never held a line.

    A Subscribe arriving while a cancel of the same conid is still waiting
    does not revive the old stream: the cancel goes out (and is confirmed by
    this message), then a new request follows it.
    """

    conid: Conid
    reason: StreamEndReason
    #: IB's error code when ``reason == "refused"``.
    code: int | None = None
    ts_us: int = 0


class MarketUpdate(Message, tag="ib.market_update", frozen=True, kw_only=True):
    """Prices (and greeks for options) of one contract, from either path.

    ``source`` says which path served it, for the positions table; handlers
    must not otherwise care.
    """

    conid: Conid
    source: UpdateSource
    ts_us: int
    bid: Price = None
    ask: Price = None
    last: Price = None
    close: Price = None
    bid_size: float | None = None
    ask_size: float | None = None
    iv: float | None = None
    delta: float | None = None
    gamma: float | None = None
    vega: float | None = None
    theta: float | None = None
    und_price: float | None = None
    data_type: DataType = "live"


class MarketUpdates(Message, tag="ib.market_updates", frozen=True, kw_only=True):
    """Streaming updates that arrived together (one read from IB's socket), carried as one message.

    Ticks come in bursts; one actor message per tick would make the
    mailboxes, not the work, the limit. Handlers that opt in get the batch;
    the others get each MarketUpdate on its own (``actors.handlers``).
    """

    updates: list[MarketUpdate]


class SnapshotFailed(Message, tag="ib.snapshot_failed", frozen=True, kw_only=True):
    conid: Conid
    kind: IbErrorKind
    code: int | None = None
    message: str = ""


class SnapshotResult(Reply, tag="ib.snapshot_result", frozen=True, kw_only=True):
    """The answer to a Snapshot: exactly one entry per requested conid, in one of the two lists."""

    updates: list[MarketUpdate] = msgspec.field(default_factory=list)
    failures: list[SnapshotFailed] = msgspec.field(default_factory=list)


class IbStats(Command, tag="ib.stats", frozen=True, kw_only=True):
    """Ask the IB actor (real or fake) for its counters; answered with IbStatsReply."""


class IbStatsReply(Reply, tag="ib.stats_reply", frozen=True, kw_only=True):
    """Counters of the IB actor. ``lines_in_use`` = open streams + snapshots still open at IB."""

    connected: bool
    state: ConnectionState
    streams: int
    snapshots_in_flight: int
    lines_in_use: int
    peak_lines: int
    requests_sent: int
    #: Messages waiting for the pacer (real actor); always 0 for the fake.
    requests_queued: int = 0


class ConnectionStateChanged(Event, tag="ib.connection_state", frozen=True, kw_only=True):
    version: ClassVar[int] = 1
    state: ConnectionState
    detail: str = ""
    #: True when every stream must be resubmitted (reconnect, or 1101).
    resubscribe: bool = False


class IbError(Event, tag="ib.error", frozen=True, kw_only=True):
    """An IB error or warning, mapped to a kind; unknown codes kept as they came."""

    version: ClassVar[int] = 1
    code: int
    kind: IbErrorKind
    req_id: int = -1
    conid: int | None = None
    message: str = ""
