"""Messages of the StreamRouter: which path serves each contract, and why.

Emits (stored): StreamStarted, StreamStopped, OverflowQueued, StreamPromoted,
StreamDemoted. Each is keyed by conid, so the audit of one contract shows
every move between the stream and the queue with its reason.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import msgspec

from events.base import Command, Conid, Event, Reply
from events.ib import MarketUpdate

__all__ = [
    "AcquireLines",
    "ContractPath",
    "ContractRow",
    "ContractsQuery",
    "ContractsReply",
    "LineGrant",
    "LineLimitLearned",
    "LineLimitProbed",
    "LinesGranted",
    "OverflowQueued",
    "ReleaseLines",
    "RouterRestarted",
    "SnapshotDone",
    "SnapshotOutcome",
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
    reason: str = ""


class StreamDemoted(Event, tag="router.stream_demoted", frozen=True, kw_only=True):
    """The stream gave up its line and is served by the queue at the overflow target instead.

    Why is in ``reason``: IB refused it (``code`` 101 max tickers), a higher-ranked
    active contract needed the line, or a lower learned limit left no room for it.
    """

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


class LineLimitLearned(Event, tag="router.line_limit_learned", frozen=True, kw_only=True):
    """IB refused a request with 101: the lines held after giving it back are the account's limit (for now)."""

    version: ClassVar[int] = 1
    limit: int
    previous: int | None = None
    reason: str = ""


class LineLimitProbed(Event, tag="router.line_limit_probed", frozen=True, kw_only=True):
    """The learned limit was raised by one line to find out whether IB gives more now (re-probed slowly)."""

    version: ClassVar[int] = 1
    limit: int
    previous: int


class RouterRestarted(Event, tag="router.restarted", frozen=True, kw_only=True):
    """A new run: IB forgot every stream with the connection. Streams and overflow start empty; the limit stays."""

    version: ClassVar[int] = 1


class LineGrant(msgspec.Struct, frozen=True, kw_only=True):
    line_id: int
    #: Lines held, this one included, when it was lent.
    level: int


class AcquireLines(Command, tag="router.acquire_lines", frozen=True, kw_only=True):
    """The worker asks for up to ``n`` lines for snapshots; answered with LinesGranted (possibly none)."""

    n: int


class LinesGranted(Reply, tag="router.lines_granted", frozen=True, kw_only=True):
    lines: list[LineGrant]
    limit: int
    lines_held: int


class ReleaseLines(Command, tag="router.release_lines", frozen=True, kw_only=True):
    """Lines lent but not used (nothing to claim): back to the ledger."""

    line_ids: list[int]


#: How a snapshot on a lent line ended: "ok" (a quote), "refused" (101: the line was not there),
#: "interrupted" (disconnect, reset, farm blip), "rate_limited" (321), "failed" (anything else).
SnapshotOutcome = Literal["ok", "refused", "interrupted", "rate_limited", "failed"]


class SnapshotDone(Command, tag="router.snapshot_done", frozen=True, kw_only=True):
    """The worker's snapshot on ``line_id`` is over (its line is free at IB); what it brought."""

    line_id: int
    conid: Conid
    outcome: SnapshotOutcome
    #: The quote it brought (outcome "ok").
    update: MarketUpdate | None = None
    error: str = ""
    #: No snapshot of this contract can succeed until something changes (no subscription, no contract).
    terminal: bool = False
