"""The asyncio side of the IB actor: the client library's IB object and everything that touches it.

The library (ib_insync or ib_async, ``[ib] client``) comes from
:mod:`actors.ib_client`, which hides where the two differ; the names below
are ib_insync's and hold for both. Everything here runs in the IB actor's
loop thread; the pykka actor calls in with ``call_soon_threadsafe`` /
``run_coroutine_threadsafe`` and gets messages back through ``publish``
(which ``tell``s the actor) and through reply futures (pykka futures are
thread-safe). ib_insync's mutable objects (Contract, Ticker, Position) stay
here; only frozen messages from :mod:`events.ib` leave.

Streams: one reqMktData per conid with its own Contract copy and its own
Ticker (``ClientLib.start_ticker``), so a snapshot never mixes with a
stream of the same conid.

A stream's end is confirmed with StreamEnded (see events.ib.StreamEnded):
after an Unsubscribe once its cancelMktData has left the pacer (a cancel
first waits for ``min_stream_age_s``), after the IbError of a refusal, and at
once for an Unsubscribe with nothing to cancel. Streams lost to a disconnect
or 1101 are not confirmed (cancels still queued for them are withdrawn): the
resubscribe covers them. A Subscribe during a pending cancel never revives the
stream; a new request follows the cancel on the wire.

Snapshots take the FIRST COMPLETE quote: complete = bid and ask present, or
last present; for options (OPT, FOP) also the model greeks (tick type 13).
If the prices are complete but the greeks have not come when IB ends the
snapshot (tickSnapshotEnd) or the batch times out, the prices are answered
without greeks. A snapshot that ends (or times out) with some price but no
complete quote answers what it has, as IB's end would; one that ends with
nothing answers NO_DATA; one still without any price at the timeout answers
TIMEOUT and is cancelled at IB (or withdrawn from the pacer if its request
never left). An open snapshot counts as a
line until IB ends it or we cancel it, and a snapshot answered by its first
complete quote is cancelled at once (IB would hold it until tickSnapshotEnd,
up to ~11 s): whenever a Snapshot is answered, none of its requests holds a
line any more, or its cancel is already in the pacer ahead of anything sent
later.

A 100 (IB's message rate) naming a request is taken as IB's refusal of
that message (its documents do not say so): an open request is refused (a
snapshot fails as PACING, a stream ends "refused" and is cancelled too, in
case IB served it all the same), a cancel we sent goes again; after any 100
the pacer pauses one window (see ``_paced_out``).

IB's data realities (docs/operations.md, "IB's data realities"):
reqMarketDataType(``market_data_type``) goes out at every connect before
CONNECTED; each quote carries the request's ``marketDataType`` as
``data_type``. A reset (1100/1101) or a farm blip (10182) interrupts open
snapshots (DATA_INTERRUPTED). Streams a blip killed (10182, socket up) stay
ours without a StreamEnded and are re-requested here once IB says the data
is back (2104/2106/1102), or after a doubling backoff; so does a stream whose
contract details IB left unanswered (sec-def farm down, 2157), asked again at
2158. Only IB's own "no such contract" (200) refuses it. Portfolio updates
(updatePortfolio, from the account subscription connectAsync makes) are
published as MarketUpdate(source="portfolio"); IB drops that subscription and
the positions' with an 1101, so both are resubmitted here then.
"""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Any

import pykka
from loguru import logger

from actors.ib_client import load_client
from actors.ib_pacing import PacedMessage, Pacer
from actors.ib_quotes import (
    DATA_BACK_CODES,
    LATE_TICKS_S,
    NOTICE_CODES,
    OPTION_TYPES,
    QUIET_CODES,
    SMART_TYPES,
    TERMINAL_MD_CODES,
    Batch,
    MdRequest,
    any_price,
    has_prices,
    now_us,
    portfolio_price,
    to_update,
)
from events.base import Message
from events.ib import (
    IB_NOT_CONNECTED,
    MARKET_DATA_FARM_BACK_CODES,
    ConnectionState,
    ConnectionStateChanged,
    DataType,
    IbError,
    IbErrorKind,
    IbSettings,
    IbStatsReply,
    MarketUpdate,
    MarketUpdates,
    PositionChanged,
    PositionsComplete,
    SnapshotFailed,
    SnapshotResult,
    StreamEnded,
    StreamEndReason,
    classify_ib_code,
)

if TYPE_CHECKING:  # for the annotations only: both libraries have these classes
    from ib_insync import Contract, PortfolioItem, Position, Ticker

__all__ = ["IbSession", "Unresolved"]


class Unresolved(Enum):
    """Why a conid has no contract: IB said there is none, or IB did not answer (which says nothing)."""

    NOT_FOUND = "not found"
    NO_ANSWER = "no answer"


#: The name under which TWS's link to IB's data server (2110) is kept with the farms that are down.
_TWS_SERVER = "TWS-server"


def _farm_name(text: str) -> str:
    """The farm a farm status message names: after the colon of 2103/2104 ("... is broken:usfarm.nj"), after the
    period of 2108 ("... available upon demand.usfarm.nj"); farm names hold periods themselves."""
    if ":" in text:
        return text.rpartition(":")[2].strip()
    _, sep, name = text.partition("upon demand.")
    return name.strip() if sep else text


class IbSession:
    """ib_insync's IB plus our streams, snapshots, contract cache, pacing and reconnects."""

    def __init__(self, settings: IbSettings, publish: Callable[[Message], None]) -> None:
        self.settings = settings
        self._publish = publish
        self._tick_buffer: list[MarketUpdate] = []
        self._loop = asyncio.get_running_loop()
        self._lib = load_client(settings.client)
        self.ib = self._lib.IB()
        self.pacer = Pacer(self._loop, self._write, settings.pacing_per_s, window_s=1.0 + settings.pacing_guard_s)
        # Every framed message ib_insync sends goes through our pacer (see actors.ib_pacing).
        self.ib.client.sendMsg = self._send_msg  # type: ignore[method-assign]
        self._next_on_sent: Callable[[float], None] | None = None
        self._last_message: PacedMessage | None = None
        self.ib.positionEvent += self._on_position
        # ib_insync's connectAsync subscribes to the account's updates (reqAccountUpdates) when the account
        # is known (IbSettings.account, or the only managed account): updatePortfolio is the line-free floor.
        self.ib.updatePortfolioEvent += self._on_portfolio
        self.ib.errorEvent += self._on_error
        self.ib.disconnectedEvent += self._on_disconnected
        # Why a connect failed, in the client's words: e.g. a server too old for it ("TWS/gateway version must
        # be >= 972") is reported only here, and connectAsync then fails with a bare timeout.
        self._api_error = ""
        self.ib.client.apiError += self._on_api_error
        original_end = self.ib.wrapper.tickSnapshotEnd

        def snapshot_end(req_id: int) -> None:
            original_end(req_id)
            self._on_snapshot_end(req_id)

        self.ib.wrapper.tickSnapshotEnd = snapshot_end  # type: ignore[method-assign]
        original_position_end = self.ib.wrapper.positionEnd

        def position_end() -> None:
            # IB's end of a reqPositions round: the one at every (re)connect (connectAsync asks) and ours.
            original_position_end()
            self._publish(PositionsComplete(ts_us=now_us()))

        self.ib.wrapper.positionEnd = position_end  # type: ignore[method-assign]
        self.state = ConnectionState.DISCONNECTED
        self._up = False
        self._ever_connected = False
        #: False from an 1100 until IB's 1101/1102: TWS is up but cut off from IB's servers. Read when a
        #: connect completes, because the 1100 may arrive while ib_insync is still synchronising.
        self._ib_reachable = True
        #: The session was cut off from IB before it asked for any stream: whatever restores it (1102 "data
        #: maintained" included) must have every stream asked for.
        self._resubscribe_on_restore = False
        #: An 1101 came while connecting: the account data is asked for again once the connect is complete.
        self._resubmit_after_connect = False
        #: What IB reported broken and not yet back, name -> code: market data farms (2103 ...:usfarm) and TWS's
        #: link to IB's data server (2110). A snapshot that gets no price meanwhile is their silence, not the
        #: contract's.
        self._data_down: dict[str, int] = {}
        #: When the newest of ``_data_down`` went down (the loop's clock), and whether a snapshot got a price since.
        self._down_since = 0.0
        self._priced_while_down = False
        self._want_connected = False
        self._runner: asyncio.Task[None] | None = None
        self._down = asyncio.Event()
        self.contracts: dict[int, Contract] = {}
        self._resolving: dict[int, asyncio.Future[Contract | None]] = {}
        self.streams: dict[int, MdRequest] = {}
        #: req_id -> the cancelMktData of an unsubscribed stream, still waiting in the pacer.
        self._cancels: dict[int, PacedMessage] = {}
        self._by_req: dict[int, MdRequest] = {}
        self._batches: set[Batch] = set()
        #: req_ids whose cancel may meet no request at IB, so its 300 is expected, not news: snapshots we cancelled
        #: after their first quote (the cancel may cross their own tickSnapshotEnd), and streams refused with 100
        #: (cancelled in case IB served them all the same).
        self._cancels_300_expected: set[int] = set()
        #: When IB last answered 100 (past its message rate), on the loop's clock.
        self._last_rate_refusal = float("-inf")
        #: req_id -> when its cancelMktData left the pacer, for LATE_TICKS_S: a 100 naming it says IB did not
        #: process that cancel, and the line is still taken at IB until it is sent again.
        self._cancels_out: dict[int, float] = {}
        #: The market data type last seen per conid, for portfolio updates (which carry none).
        self._data_types: dict[int, DataType] = {}
        self._reissue_timer: asyncio.TimerHandle | None = None
        self._reissue_attempt = 0
        self.peak_lines = 0
        #: The account whose updates (updatePortfolio) connectAsync subscribed to; "" if none.
        self._account = ""

    # ------------------------------------------------------------------ wire
    def _send_msg(self, msg: str | None) -> None:
        if msg is None:  # ib_insync's own throttle timer; ours replaces it
            self.pacer.drain()
            return
        on_sent, self._next_on_sent = self._next_on_sent, None
        self._last_message = self.pacer.submit(msg.encode(), on_sent)

    def _write(self, payload: bytes) -> None:
        self.ib.client.conn.sendMsg(struct.pack(">I", len(payload)) + payload)

    def _paced(self, send: Callable[[], None], on_sent: Callable[[float], None] | None = None) -> PacedMessage | None:
        """Call one ib_insync request method and return the paced message it produced."""
        self._next_on_sent = on_sent
        self._last_message = None
        try:
            send()
        finally:
            self._next_on_sent = None
        return self._last_message

    @property
    def connected(self) -> bool:
        return self._up and self.ib.isConnected()

    # ------------------------------------------------------------ connection
    def connect(self) -> None:
        self._want_connected = True
        if self._runner is None or self._runner.done():
            self._runner = self._loop.create_task(self._run_connection())

    async def disconnect(self) -> None:
        self._want_connected = False
        if self._runner is not None:
            self._runner.cancel()
            self._runner = None
        was_up = self._up
        self.ib.disconnect()
        if was_up and self._up:  # ib_insync emitted nothing: make sure we are down
            self._on_disconnected()
        if not was_up and self.state != ConnectionState.DISCONNECTED:
            self._set_state(ConnectionState.DISCONNECTED, "disconnect requested")

    async def close(self) -> None:
        await self.disconnect()

    async def _run_connection(self) -> None:
        attempt = 0
        s = self.settings
        while self._want_connected:
            self._set_state(ConnectionState.CONNECTING, f"{s.host}:{s.port} client {s.client_id}")
            self._down.clear()
            self._api_error = ""
            self._ib_reachable = True
            self._resubscribe_on_restore = self._resubmit_after_connect = False
            self._data_down.clear()  # a session hears of its farms afresh (2104/2103 after startApi)
            try:
                await self.ib.connectAsync(
                    s.host, s.port, s.client_id, timeout=s.connect_timeout_s, readonly=s.readonly, account=s.account
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001  (any failure to connect means: retry later)
                self.pacer.clear()
                detail = f"connect failed: {self._api_error} ({exc!r})" if self._api_error else f"connect failed: {exc!r}"
                logger.warning("IB {}", detail)
                self._set_state(ConnectionState.DISCONNECTED, detail)
            else:
                attempt = 0
                self._up = True
                # The account connectAsync subscribed to (its own rule): 1101 makes us subscribe it again.
                accounts = self.ib.client.getAccounts()
                self._account = s.account or (accounts[0] if len(accounts) == 1 else "")
                if self._resubmit_after_connect:
                    self._resubmit_after_connect = False
                    self._resubmit_account_data()
                # Per API session, before any market data request (TWS API docs, "Market Data Types").
                self._paced(lambda: self.ib.reqMarketDataType(s.market_data_type))
                resubscribe = self._ever_connected
                self._ever_connected = True
                if self._ib_reachable:
                    self._set_state(ConnectionState.CONNECTED, "connected", resubscribe=resubscribe)
                else:
                    # An 1100 came while connecting, and no 1101/1102 since: CONNECTED would say data flows,
                    # and every snapshot the worker sent would time out as the contract's failure.
                    self._resubscribe_on_restore = True
                    self._set_state(
                        ConnectionState.CONNECTIVITY_LOST, "connected to TWS, which is cut off from IB (1100)"
                    )
                await self._down.wait()
                if not self._want_connected:
                    return
            delay = min(s.reconnect_max_s, s.reconnect_initial_s * 2**attempt)
            delay = delay / 2 + random.uniform(0, delay / 2)  # equal jitter: never zero, never in lockstep
            attempt += 1
            logger.info("IB reconnect in {:.2f} s (attempt {})", delay, attempt)
            await asyncio.sleep(delay)

    def _on_api_error(self, message: str) -> None:
        """The client's own account of a failed connect; the first one of an attempt is the cause.

        "API connection failed: <exception>" only repeats the exception connectAsync raises: not kept.
        """
        if not self._api_error and not message.startswith("API connection failed"):
            self._api_error = message

    def _set_state(self, state: ConnectionState, detail: str = "", resubscribe: bool = False) -> None:
        self.state = state
        self._publish(ConnectionStateChanged(state=state, detail=detail, resubscribe=resubscribe))

    def _on_disconnected(self) -> None:
        if not self._up:
            return
        self._up = False
        self.pacer.clear()
        self._cancels.clear()  # withdrawn with the pacer: moot, never confirmed (the resubscribe covers them)
        self._cancels_out.clear()
        self._forget_streams()
        self._cancels_300_expected.clear()
        for batch in list(self._batches):
            self._fail_open(batch, IbErrorKind.DISCONNECTED, IB_NOT_CONNECTED, "disconnected from IB")
            self._close_batch_requests(batch, send_cancel=False)
        self._set_state(ConnectionState.DISCONNECTED, "socket closed")
        self._down.set()

    # ------------------------------------------------------------- positions
    def _on_position(self, pos: Position) -> None:
        c = pos.contract
        self._cache(c)
        try:
            multiplier = float(c.multiplier) if c.multiplier else 1.0
        except ValueError:
            multiplier = 1.0
        self._publish(
            PositionChanged(
                account=pos.account,
                conid=c.conId,
                symbol=c.symbol,
                sec_type=c.secType,
                position=pos.position,
                avg_cost=pos.avgCost,
                currency=c.currency or "USD",
                exchange=c.exchange or c.primaryExchange,
                right=c.right,
                strike=c.strike,
                expiry=c.lastTradeDateOrContractMonth,
                multiplier=multiplier,
                ts_us=now_us(),
            )
        )

    def request_positions(self) -> None:
        if not self.connected:
            self._publish(IbError(code=IB_NOT_CONNECTED, kind=IbErrorKind.DISCONNECTED, message="not connected"))
            return
        self._paced(self.ib.reqPositionsAsync)

    # ------------------------------------------------------------- contracts
    def _cache(self, c: Contract) -> None:
        if not c.conId:
            return
        exchange = c.exchange or ("SMART" if c.secType in SMART_TYPES else "")
        if not exchange:
            return  # unknown routing: reqContractDetails will tell
        self.contracts[c.conId] = self._lib.Contract(
            conId=c.conId,
            symbol=c.symbol,
            secType=c.secType,
            lastTradeDateOrContractMonth=c.lastTradeDateOrContractMonth,
            strike=c.strike,
            right=c.right,
            multiplier=c.multiplier,
            exchange=exchange,
            currency=c.currency,
            localSymbol=c.localSymbol,
            tradingClass=c.tradingClass,
        )

    async def _contract(self, conid: int) -> Contract | Unresolved:
        """The contract of ``conid`` from the cache, or from one reqContractDetails shared by concurrent askers.

        ``Unresolved.NOT_FOUND`` only when IB answered that there is no such
        contract (200, or no details); a request IB left unanswered within
        ``snapshot_timeout_s`` (the sec-def farm is down: 2157, or slow), cut
        by a disconnect, or answered empty after a 100 (ib_insync ends a refused
        request empty) is ``Unresolved.NO_ANSWER``, which says nothing about
        the contract.
        """
        cached = self.contracts.get(conid)
        if cached is not None:
            return cached
        pending = self._resolving.get(conid)
        if pending is None:
            pending = self._loop.create_future()
            self._resolving[conid] = pending
            try:
                asked = self._loop.time()
                request = self.ib.reqContractDetailsAsync(self._lib.Contract(conId=conid))  # paced at the wire
                details = await asyncio.wait_for(request, self.settings.snapshot_timeout_s)
                if not details and self._last_rate_refusal >= asked:
                    # ib_insync ends a request IB refused past its message rate (100) with an empty answer, as it
                    # does one for a conid IB does not know (200): with a 100 since the ask, it may be ours
                    raise TimeoutError("a contract details request may have been refused past IB's message rate")
                if details:
                    contract = details[0].contract
                    if not contract.exchange:
                        contract.exchange = contract.primaryExchange or "SMART"
                    self._cache(contract)
                pending.set_result(self.contracts.get(conid, Unresolved.NOT_FOUND))
            except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001  (disconnect, timeout: no answer)
                logger.debug("contract {} not resolved: {!r}", conid, exc)
                pending.set_result(Unresolved.NO_ANSWER)
            finally:
                self._resolving.pop(conid, None)
        return await asyncio.shield(pending)

    # --------------------------------------------------------- market data
    def _new_request(self, conid: int, contract: Contract, snapshot: bool) -> MdRequest:
        """Send one reqMktData (through the pacer) with its own Contract copy and Ticker."""
        req = MdRequest(conid=conid, snapshot=snapshot, sec_type=contract.secType)
        req.contract = self._lib.Contract(
            **{
                k: getattr(contract, k)
                for k in (
                    "conId",
                    "symbol",
                    "secType",
                    "lastTradeDateOrContractMonth",
                    "strike",
                    "right",
                    "multiplier",
                    "exchange",
                    "currency",
                    "localSymbol",
                    "tradingClass",
                )
            }
        )
        req.req_id = self.ib.client.getReqId()
        req.ticker = self._lib.start_ticker(self.ib.wrapper, req.req_id, req.contract)
        self._by_req[req.req_id] = req

        def on_sent(at: float) -> None:
            req.sent_at = at
            if req.cancel_pending:
                self._schedule_cancel(req)

        generic = "" if snapshot else self.settings.generic_ticks  # IB refuses generic ticks on snapshots (321)
        req.message = self._paced(
            lambda: self.ib.client.reqMktData(req.req_id, req.contract, generic, snapshot, False, []), on_sent
        )
        req.handler = self._on_snapshot_tick if snapshot else self._on_stream_tick
        req.ticker.updateEvent += req.handler
        self._track_lines()
        return req

    def _drop_request(
        self, req: MdRequest, send_cancel: bool, on_cancel_sent: Callable[[float], None] | None = None
    ) -> PacedMessage | None:
        """Forget ``req`` here and in ib_insync; cancel it at IB if it is still open there.

        Returns the cancel handed to the pacer (``on_cancel_sent`` runs when it leaves), or None if none was.
        """
        if self._by_req.pop(req.req_id, None) is None:
            return None
        if req.cancel_timer is not None:
            req.cancel_timer.cancel()
        if req.message is not None and req.message.cancel():
            send_cancel = False  # never left: nothing to cancel at IB
        cancel: PacedMessage | None = None
        if send_cancel and self.connected:
            cancel = self._send_cancel(req.req_id, on_cancel_sent)
        else:
            send_cancel = False
        w = self.ib.wrapper
        if req.ticker is not None:
            if req.handler is not None:
                req.ticker.updateEvent -= req.handler
            w.endTicker(req.ticker, "mktData")
        if send_cancel:
            # IB may still send a few ticks after our cancel: keep the ticker for them a while, so
            # ib_insync does not log them as unknown, then let it go.
            self._loop.call_later(LATE_TICKS_S, self._release_ticker, req)
        else:
            self._release_ticker(req)
        batch = req.batch
        if batch is not None and batch.replied and not any(r.req_id in self._by_req for r in batch.requests):
            self._finish(batch)
        return cancel

    def _send_cancel(self, req_id: int, on_sent: Callable[[float], None] | None = None) -> PacedMessage | None:
        """Hand one cancelMktData to the pacer; once it has left, a 100 naming ``req_id`` sends it again."""

        def sent(at: float) -> None:
            out = self._cancels_out
            while out:  # oldest first: forget cancels past the time a 100 for them could still come
                first = next(iter(out))
                if at - out[first] < LATE_TICKS_S:
                    break
                del out[first]
            out.pop(req_id, None)
            out[req_id] = at
            if on_sent is not None:
                on_sent(at)

        return self._paced(lambda: self.ib.client.cancelMktData(req_id), sent)

    def _release_ticker(self, req: MdRequest) -> None:
        self._cancels_300_expected.discard(req.req_id)
        self._lib.release_ticker(self.ib.wrapper, req.req_id, req.contract, req.ticker)

    def lines_in_use(self) -> int:
        return len(self._by_req)

    def _track_lines(self) -> None:
        self.peak_lines = max(self.peak_lines, self.lines_in_use())

    # --------------------------------------------------------------- streams
    def subscribe(self, conid: int) -> None:
        stream = self.streams.get(conid)
        if stream is not None:
            if stream.cancel_pending:
                # Never revive a stream whose Unsubscribe is pending (the StreamEnded promised for it would be
                # a lie): its cancel goes out first, then a new request (see _cancel_stream).
                stream.resubscribe = True
            return
        if not self.connected:
            self._publish(
                IbError(
                    code=IB_NOT_CONNECTED,
                    kind=IbErrorKind.DISCONNECTED,
                    conid=conid,
                    message="not connected: subscribe later (resubscribe follows the reconnect)",
                )
            )
            return
        contract = self.contracts.get(conid)
        if contract is not None:
            self.streams[conid] = self._new_request(conid, contract, snapshot=False)
            return
        placeholder = MdRequest(conid=conid, snapshot=False)
        self.streams[conid] = placeholder
        self._loop.create_task(self._subscribe_resolved(conid, placeholder))

    async def _subscribe_resolved(self, conid: int, placeholder: MdRequest) -> None:
        contract = await self._contract(conid)
        if self.streams.get(conid) is not placeholder:
            return  # forgotten (disconnect) meanwhile
        if not self.connected:
            del self.streams[conid]
            self._ended(conid, "disconnected")
            return
        if contract is Unresolved.NOT_FOUND:
            del self.streams[conid]
            # An unknown conid was already reported (IbError 200 with the conid); nothing was sent for the stream.
            self._ended(conid, "refused", 200)  # as a snapshot of it: no contract (NO_CONTRACT)
            return
        if contract is Unresolved.NO_ANSWER:
            # IB did not answer (sec-def farm down: 2157): not the contract's fault. Like a stream a farm blip
            # killed, it stays ours and is resolved again at IB's 2158 (or after a backoff).
            placeholder.interrupted = True
            backoff = self.settings.reissue_initial_s * 2**self._reissue_attempt
            self._schedule_reissue(min(self.settings.reissue_max_s, backoff))
            return
        self.streams[conid] = self._new_request(conid, contract, snapshot=False)

    def unsubscribe(self, conid: int) -> None:
        stream = self.streams.get(conid)
        if stream is None:  # nothing held (never subscribed, refused, or gone with the connection)
            self._ended(conid, "cancelled" if self.connected else "disconnected")
            return
        if stream.req_id < 0:  # still resolving its contract: no request has gone to IB
            del self.streams[conid]
            self._ended(conid, "cancelled")
            return
        stream.resubscribe = False
        if stream.cancel_pending:
            return  # already on its way; its StreamEnded answers this Unsubscribe too
        stream.cancel_pending = True
        if stream.sent_at is not None:
            self._schedule_cancel(stream)
        # else: on_sent schedules it, so the age counts from when IB got the request

    def _ended(self, conid: int, reason: StreamEndReason, code: int | None = None) -> None:
        # Ticks decoded in this loop iteration wait in the buffer for a call_soon flush, which a timer due
        # now (a cancel leaving the pacer) runs before: publish them first, so no update of the stream can
        # follow its StreamEnded.
        self._flush_ticks()
        self._publish(StreamEnded(conid=conid, reason=reason, code=code, ts_us=now_us()))

    def _schedule_cancel(self, stream: MdRequest) -> None:
        assert stream.sent_at is not None
        due = stream.sent_at + self.settings.min_stream_age_s
        if stream.cancel_timer is not None:
            stream.cancel_timer.cancel()
        stream.cancel_timer = self._loop.call_at(max(due, self._loop.time()), self._cancel_stream, stream)

    def _cancel_stream(self, stream: MdRequest) -> None:
        """The stream is old enough: hand its cancel to the pacer; StreamEnded follows once the cancel has left."""
        stream.cancel_timer = None
        conid = stream.conid
        if not stream.cancel_pending or self.streams.get(conid) is not stream:
            return
        del self.streams[conid]

        def cancel_sent(_at: float) -> None:
            self._cancels.pop(stream.req_id, None)
            self._ended(conid, "cancelled")

        cancel = self._drop_request(stream, send_cancel=True, on_cancel_sent=cancel_sent)
        if cancel is None:  # nothing to send (the socket is going down with the stream)
            self._ended(conid, "cancelled" if self.connected else "disconnected")
        elif cancel.sent_at is None:  # waits in the pacer (it may also have left at once)
            self._cancels[stream.req_id] = cancel
        if stream.resubscribe:
            self.subscribe(conid)  # queued behind the cancel: the wire order is cancel, then the new request

    def _withdraw_cancels(self) -> None:
        """IB dropped every stream (1101): cancels still queued would only earn a 300. Moot, never confirmed."""
        for cancel in self._cancels.values():
            cancel.cancel()
        self._cancels.clear()
        self._cancels_out.clear()  # a 100 for one of them is moot too

    def _forget_streams(self) -> None:
        """IB dropped every stream (socket lost, or 1101): forget them so resubmitted Subscribes are new."""
        for stream in list(self.streams.values()):
            if stream.req_id >= 0:
                self._drop_request(stream, send_cancel=False)
        self.streams.clear()  # interrupted placeholders too: the resubscribe covers them
        if self._reissue_timer is not None:
            self._reissue_timer.cancel()
            self._reissue_timer = None
        self._reissue_attempt = 0

    # ------------------------------------------------- farm blips (10182)
    def _interrupt(self, stream: MdRequest) -> None:
        """A farm blip killed ``stream`` at IB (10182) on a socket that stays up: re-request it ourselves.

        The holder is not told (no StreamEnded): the line stays its own, and the
        stream comes back once IB says the data is back (2104/2106/1102), or
        after a backoff if that never comes. A stream whose Unsubscribe was
        pending is simply over: IB freed its line, so its StreamEnded goes now.
        """
        conid = stream.conid
        self._drop_request(stream, send_cancel=False)
        if stream.cancel_pending:
            del self.streams[conid]
            self._ended(conid, "cancelled")
            if stream.resubscribe:
                self.subscribe(conid)
            return
        self.streams[conid] = MdRequest(conid=conid, snapshot=False, sec_type=stream.sec_type, interrupted=True)
        backoff = self.settings.reissue_initial_s * 2**self._reissue_attempt
        self._schedule_reissue(min(self.settings.reissue_max_s, backoff))

    def _data_back(self) -> None:
        """IB says market data is back (2104/2106/1102): re-request interrupted streams now, backoff reset."""
        self._reissue_attempt = 0
        if any(s.interrupted for s in self.streams.values()):
            self._schedule_reissue(0.0)

    def _schedule_reissue(self, delay: float) -> None:
        if self._reissue_timer is not None:
            if delay > 0:
                return  # one re-request round is already due: all interrupted streams go in it
            self._reissue_timer.cancel()
        self._reissue_timer = self._loop.call_later(delay, self._reissue)

    def _reissue(self) -> None:
        """One round: a new request for every interrupted stream; a farm still down answers 10182 again."""
        self._reissue_timer = None
        if not self.connected:
            return
        waiting = [s for s in self.streams.values() if s.interrupted]
        if not waiting:
            return
        self._reissue_attempt += 1
        logger.info("IB: re-requesting {} stream(s) a farm blip interrupted", len(waiting))
        for placeholder in waiting:
            conid = placeholder.conid
            contract = self.contracts.get(conid)
            if contract is not None:  # it was streaming, so its contract is cached
                self.streams[conid] = self._new_request(conid, contract, snapshot=False)
            else:  # its contract details went unanswered: ask again
                fresh = MdRequest(conid=conid, snapshot=False, sec_type=placeholder.sec_type)
                self.streams[conid] = fresh
                self._loop.create_task(self._subscribe_resolved(conid, fresh))

    def _on_stream_tick(self, ticker: Ticker) -> None:
        req_id = self.ib.wrapper.ticker2ReqId["mktData"].get(ticker)
        req = self._by_req.get(req_id) if req_id is not None else None
        if req is not None and any_price(ticker):
            update = to_update(req.conid, ticker, "stream")
            self._data_types[req.conid] = update.data_type
            self._buffer(update)

    def _buffer(self, update: MarketUpdate) -> None:
        self._tick_buffer.append(update)
        if len(self._tick_buffer) == 1:
            # runs once the current socket read is decoded: its updates travel as one message
            self._loop.call_soon(self._flush_ticks)

    def _on_portfolio(self, item: PortfolioItem) -> None:
        """updatePortfolio: the account's own mark of a position (no line), published as source "portfolio"."""
        conid = item.contract.conId
        price = portfolio_price(item.marketPrice)
        if not conid or price is None:
            return
        kind = self._data_types.get(conid, "live")
        self._buffer(MarketUpdate(conid=conid, source="portfolio", ts_us=now_us(), last=price, data_type=kind))

    def _flush_ticks(self) -> None:
        updates, self._tick_buffer = self._tick_buffer, []
        if len(updates) == 1:
            self._publish(updates[0])
        elif updates:
            self._publish(MarketUpdates(updates=updates))

    # ------------------------------------------------------------- snapshots
    def snapshot(self, conids: list[int], timeout_s: float, reply: pykka.Future[Any]) -> None:
        unique = list(dict.fromkeys(conids))
        batch = Batch(conids=unique, reply=reply, outage=self._data_down_cause() if self._excuses_silence() else None)
        if not self.connected:
            for conid in unique:
                batch.failures[conid] = SnapshotFailed(
                    conid=conid, kind=IbErrorKind.DISCONNECTED, code=IB_NOT_CONNECTED, message="not connected"
                )
            self._reply(batch)
            return
        if self.state == ConnectionState.CONNECTIVITY_LOST:
            # 1100: IB itself is unreachable behind a live socket; nothing would answer until 1101/1102.
            for conid in unique:
                batch.failures[conid] = SnapshotFailed(
                    conid=conid, kind=IbErrorKind.DATA_INTERRUPTED, code=1100, message="IB connectivity lost"
                )
            self._reply(batch)
            return
        self._batches.add(batch)
        batch.timer = self._loop.call_later(timeout_s, self._expire, batch)
        for conid in unique:
            contract = self.contracts.get(conid)
            if contract is not None:
                self._start_snapshot(batch, conid, contract)
            else:
                self._loop.create_task(self._snapshot_resolved(batch, conid))
        self._maybe_reply(batch)

    async def _snapshot_resolved(self, batch: Batch, conid: int) -> None:
        contract = await self._contract(conid)
        if batch.replied or conid in batch.failures or conid in batch.updates:
            return
        if isinstance(contract, Unresolved):
            if not self.connected:
                failure = SnapshotFailed(
                    conid=conid, kind=IbErrorKind.DISCONNECTED, code=IB_NOT_CONNECTED, message="contract not resolved"
                )
            elif contract is Unresolved.NOT_FOUND:
                failure = SnapshotFailed(conid=conid, kind=IbErrorKind.NO_CONTRACT, code=200, message="no such contract")
            else:  # a timeout, never "no contract": that would dead-letter a contract IB only failed to describe
                failure = SnapshotFailed(
                    conid=conid, kind=IbErrorKind.TIMEOUT, message="IB did not answer the contract details request"
                )
            batch.failures[conid] = failure
            self._maybe_reply(batch)
            return
        self._start_snapshot(batch, conid, contract)

    def _start_snapshot(self, batch: Batch, conid: int, contract: Contract) -> None:
        req = self._new_request(conid, contract, snapshot=True)
        req.batch = batch
        batch.requests.append(req)

    def _on_snapshot_tick(self, ticker: Ticker) -> None:
        req_id = self.ib.wrapper.ticker2ReqId["mktData"].get(ticker)
        req = self._by_req.get(req_id) if req_id is not None else None
        if req is None or req.answered or req.batch is None or not has_prices(ticker):
            return
        if req.sec_type in OPTION_TYPES and ticker.modelGreeks is None:
            return  # prices complete; wait for the model greeks until the end or the timeout
        update = to_update(req.conid, ticker, "queue")
        # Free the line first: the cancel is in the pacer before the reply leaves, so nothing the worker
        # sends after the reply can find this snapshot still open at IB (it would stay so until
        # tickSnapshotEnd, up to ~11 s later).
        if self._drop_request(req, send_cancel=True) is not None:
            self._cancels_300_expected.add(req.req_id)
        self._answer(req, update)

    def _on_snapshot_end(self, req_id: int) -> None:
        req = self._by_req.get(req_id)
        if req is None or not req.snapshot:
            return
        ticker = req.ticker
        answer: MarketUpdate | SnapshotFailed | None = None
        if not req.answered and ticker is not None:
            if any_price(ticker):
                answer = to_update(req.conid, ticker, "queue")
            elif req.batch is not None and req.batch.outage is not None:  # the farm's silence (see _expire)
                code, text = req.batch.outage
                answer = SnapshotFailed(conid=req.conid, kind=IbErrorKind.DATA_INTERRUPTED, code=code, message=text)
            else:
                answer = SnapshotFailed(conid=req.conid, kind=IbErrorKind.NO_DATA, message="snapshot ended without prices")
        self._drop_request(req, send_cancel=False)  # IB ended it: the line is free (before the reply says so)
        if answer is not None:
            self._answer(req, answer)

    def _answer(self, req: MdRequest, answer: MarketUpdate | SnapshotFailed) -> None:
        req.answered = True
        if self._data_down and isinstance(answer, MarketUpdate):
            self._priced_while_down = True
            if self._data_down.pop(_TWS_SERVER, None) is not None:  # a price came through: TWS reaches IB's data
                # server again, which ends the 2110 outage as a 2104 would (one after this is not "back" any more):
                # the worker lifts the holds of the snapshots it cut
                self._publish(IbError(code=2104, kind=IbErrorKind.INFO, message="a price came through: data server reached"))
        batch = req.batch
        if batch is None or batch.replied:
            return
        if isinstance(answer, MarketUpdate):
            self._data_types[req.conid] = answer.data_type
            batch.updates[req.conid] = answer
        else:
            batch.failures[req.conid] = answer
        self._maybe_reply(batch)

    def _maybe_reply(self, batch: Batch) -> None:
        if not batch.replied and len(batch.updates) + len(batch.failures) >= len(batch.conids):
            self._reply(batch)

    def _reply(self, batch: Batch) -> None:
        batch.replied = True
        result = SnapshotResult(
            updates=[batch.updates[c] for c in batch.conids if c in batch.updates],
            failures=[batch.failures[c] for c in batch.conids if c in batch.failures],
        )
        batch.reply.set(result)
        if not any(r.req_id in self._by_req for r in batch.requests):
            self._finish(batch)

    def _finish(self, batch: Batch) -> None:
        if batch.timer is not None:
            batch.timer.cancel()
        self._batches.discard(batch)

    def _expire(self, batch: Batch) -> None:
        """The batch's time is up: answer what IB sent, time out what has no price at all, close what is open.

        The same answer IB's own end (tickSnapshotEnd, 11 s after the request:
        tws-api/md_request.html) would have given: complete prices without their
        greeks, and an illiquid contract's partial quote (the close only, say),
        which never becomes complete. Our deadline comes no later than IB's end
        with the default 11 s, so answering TIMEOUT here failed every contract
        that did not trade.
        """
        batch.timer = None
        late = [
            (req, to_update(req.conid, req.ticker, "queue"))
            for req in batch.requests
            if not req.answered and req.ticker is not None and any_price(req.ticker)
        ]
        self._close_batch_requests(batch, send_cancel=True)  # cancels in the pacer before the reply leaves
        for req, update in late:
            self._answer(req, update)
        if batch.outage is not None:
            # A TWS may hold requests while a farm is down rather than answer 10182, and serve them or not once it
            # is back: the silence is the farm's, so back to the queue without an attempt (held: the worker), not
            # the contract's failure.
            self._fail_open(batch, IbErrorKind.DATA_INTERRUPTED, *batch.outage)
        else:
            self._fail_open(batch, IbErrorKind.TIMEOUT, None, "no complete quote within the timeout")
        self._finish(batch)

    def _fail_open(self, batch: Batch, kind: IbErrorKind, code: int | None, message: str) -> None:
        for conid in batch.conids:
            if conid not in batch.updates and conid not in batch.failures:
                batch.failures[conid] = SnapshotFailed(conid=conid, kind=kind, code=code, message=message)
        for req in batch.requests:
            req.answered = True
        if not batch.replied:
            self._reply(batch)

    def _interrupt_snapshots(self, code: int, text: str, send_cancel: bool) -> None:
        """A reset (1100/1101) interrupts every open snapshot: back to the queue, not the contract's failure."""
        for batch in list(self._batches):
            self._close_batch_requests(batch, send_cancel=send_cancel)
            self._fail_open(batch, IbErrorKind.DATA_INTERRUPTED, code, text)

    def _close_batch_requests(self, batch: Batch, send_cancel: bool) -> None:
        for req in batch.requests:
            self._drop_request(req, send_cancel=send_cancel)
        self._finish(batch)

    # ---------------------------------------------------------------- errors
    def _on_error(self, req_id: int, code: int, text: str, contract: Contract | None) -> None:
        kind = classify_ib_code(code, text)
        req = self._by_req.get(req_id)
        conid = req.conid if req is not None else (contract.conId if contract is not None and contract.conId else None)
        if code in DATA_BACK_CODES:
            self._data_back()
        back = self._note_data_down(code, text)
        if code == 300 and req_id in self._cancels_300_expected:
            logger.debug("IB: cancel of {} met no request there, as expected ({})", req_id, text)
            return
        if code == 100:
            self._paced_out(req_id, req)
        if code in QUIET_CODES or (kind == IbErrorKind.INFO and code not in NOTICE_CODES):
            logger.debug("IB info {} (req {}): {}", code, req_id, text)
            if back:  # the worker lifts the holds of snapshots the outage cut
                self._publish(IbError(code=code, kind=kind, req_id=req_id, message=text))
            return
        logger.warning("IB error {} {} (req {}, conid {}): {}", code, kind, req_id, conid, text)
        self._publish(IbError(code=code, kind=kind, req_id=req_id, conid=conid, message=text))
        if code == 1100:
            self._ib_reachable = False
            self._interrupt_snapshots(code, text, send_cancel=True)
            self._set_state(ConnectionState.CONNECTIVITY_LOST, text)
        elif code == 1101:
            self._ib_reachable, self._resubscribe_on_restore = True, False
            self._withdraw_cancels()
            self._forget_streams()
            self._interrupt_snapshots(code, text, send_cancel=False)  # IB dropped them with the streams
            if self._up:
                self._resubmit_account_data()
                self._set_state(ConnectionState.RESTORED_DATA_LOST, text, resubscribe=True)
            else:
                # connectAsync is still synchronising: a reqPositions now would replace the one it waits for
                # (ib_insync keys both 'positions') and the connect would hang until its timeout. Nor is data
                # flowing before the session is up: the connect's own CONNECTED says so, and resubscribes.
                self._resubmit_after_connect = True
        elif code == 1102:
            resubscribe, self._ib_reachable, self._resubscribe_on_restore = self._resubscribe_on_restore, True, False
            if self._up:  # while connecting, the connect's own CONNECTED follows (see 1101)
                self._set_state(ConnectionState.RESTORED_DATA_KEPT, text, resubscribe=resubscribe)
        if req is None or (code not in TERMINAL_MD_CODES and code != 100):
            return
        if req.snapshot:
            self._drop_request(req, send_cancel=False)  # dead at IB: the line is free before the reply says so
            if not req.answered:
                self._answer(req, SnapshotFailed(conid=req.conid, kind=kind, code=code, message=text))
        elif code == 10182 and self.streams.get(req.conid) is req:
            self._interrupt(req)
        else:
            refused = self.streams.get(req.conid) is req
            if refused:
                del self.streams[req.conid]  # refused by IB: holds no line (the router demotes on 101)
            # A 100 may not mean IB dropped the request (its documents do not say): cancel it too, or a stream IB
            # served all the same would hold a line nobody counts once the router asks for it again.
            if self._drop_request(req, send_cancel=code == 100) is not None:
                self._cancels_300_expected.add(req.req_id)
            if refused:
                self._ended(req.conid, "refused", code)  # after the IbError above; ends a pending cancel too

    def _note_data_down(self, code: int, text: str) -> bool:
        """Keep what IB says is broken until it says it is back (tws-api/message_codes.html); True if this note
        ended an outage IB had reported (not the 2104s of every connect).

        A market data farm (2103, named as :func:`_farm_name` reads it) until 2104 "OK" or 2108 "inactive but
        should be available upon demand" for it; TWS's link to IB's data server (2110 "broken. It will be
        restored automatically") until 2104 for any farm (it comes back through them) or a price (see
        ``_answer``). 1101/1102 (IB's servers back) and a new session clear everything: IB reports its farms
        afresh. A snapshot batch asked for, or open, while something is down keeps the cause (``Batch.outage``):
        a request TWS held may still time out after the farm is back.
        """
        if code in (2103, 2110):
            name = _TWS_SERVER if code == 2110 else _farm_name(text)
            if name not in self._data_down:  # a new outage: its excuse runs from now, whatever else is down
                self._down_since, self._priced_while_down = self._loop.time(), False
            self._data_down[name] = code
            if self._excuses_silence():
                cause = self._data_down_cause()
                for batch in self._batches:  # open now: whatever they get no price for is the outage's too
                    batch.outage = cause
        elif code in MARKET_DATA_FARM_BACK_CODES:  # 2104, 2108
            back = self._data_down.pop(_farm_name(text), None) is not None
            if code == 2104:
                back = self._data_down.pop(_TWS_SERVER, None) is not None or back
            return back
        elif code in (1101, 1102):
            self._data_down.clear()  # the connection's state says data flows again (the worker lifts on it)
        return False

    def _excuses_silence(self) -> bool:
        """Whether a snapshot asked for now that gets no price is the outage's (see ``IbSettings.outage_excuse_s``)."""
        if not self._data_down:
            return False
        return not (self._priced_while_down and self._loop.time() - self._down_since > self.settings.outage_excuse_s)

    def _data_down_cause(self) -> tuple[int, str]:
        """The code and text a snapshot without a price gets while something is down."""
        names = sorted(self._data_down)
        code = self._data_down[names[0]] if len(names) == 1 else 2103
        what = ", ".join("TWS's link to IB's data server" if n == _TWS_SERVER else f"market data farm {n}" for n in names)
        return code, f"no quote while {what} is down"

    def _paced_out(self, req_id: int, req: MdRequest | None) -> None:
        """IB refused a message past its rate (100), taken as not processed: pause the pacer, resend a cancel.

        A 100 naming an open request refused that request: it holds no line
        and ends as the other refusals do (below, in :meth:`_on_error`). One
        naming a request whose cancel we sent refused the cancel: the line is
        still taken at IB, so the cancel goes again, behind the pacer's hold.
        The holder was already told the stream ended (StreamEnded "cancelled"
        when the first cancel left): until the second one leaves, IB counts
        one line more than we do.
        """
        self.pacer.hold()
        self._last_rate_refusal = self._loop.time()
        if req is None and req_id in self._cancels_out and self.connected:
            logger.info("IB: cancel of request {} refused past the message rate; sending it again", req_id)
            del self._cancels_out[req_id]
            self._send_cancel(req_id)

    def _resubmit_account_data(self) -> None:
        """1101 lost the account subscriptions too: ask again for the portfolio marks and the positions.

        IB's text for 1101: "restored - data lost. Market and account data
        subscription requests must be resubmitted" (tws-api/message_codes.html).
        The router resubmits the streams; these two are ours (connectAsync made
        them), and without them the line-free portfolio floor stops until the
        next reconnect. The positions come back as at a connect (PositionsComplete).
        """
        account = self._account
        if account:
            self._paced(lambda: self.ib.client.reqAccountUpdates(True, account))
        self._paced(self.ib.reqPositionsAsync)

    # ----------------------------------------------------------------- stats
    def stats(self) -> IbStatsReply:
        return IbStatsReply(
            connected=self.connected,
            state=self.state,
            streams=sum(1 for s in self.streams.values() if s.req_id >= 0),
            snapshots_in_flight=sum(1 for r in self._by_req.values() if r.snapshot),
            lines_in_use=self.lines_in_use(),
            peak_lines=self.peak_lines,
            requests_sent=self.pacer.sent,
            requests_queued=self.pacer.queued,
        )
