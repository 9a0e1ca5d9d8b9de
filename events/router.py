"""Messages of the StreamRouter: which path serves each contract, and why.

Emits (stored): StreamStarted, StreamStopped, OverflowQueued, StreamPromoted,
StreamDemoted. Each is keyed by conid, so the audit of one contract shows
every move between the stream and the queue with its reason.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from events.base import Command, Conid, Event, Reply

__all__ = [
    "ContractPath",
    "ContractRow",
    "ContractsQuery",
    "ContractsReply",
    "OverflowQueued",
    "StreamDemoted",
    "StreamPromoted",
    "StreamStarted",
    "StreamStopped",
]


class StreamStarted(Event, tag="router.stream_started", frozen=True, kw_only=True):
    version: ClassVar[int] = 1
    conid: Conid
    reason: str = "activated"
    lines_in_use: int = 0
    budget: int = 0


class StreamStopped(Event, tag="router.stream_stopped", frozen=True, kw_only=True):
    version: ClassVar[int] = 1
    conid: Conid
    reason: str = "deactivated"


class OverflowQueued(Event, tag="router.overflow_queued", frozen=True, kw_only=True):
    """Active, but no line is free: served by the queue at top priority meanwhile."""

    version: ClassVar[int] = 1
    conid: Conid
    lines_in_use: int = 0
    budget: int = 0


class StreamPromoted(Event, tag="router.stream_promoted", frozen=True, kw_only=True):
    """An overflowed active contract got a line."""

    version: ClassVar[int] = 1
    conid: Conid


class StreamDemoted(Event, tag="router.stream_demoted", frozen=True, kw_only=True):
    """IB refused the stream (e.g. 101 max tickers): served by the queue instead."""

    version: ClassVar[int] = 1
    conid: Conid
    code: int | None = None
    reason: str = ""


#: Which path serves a contract now: a line, the queue (not active), the queue at the overflow target
#: (active without a line), or only the account's portfolio updates (dead-lettered, or no snapshot yet).
ContractPath = Literal["stream", "queue", "overflow", "portfolio"]


class ContractRow(Reply, tag="router.contract_row", frozen=True, kw_only=True):
    """One known contract as the router sees it: what ``runtime.py contracts`` prints a row of."""

    conid: Conid
    symbol: str = ""
    local_symbol: str = ""
    sec_type: str = ""
    path: ContractPath
    active: bool = False
    position: float = 0.0
    #: Time of the newest quote from any source (µs since the epoch), None if never priced.
    last_quote_us: int | None = None
    #: Age of that quote when the reply was built, None if never priced.
    age_s: float | None = None
    #: The source of that quote: "stream", "queue" or "portfolio".
    source: str = ""
    data_type: str = ""
    #: The target age of this contract's price on its path (0 for streams).
    target_s: float = 0.0
    last_error: str = ""


class ContractsQuery(Command, tag="router.contracts", frozen=True, kw_only=True):
    """Ask the router for one row per known contract (answered with ContractsReply)."""


class ContractsReply(Reply, tag="router.contracts_reply", frozen=True, kw_only=True):
    rows: list[ContractRow]
    #: When the reply was built (µs since the epoch), so ages can be recomputed later.
    now_us: int
