"""Pure pieces of the IB session: IB code sets, quote completeness, ticker -> MarketUpdate, request records.

Kept apart from :mod:`actors.ib_session` so that module holds only the
behaviour. Nothing here imports the client library: a ticker is read through
the small :class:`TickerLike` protocol (ib_insync's Ticker and ib_async's
both fit it).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import pykka

from actors.ib_pacing import PacedMessage
from events.ib import MARKET_DATA_TYPES, DataType, MarketUpdate, SnapshotFailed

__all__ = [
    "DATA_BACK_CODES",
    "LATE_TICKS_S",
    "NOTICE_CODES",
    "OPTION_TYPES",
    "QUIET_CODES",
    "SMART_TYPES",
    "TERMINAL_MD_CODES",
    "Batch",
    "MdRequest",
    "TickerLike",
    "any_price",
    "data_type",
    "has_prices",
    "now_us",
    "portfolio_price",
    "to_update",
]

#: Codes after which a market data request is dead at IB (no line held, nothing more will come).
#: 10182 (a farm blip killed it) is among them: a stream killed so is re-requested by the session itself.
TERMINAL_MD_CODES = frozenset({101, 200, 300, 321, 322, 354, 10089, 10168, 10182, 10186, 10197})
#: Farm status notes: logged quietly, never emitted. 10167 ("displaying delayed market data") is advisory.
QUIET_CODES = frozenset({2104, 2106, 2158, 2119, 2108, 10167})
#: Notes (kind INFO) that still say something is missing until IB says it is back: emitted as IbError and
#: logged as warnings. A farm or IB's servers out of reach (2103, 2105, 2110, 2157), part of a request's
#: data not subscribed while the rest flows (10090, 10091).
NOTICE_CODES = frozenset({2103, 2105, 2110, 2157, 10090, 10091})
#: "Market data farm connection is OK" (2104, 2106), 1102 "restored, data maintained" and 2158 "Sec-def data farm
#: connection is OK" (contract details are answered again): streams waiting for either are re-requested.
DATA_BACK_CODES = frozenset({2104, 2106, 2158, 1102})
#: How long a cancelled request's ticker still absorbs late ticks.
LATE_TICKS_S = 5.0
#: Security types whose snapshot waits for model greeks.
OPTION_TYPES = frozenset({"OPT", "FOP"})
#: Security types IB routes through SMART when a position arrives without an exchange.
SMART_TYPES = frozenset({"STK", "OPT", "WAR", "IOPT"})


class GreeksLike(Protocol):
    impliedVol: float | None  # noqa: N815  (ib_insync's names)
    delta: float | None
    gamma: float | None
    vega: float | None
    theta: float | None
    undPrice: float | None  # noqa: N815


class TickerLike(Protocol):
    bid: float
    ask: float
    last: float
    close: float
    bidSize: float  # noqa: N815
    askSize: float  # noqa: N815
    lastSize: float  # noqa: N815
    impliedVolatility: float  # noqa: N815
    modelGreeks: GreeksLike | None  # noqa: N815
    #: IB's marketDataType message (id 58) for the request: 1 live, 2 frozen, 3 delayed, 4 delayed-frozen.
    marketDataType: int  # noqa: N815


def now_us() -> int:
    return time.time_ns() // 1000


def _num(value: float | None) -> float | None:
    """IB's "no value" markers (nan, -1: e.g. live bid/ask after the close) become None, never a price."""
    if value is None or math.isnan(value) or value == -1.0:
        return None
    return float(value)


def _side(price: float, size: float) -> float | None:
    """A bid or an ask: none when IB says the side is empty (price -1, or a size of 0).

    IB: "A tickPrice value of -1 or 0 followed by a tickSize of 0 indicates
    there is no data for this field currently available, whereas a tickPrice
    with a positive tickSize indicates an active quote of 0" (tws-api
    EWrapper::tickPrice). ib_insync keeps the last price when only the size
    drops to 0 (``Wrapper.tickSize``), and counts a side only with a size
    above 0 itself (``Ticker.hasBidAsk``); ib_async turns a side of size 0
    into its empty price. A nan size (none sent) leaves the price be.
    """
    if size == 0:
        return None
    return _num(price)


def _last(price: float, size: float) -> float | None:
    """The last trade: -1, or 0 without a size, is IB's "no data" (a last above 0 may come without a size: SPX)."""
    if price == 0 and (size is None or size == 0 or math.isnan(size)):
        return None
    return _num(price)


def _close(price: float) -> float | None:
    """The previous close, a price without a size: IB's -1 or 0 is "no data" (see :func:`_side`)."""
    return None if price == 0 else _num(price)


def _greek(value: float | None) -> float | None:
    """A model delta, gamma, vega or theta: IB's "not computed" marker is -2, and -1 is a value.

    The official client's decoder (ibapi ``processTickOptionComputationMsg``)
    unsets exactly ``-2`` for these four; ib_insync 0.9.86 and ib_async 2.1
    (``Wrapper.tickOptionComputation``: ``vega if vega != -2 else vega``) pass
    vega and theta through as -2. A delta of -1 is a deep in-the-money put's.
    """
    if value is None or math.isnan(value) or value == -2.0:
        return None
    return float(value)


def _vol(value: float | None) -> float | None:
    """An implied volatility: IB sends -1 when it has none (the official decoder unsets any value below 0)."""
    if value is None or math.isnan(value) or value < 0:
        return None
    return float(value)


def data_type(market_data_type: int) -> DataType:
    """The name of IB's market data type id; ids IB may add later read as live."""
    return MARKET_DATA_TYPES.get(market_data_type, "live")


def portfolio_price(market_price: float) -> float | None:
    """updatePortfolio's marketPrice as a price: IB sends 0 or -1 (or nan) when it has none."""
    if math.isnan(market_price) or market_price <= 0:
        return None
    return float(market_price)


def has_prices(t: TickerLike) -> bool:
    """A complete quote: bid and ask (each with a size), or last."""
    both = _side(t.bid, t.bidSize) is not None and _side(t.ask, t.askSize) is not None
    return both or _last(t.last, t.lastSize) is not None


def any_price(t: TickerLike) -> bool:
    prices = (_side(t.bid, t.bidSize), _side(t.ask, t.askSize), _last(t.last, t.lastSize), _close(t.close))
    return any(v is not None for v in prices)


def to_update(conid: int, t: TickerLike, source: str) -> MarketUpdate:
    """The frozen message for a ticker's current state (greeks from the model computation, tick 13).

    Prices use IB's price markers (-1, nan: none); greeks use IB's greek markers (:func:`_greek`, :func:`_vol`).
    """
    greeks = t.modelGreeks
    iv = greeks.impliedVol if greeks is not None else t.impliedVolatility
    return MarketUpdate(
        conid=conid,
        source=source,  # type: ignore[arg-type]
        ts_us=now_us(),
        bid=_side(t.bid, t.bidSize),
        ask=_side(t.ask, t.askSize),
        last=_last(t.last, t.lastSize),
        close=_close(t.close),
        bid_size=_num(t.bidSize),
        ask_size=_num(t.askSize),
        iv=_vol(iv),
        delta=_greek(greeks.delta) if greeks else None,
        gamma=_greek(greeks.gamma) if greeks else None,
        vega=_greek(greeks.vega) if greeks else None,
        theta=_greek(greeks.theta) if greeks else None,
        und_price=_num(greeks.undPrice) if greeks else None,  # -1: not computed (the official decoder)
        data_type=data_type(t.marketDataType),
    )


@dataclass(eq=False)
class MdRequest:
    """One reqMktData at IB: a stream or a snapshot. ``contract``/``ticker`` are the client library's objects."""

    conid: int
    snapshot: bool
    contract: Any = None
    req_id: int = -1
    ticker: Any = None
    message: PacedMessage | None = None
    sent_at: float | None = None
    cancel_pending: bool = False
    #: A Subscribe came while the cancel was pending: subscribe anew once the cancel is out.
    resubscribe: bool = False
    cancel_timer: asyncio.TimerHandle | None = None
    handler: Callable[[Any], None] | None = None
    batch: Batch | None = None
    answered: bool = False
    sec_type: str = ""
    #: A farm blip (10182) killed this stream at IB: a placeholder the session re-requests (no line held).
    interrupted: bool = False


@dataclass(eq=False)
class Batch:
    """One Snapshot command: answers collected per conid, replied once all are in."""

    conids: list[int]
    reply: pykka.Future[Any]
    updates: dict[int, MarketUpdate] = field(default_factory=dict)
    failures: dict[int, SnapshotFailed] = field(default_factory=dict)
    requests: list[MdRequest] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    replied: bool = False
    #: Why IB's data was down at some moment of this batch's life (code, text), if it was: a farm (2103) or
    #: TWS's link to IB's data server (2110). A request it held may time out after the farm is back.
    outage: tuple[int, str] | None = None
