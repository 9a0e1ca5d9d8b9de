"""A loopback TWS/IB Gateway stand-in that speaks the TWS socket protocol to a real client.

It exists so the real IB actor can be tested through the real ib_insync
client: handshake, the requests ib_insync sends while connecting, positions,
contract details, streaming and snapshot market data, cancels, and IB's own
refusals (101 past the line limit, 100 past the message rate, 200 for an
unknown conid, 300 for an unknown cancel, 321 for a snapshot with generic
ticks or a request without exchange, 322 for a duplicate ticker id, 326 for a
client id already in use). Field layouts follow ib_insync's ``decoder.py`` at
server version 176 (the highest ib_insync 0.9.86 asks for).

Fault switches (thread-safe, callable from the test thread): drop every
connection, send 1100/1101/1102 (or any code), never answer snapshots of
chosen conids, change the line limit, a market data farm blip
(``farm_blip``: 2103, 10182 for every open request, 2104 when back), the
security definition farm down (``secdef_down``: 2157, contract details
unanswered until ``secdef_ok``: 2158), any ``SimConfig`` field (``configure``).

IB's data realities (``SimConfig``): the true line limit, snapshot quotes
delayed by a seeded random draw in a range with tickSnapshotEnd after them,
reqMarketDataType per session (tick 58 says what each request gets),
contracts without a live subscription (354 with type 1/2; 10167 and delayed
ticks 66-76 with 3/4), a closed market (-1 bid/ask live; the last values as
"frozen" with 2/4), the snapshot rate limit (321 "Snapshot requests
limitation exceeded") and portfolio updates (updatePortfolio every
``portfolio_interval_s`` to sessions subscribed with reqAccountUpdates). Counters (``stats()``): messages
received by id, the largest number of messages seen in any sliding window of
``pacing_window_s``, lines in use and their peak, connections accepted.

The server runs in its own thread with its own asyncio loop and binds
127.0.0.1 only; ``start()`` returns the port (bound to port 0 unless given).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import random
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["SimConfig", "SimContract", "SimPosition", "SimStats", "TwsSimulator", "default_universe"]

_T = TypeVar("_T")

SERVER_VERSION = 176
#: The simulator thread's heartbeat, and how late it may run before it counts as stalled (see _note_stall).
HEARTBEAT_S = 0.01
STALL_S = 0.05
MIN_CLIENT_VERSION = 157
#: IB's texts for its system codes (tws-api/message_codes.html).
_SYSTEM_TEXTS = {
    1100: "Connectivity between IB and Trader Workstation has been lost.",
    1101: "Connectivity between IB and TWS has been restored- data lost.",
    1102: "Connectivity between IB and TWS has been restored- data maintained.",
}

# Incoming message ids (client -> TWS), from ib_insync's client.py.
REQ_MKT_DATA = 1
CANCEL_MKT_DATA = 2
REQ_OPEN_ORDERS = 5
REQ_ACCOUNT_UPDATES = 6
REQ_EXECUTIONS = 7
REQ_CONTRACT_DETAILS = 9
REQ_CURRENT_TIME = 49
REQ_MARKET_DATA_TYPE = 59
REQ_POSITIONS = 61
CANCEL_POSITIONS = 64
START_API = 71
REQ_ACCOUNT_UPDATES_MULTI = 76
REQ_COMPLETED_ORDERS = 99

# Outgoing message ids (TWS -> client), from ib_insync's decoder.py.
TICK_PRICE = 1
TICK_SIZE = 2
ERR_MSG = 4
PORTFOLIO_VALUE = 7
NEXT_VALID_ID = 9
CONTRACT_DATA = 10
MANAGED_ACCTS = 15
TICK_OPTION_COMPUTATION = 21
CURRENT_TIME = 49
CONTRACT_DATA_END = 52
OPEN_ORDER_END = 53
ACCT_DOWNLOAD_END = 54
EXECUTION_DATA_END = 55
TICK_SNAPSHOT_END = 57
MARKET_DATA_TYPE = 58
POSITION_DATA = 61
POSITION_END = 62
ACCOUNT_UPDATE_MULTI_END = 74
TICK_REQ_PARAMS = 81
COMPLETED_ORDERS_END = 102

#: Live tick type -> its delayed twin (IB's tick types 66-76): bid, ask, last, close, volume.
DELAYED_TICKS = {1: 66, 2: 67, 4: 68, 9: 75, 8: 74}
_TEXTS = {
    321: "Error validating request.-'bW' : cause - Snapshot requests limitation exceeded:{n} per 1 second(s)",
    354: "Requested market data is not subscribed.",
    10167: "Requested market data is not subscribed. Displaying delayed market data.",
    10168: "Requested market data is not subscribed. Delayed market data is not enabled.",
    10182: "Failed to request live updates (disconnected).",
    10090: "Part of requested market data is not subscribed. Subscription-independent ticks are still active.",
    10091: "Part of requested market data requires additional subscription for API. Delayed market data is available.",
}


@dataclass(frozen=True, kw_only=True)
class SimContract:
    """One instrument the simulated IB knows."""

    conid: int
    symbol: str
    sec_type: str = "STK"
    expiry: str = ""
    strike: float = 0.0
    right: str = ""
    multiplier: str = ""
    exchange: str = "SMART"
    primary_exchange: str = "NASDAQ"
    currency: str = "USD"
    local_symbol: str = ""
    trading_class: str = ""
    min_tick: float = 0.01
    under_conid: int = 0


@dataclass(frozen=True, kw_only=True)
class SimPosition:
    conid: int
    position: float
    avg_cost: float


@dataclass(kw_only=True)
class SimConfig:
    """What the simulated account holds and how strict the simulated IB is."""

    account: str = "DU1234567"
    contracts: dict[int, SimContract] = field(default_factory=dict)
    positions: list[SimPosition] = field(default_factory=list)
    line_limit: int = 100
    #: IB's message rate: more than this many messages in any window answers error 100.
    pacing_limit: int = 50
    pacing_window_s: float = 1.0
    #: Judge no pacing window that holds a stall of the simulator's own thread (see ``_note_stall``).
    pacing_forgives_stalls: bool = True
    #: A message past the rate is answered 100 and then processed all the same. IB's documents do not say whether
    #: it drops such a message; the IB actor must be right either way.
    pacing_processes_refused: bool = False
    #: Whether an open snapshot holds a line until its tickSnapshotEnd (IB does not say; we assume yes).
    snapshots_use_lines: bool = True
    #: Streaming ticks for every open stream this often (0 = only the initial quote).
    tick_interval_s: float = 0.05
    #: Delay between a snapshot's quote and its tickSnapshotEnd (IB: up to ~11 s).
    snapshot_end_delay_s: float = 0.02
    #: A snapshot's quote comes this long after its request: uniform in [min, max], drawn from ``seed``.
    snapshot_delay_min_s: float = 0.0
    snapshot_delay_max_s: float = 0.0
    seed: int = 0
    #: Contracts without a live data subscription: 354 with market data type 1/2, delayed data with 3/4.
    unsubscribed: set[int] = field(default_factory=set)
    #: conid -> error code answered to every market data request of it (e.g. 10168: no delayed data either).
    refused: dict[int, int] = field(default_factory=dict)
    #: conid -> advisory code sent with every market data request of it, whose data still follows: 10090 "Part
    #: of requested market data is not subscribed" or 10091 "Part of requested market data requires additional
    #: subscription for API" (an option's greeks without the underlying's subscription, say).
    advisories: dict[int, int] = field(default_factory=dict)
    #: The market is closed: live bid/ask are -1; with type 2/4 the last values come, as frozen (tick 58 = 2/4).
    market_closed: bool = False
    #: Snapshot requests accepted in any ``snapshot_rate_window_s`` (0 = no limit); beyond it, 321.
    snapshot_rate_limit: int = 0
    snapshot_rate_window_s: float = 1.0
    #: updatePortfolio for every position this often to sessions subscribed to account updates (0 = never).
    portfolio_interval_s: float = 0.0
    #: Contracts nobody quotes or trades today: bid, ask and last come as "no data" (``no_data_price``, size 0),
    #: only the close is a price; IB still ends a snapshot of them with tickSnapshotEnd
    #: (``snapshot_end_delay_s`` after the quote).
    illiquid: set[int] = field(default_factory=set)
    #: IB's "no data for this field" price, always with a size of 0: -1 or 0 (tws-api EWrapper::tickPrice:
    #: "A tickPrice value of -1 or 0 followed by a tickSize of 0 indicates there is no data for this field
    #: currently available").
    no_data_price: float = -1.0
    #: Contracts whose bid side has emptied: IB says so with a bid size of 0 (tickSize, tick 0 / 69) and sends
    #: no new bid price, so the last bid price is still in the client's Ticker.
    no_bid: set[int] = field(default_factory=set)
    #: conid -> the option computation IB sends for it, in wire order (impliedVol, delta, optPrice,
    #: pvDividend, gamma, vega, theta, undPrice), instead of the simulated model. IB's "not computed"
    #: markers are -1 (impliedVol, optPrice, pvDividend, undPrice) and -2 (delta, gamma, vega, theta).
    model_greeks: dict[int, tuple[float, float, float, float, float, float, float, float]] = field(default_factory=dict)
    server_version: int = SERVER_VERSION
    #: Error codes sent to every new session right after its greeting (startApi), while the client is still
    #: synchronising: 1100 says TWS is cut off from IB's servers as the client connects.
    codes_at_connect: tuple[int, ...] = ()
    #: What a snapshot requested while the farm is down (``farm_blip``) gets: "10182" (the error), "silent" (no
    #: answer at all: a TWS that holds it for the farm) or "end" (tickSnapshotEnd with no quote). Streams get 10182.
    farm_down_snapshots: str = "10182"


@dataclass(frozen=True, kw_only=True)
class SimStats:
    """Counters read by tests."""

    connections: int
    sessions: int
    messages: int
    by_msg_id: dict[int, int]
    max_in_window: int
    pacing_violations: int
    lines_in_use: int
    peak_lines: int
    streams: int
    open_snapshots: int
    #: Error messages sent to clients, by code (101, 300, 321, 10182, ...).
    errors_by_code: dict[int, int] = field(default_factory=dict)


def default_universe(n_stocks: int = 300, n_option_strikes: int = 10) -> SimConfig:
    """A deterministic account: ``n_stocks`` stocks (conids 1001...), calls and puts on the first one.

    Options get conids 900001...; every stock and every option is held.
    """
    contracts: dict[int, SimContract] = {}
    positions: list[SimPosition] = []
    for i in range(n_stocks):
        conid = 1001 + i
        symbol = f"S{i:03d}"
        contracts[conid] = SimContract(conid=conid, symbol=symbol, local_symbol=symbol, trading_class="NMS")
        positions.append(SimPosition(conid=conid, position=float(10 + i), avg_cost=50.0 + i))
    for k in range(n_option_strikes):
        for j, right in enumerate(("C", "P")):
            conid = 900001 + 2 * k + j
            strike = 100.0 + 5 * k
            local = f"S000  260116{right}{int(strike * 1000):08d}"
            contracts[conid] = SimContract(
                conid=conid,
                symbol="S000",
                sec_type="OPT",
                expiry="20260116",
                strike=strike,
                right=right,
                multiplier="100",
                local_symbol=local,
                trading_class="S000",
                primary_exchange="",
                under_conid=1001,
            )
            positions.append(SimPosition(conid=conid, position=-1.0 if right == "C" else 2.0, avg_cost=250.0))
    return SimConfig(contracts=contracts, positions=positions)


def farm_of(sec_type: str) -> str:
    """The market data farm that serves a contract here: US options on "usopt", everything else on "usfarm"
    (IB names the farm in its 2103/2104 messages and says nothing of which farm serves which contract)."""
    return "usopt" if sec_type in ("OPT", "FOP") else "usfarm"


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if value is None:
        return ""
    return str(value)


def _frame(*fields: Any) -> bytes:
    payload = "".join(_fmt(f) + "\0" for f in fields).encode()
    return struct.pack(">I", len(payload)) + payload


class _Session(asyncio.Protocol):
    """One client connection: handshake, then framed requests."""

    def __init__(self, sim: TwsSimulator) -> None:
        self.sim = sim
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.handshaken = False
        #: The protocol version agreed in the handshake: the layouts of what is sent depend on it.
        self.version = SERVER_VERSION
        self.client_id: int | None = None
        self.streams: dict[int, int] = {}  # reqId -> conid
        self.snapshots: dict[int, int] = {}  # reqId -> conid, open until tickSnapshotEnd or cancel
        self.tick_no = 0
        #: reqMarketDataType of this API session (IB's default: live).
        self.market_data_type = 1
        self.account_updates = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.sim._sessions.add(self)
        self.sim._connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.sim._sessions.discard(self)
        self.transport = None
        self.streams.clear()
        self.snapshots.clear()

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.sim._note_stall(now)
        self.buffer += data
        if not self.handshaken:
            if len(self.buffer) < 8:
                return
            if not self.buffer.startswith(b"API\0"):
                self.close()
                return
            size = struct.unpack(">I", self.buffer[4:8])[0]
            if len(self.buffer) < 8 + size:
                return
            versions = self.buffer[8 : 8 + size].decode()
            self.buffer = self.buffer[8 + size :]
            self.handshaken = True
            max_version = int(versions.lstrip("v").split()[0].split("..")[-1])
            if max_version < MIN_CLIENT_VERSION:  # a client older than anything the simulator speaks
                self.close()
                return
            # As TWS does: the highest version both know, or the server's own when the client's range starts
            # above it; the client then decides (ib_insync's client.py drops a server below its
            # MinClientVersion: "TWS/gateway version must be >= 972").
            version = min(max_version, self.sim.config.server_version)
            self.version = version
            self.write(_frame(version, time.strftime("%Y%m%d %H:%M:%S UTC", time.gmtime())))
        while len(self.buffer) >= 4:
            size = struct.unpack(">I", self.buffer[:4])[0]
            if len(self.buffer) < 4 + size:
                return
            fields = self.buffer[4 : 4 + size].decode(errors="backslashreplace").split("\0")
            self.buffer = self.buffer[4 + size :]
            fields.pop()
            if self.sim._count_message(now, int(fields[0])):
                self.sim._on_message(self, fields)
            else:
                self.error(_req_id_of(fields), 100, "Max rate of messages per second has been exceeded:max=50 rec=51")
                if self.sim.config.pacing_processes_refused:
                    self.sim._on_message(self, fields)

    # -- output
    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send(self, *fields: Any) -> None:
        self.write(_frame(*fields))

    def error(self, req_id: int, code: int, message: str) -> None:
        self.sim._errors[code] += 1
        self.send(ERR_MSG, 2, req_id, code, message, "")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _req_id_of(fields: list[str]) -> int:
    """The request id of a message with a version field, for error replies; -1 when it has none."""
    msg_id = int(fields[0])
    if msg_id in (REQ_MKT_DATA, CANCEL_MKT_DATA, REQ_CONTRACT_DETAILS, REQ_EXECUTIONS, REQ_ACCOUNT_UPDATES_MULTI):
        try:
            return int(fields[2])
        except (IndexError, ValueError):
            return -1
    return -1


class TwsSimulator:
    """The simulated gateway. ``start()`` -> port; ``stop()`` closes everything."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or default_universe()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._sessions: set[_Session] = set()
        self._connections = 0
        self._lock = threading.Lock()
        self._times: deque[float] = deque()
        self._max_in_window = 0
        self._violations = 0
        self._by_msg_id: Counter[int] = Counter()
        self._errors: Counter[int] = Counter()
        self._peak_lines = 0
        self._never_answer: set[int] = set()
        self._ticker: asyncio.Task[None] | None = None
        self._portfolio: asyncio.Task[None] | None = None
        self._rng = random.Random(self.config.seed)
        self._snapshot_times: deque[float] = deque()
        #: conid -> snapshot requests answered with a quote (``snapshot_quotes``).
        self._snapshot_quotes: Counter[int] = Counter()
        #: Market data farms down now (``farm_blip``): a contract's farm is :func:`farm_of` it.
        self._farms_down: set[str] = set()
        #: The security definition farm (which answers reqContractDetails) is down: requests wait for it.
        self._secdef_down = False
        self._held_details: list[tuple[_Session, list[str]]] = []
        self.port = 0
        #: When the heartbeat is due next, and when this thread last found itself stalled (see _note_stall).
        self._heartbeat_due = 0.0
        self._stalled_at = -math.inf

    # -- lifecycle
    def start(self, port: int = 0) -> int:
        """Start the server thread and return the bound port."""
        ready: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(port, ready), name="tws-simulator", daemon=True)
        self._thread.start()
        self.port = ready.result(timeout=10)
        return self.port

    def _run(self, port: int, ready: concurrent.futures.Future[int]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(loop.create_server(lambda: _Session(self), "127.0.0.1", port))
            if self.config.tick_interval_s > 0:
                self._ticker = loop.create_task(self._tick_forever())
            self._heartbeat()
            ready.set_result(self._server.sockets[0].getsockname()[1])
            loop.run_forever()
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self) -> None:
        """Close every connection and the listening socket, and end the thread."""
        if self._loop is None or self._thread is None:
            return

        async def shutdown() -> None:
            for task in (self._ticker, self._portfolio):
                if task is not None:
                    task.cancel()
            if self._server is not None:
                self._server.close()
            for session in list(self._sessions):
                if session.transport is not None:
                    session.transport.abort()
            if self._server is not None:
                await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop = None

    def __enter__(self) -> TwsSimulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` in the server loop and wait for its result."""
        assert self._loop is not None, "simulator not started"

        async def run() -> _T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)

    # -- fault switches and counters (any thread)
    def drop_connections(self) -> None:
        """Cut every client socket, as a gateway restart or a network failure would."""

        def drop() -> None:
            for session in list(self._sessions):
                if session.transport is not None:
                    session.transport.abort()

        self._call(drop)

    def send_error(self, code: int, message: str = "", req_id: int = -1) -> None:
        """Send error ``code`` to every client. 1101 also forgets every stream and the account updates, as IB does."""
        texts = _SYSTEM_TEXTS

        def send() -> None:
            for session in list(self._sessions):
                if code == 1101:
                    # "Market and account data subscription requests must be resubmitted" (IB's text for 1101):
                    # every market data request, open snapshots included, and the account updates are gone.
                    session.streams.clear()
                    session.snapshots.clear()
                    session.account_updates = False
                session.error(req_id, code, message or texts.get(code, f"simulated error {code}"))

        self._call(send)

    def set_never_answer(self, conid: int, never: bool = True) -> None:
        """Snapshots of ``conid`` get no quote and no tickSnapshotEnd (until cancelled)."""

        def switch() -> None:
            if never:
                self._never_answer.add(conid)
            else:
                self._never_answer.discard(conid)

        self._call(switch)

    def configure(self, **changes: Any) -> None:
        """Change ``SimConfig`` fields while running (e.g. ``market_closed=True``, ``snapshot_rate_limit=5``)."""

        def apply() -> None:
            for name, value in changes.items():
                if not hasattr(self.config, name):
                    raise AttributeError(f"SimConfig has no field {name!r}")
                setattr(self.config, name, value)
            if "seed" in changes:
                self._rng.seed(self.config.seed)

        self._call(apply)

    def farm_blip(self, down_s: float | None = None, farm: str = "usfarm") -> None:
        """A market data farm drops: 2103, then 10182 for every stream and open snapshot of its contracts (the
        socket stays up). The default "usfarm" serves every contract but options (:func:`farm_of`).

        New market data requests for its contracts are answered 10182 (or as ``farm_down_snapshots`` says)
        until the farm is back: after ``down_s`` or at ``farm_ok()``, which sends 2104 (None: only ``farm_ok()``).
        """

        def blip() -> None:
            self._farms_down.add(farm)
            for session in list(self._sessions):
                session.error(-1, 2103, f"Market data farm connection is broken:{farm}")
                for requests in (session.streams, session.snapshots):
                    for req_id, conid in list(requests.items()):
                        if self._farm_of(conid) == farm:
                            session.error(req_id, 10182, "Failed to request live updates (disconnected).")
                            del requests[req_id]
            if down_s is not None:
                assert self._loop is not None
                self._loop.call_later(down_s, self._farm_back, True, farm)

        self._call(blip)

    def farm_ok(self, announce: bool = True, farm: str = "usfarm") -> None:
        """The farm is back: 2104 to every session (``announce=False``: silently, e.g. before a 1102)."""
        self._call(lambda: self._farm_back(announce, farm))

    def _farm_back(self, announce: bool = True, farm: str = "usfarm") -> None:
        if farm not in self._farms_down:
            return
        self._farms_down.discard(farm)
        if announce:
            for session in list(self._sessions):
                session.error(-1, 2104, f"Market data farm connection is OK:{farm}")

    def _farm_of(self, conid: int) -> str:
        c = self.config.contracts.get(conid)
        return farm_of(c.sec_type if c is not None else "STK")

    def _farm_down_for(self, conid: int) -> bool:
        return bool(self._farms_down) and self._farm_of(conid) in self._farms_down

    def secdef_down(self) -> None:
        """The security definition farm drops: 2157 to every session; contract details wait for ``secdef_ok``.

        The sec-def farm is what answers reqContractDetails (IB's 2157 "Sec-def data farm connection is
        broken" / 2158 "... is OK"); while it is down a request gets no answer, not an error.
        """

        def down() -> None:
            self._secdef_down = True
            for session in list(self._sessions):
                session.error(-1, 2157, "Sec-def data farm connection is broken:secdefnj")

        self._call(down)

    def secdef_ok(self) -> None:
        """The sec-def farm is back: 2158 to every session, then the contract details held meanwhile, late."""

        def back() -> None:
            self._secdef_down = False
            for session in list(self._sessions):
                session.error(-1, 2158, "Sec-def data farm connection is OK:secdefnj")
            held, self._held_details = self._held_details, []
            for session, fields in held:
                if session.transport is not None:
                    self._contract_details(session, fields)

        self._call(back)

    def set_line_limit(self, limit: int) -> None:
        def set_limit() -> None:
            self.config.line_limit = limit

        self._call(set_limit)

    def set_pacing_limit(self, limit: int) -> None:
        """IB's message rate from now on (a busier gateway, say): messages past it are refused with error 100.

        Strict, stalls of the simulator's thread included: a test that lowers the limit sends far past it
        and wants the refusals even on a busy machine.
        """

        def set_limit() -> None:
            self.config.pacing_limit = limit
            self.config.pacing_forgives_stalls = False

        self._call(set_limit)

    def snapshot_quotes(self) -> dict[int, int]:
        """conid -> snapshot requests answered with a quote so far."""
        with self._lock:
            return dict(self._snapshot_quotes)

    def stats(self) -> SimStats:
        def read() -> SimStats:
            with self._lock:
                return SimStats(
                    connections=self._connections,
                    sessions=len(self._sessions),
                    messages=sum(self._by_msg_id.values()),
                    by_msg_id=dict(self._by_msg_id),
                    max_in_window=self._max_in_window,
                    pacing_violations=self._violations,
                    lines_in_use=self._lines(),
                    peak_lines=self._peak_lines,
                    streams=sum(len(s.streams) for s in self._sessions),
                    open_snapshots=sum(len(s.snapshots) for s in self._sessions),
                    errors_by_code=dict(self._errors),
                )

        return self._call(read)

    # -- pacing
    def _heartbeat(self) -> None:
        """Every HEARTBEAT_S: how late this thread runs tells when it was stalled (see ``_note_stall``)."""
        assert self._loop is not None
        now = time.monotonic()
        self._note_stall(now)
        self._heartbeat_due = now + HEARTBEAT_S
        self._loop.call_later(HEARTBEAT_S, self._heartbeat)

    def _note_stall(self, now: float) -> None:
        """A heartbeat overdue by more than STALL_S: this thread did not run meanwhile (the machine was busy).

        Messages that arrived during the stall are read together when it ends, all stamped with that one
        moment: a rate the client kept can look broken. Real IB does not stall; the simulator judges no
        pacing window that holds its own stall.
        """
        if self._heartbeat_due and now - self._heartbeat_due > STALL_S:
            self._stalled_at = now

    def _count_message(self, now: float, msg_id: int) -> bool:
        """Record one incoming message; False when it broke the rate limit (and is refused)."""
        with self._lock:
            self._by_msg_id[msg_id] += 1
            times = self._times
            times.append(now)
            while times and now - times[0] >= self.config.pacing_window_s:
                times.popleft()
            if self.config.pacing_forgives_stalls and now - self._stalled_at < self.config.pacing_window_s:
                return True  # arrival times within this window are not known (see _note_stall)
            self._max_in_window = max(self._max_in_window, len(times))
            if len(times) > self.config.pacing_limit:
                self._violations += 1
                return False
            return True

    # -- lines
    def _lines(self) -> int:
        total = 0
        for session in self._sessions:
            total += len(session.streams)
            if self.config.snapshots_use_lines:
                total += len(session.snapshots)
        return total

    # -- request handling (server loop)
    def _on_message(self, session: _Session, fields: list[str]) -> None:
        msg_id = int(fields[0])
        handler = {
            START_API: self._start_api,
            REQ_POSITIONS: self._positions,
            REQ_OPEN_ORDERS: lambda s, f: s.send(OPEN_ORDER_END, 1),
            REQ_COMPLETED_ORDERS: lambda s, f: s.send(COMPLETED_ORDERS_END),
            REQ_ACCOUNT_UPDATES: self._account_updates,
            REQ_ACCOUNT_UPDATES_MULTI: lambda s, f: s.send(ACCOUNT_UPDATE_MULTI_END, 1, int(f[2])),
            REQ_EXECUTIONS: lambda s, f: s.send(EXECUTION_DATA_END, 1, int(f[2])),
            REQ_CONTRACT_DETAILS: self._contract_details,
            REQ_MKT_DATA: self._mkt_data,
            CANCEL_MKT_DATA: self._cancel_mkt_data,
            REQ_CURRENT_TIME: lambda s, f: s.send(CURRENT_TIME, 1, int(time.time())),
            REQ_MARKET_DATA_TYPE: self._market_data_type,
        }.get(msg_id)
        if handler is not None:
            handler(session, fields)
        # Anything else (cancelPositions, ...) needs no answer here.

    @staticmethod
    def _market_data_type(session: _Session, fields: list[str]) -> None:
        session.market_data_type = int(fields[2])

    def _start_api(self, session: _Session, fields: list[str]) -> None:
        client_id = int(fields[2])
        if any(s.client_id == client_id for s in self._sessions if s is not session):
            session.error(-1, 326, "Unable to connect as the client id is already in use.")
            session.close()
            return
        session.client_id = client_id
        session.send(NEXT_VALID_ID, 1, 1)
        session.send(MANAGED_ACCTS, 1, self.config.account)
        for code, text in (
            (2104, "Market data farm connection is OK:usfarm"),
            (2106, "HMDS data farm connection is OK:ushmds"),
            (2158, "Sec-def data farm connection is OK:secdefnj"),
        ):
            session.error(-1, code, text)
        for code in self.config.codes_at_connect:
            session.error(-1, code, _SYSTEM_TEXTS.get(code, f"simulated error {code}"))

    def _positions(self, session: _Session, fields: list[str]) -> None:
        for pos in self.config.positions:
            c = self.config.contracts[pos.conid]
            # IB leaves the exchange of a position empty.
            session.send(
                POSITION_DATA,
                3,
                self.config.account,
                c.conid,
                c.symbol,
                c.sec_type,
                c.expiry,
                c.strike,
                c.right,
                c.multiplier,
                "",
                c.currency,
                c.local_symbol,
                c.trading_class,
                pos.position,
                pos.avg_cost,
            )
        session.send(POSITION_END, 1)

    def _account_updates(self, session: _Session, fields: list[str]) -> None:
        session.account_updates = fields[2] == "1"
        if not session.account_updates:
            return
        if self.config.portfolio_interval_s > 0:
            self._send_portfolio(session)
            if self._portfolio is None:
                assert self._loop is not None
                self._portfolio = self._loop.create_task(self._portfolio_forever())
        session.send(ACCT_DOWNLOAD_END, 1, fields[3] or self.config.account)

    def _send_portfolio(self, session: _Session) -> None:
        """updatePortfolio (version 8, the layout ib_insync's decoder reads) for every position."""
        for pos in self.config.positions:
            c = self.config.contracts[pos.conid]
            price = self._mark(c)
            multiplier = float(c.multiplier or 1)
            value = round(pos.position * price * multiplier, 2)
            session.send(
                PORTFOLIO_VALUE,
                8,
                c.conid,
                c.symbol,
                c.sec_type,
                c.expiry,
                c.strike,
                c.right,
                c.multiplier,
                c.primary_exchange,
                c.currency,
                c.local_symbol,
                c.trading_class,
                pos.position,
                price,
                value,
                pos.avg_cost,
                round(value - pos.position * pos.avg_cost, 2),
                0.0,
                self.config.account,
            )

    async def _portfolio_forever(self) -> None:
        while self.config.portfolio_interval_s > 0:
            await asyncio.sleep(self.config.portfolio_interval_s)
            for session in list(self._sessions):
                if session.account_updates:
                    self._send_portfolio(session)
        self._portfolio = None

    def _contract_details(self, session: _Session, fields: list[str]) -> None:
        if self._secdef_down:
            self._held_details.append((session, fields))
            return
        req_id, conid = int(fields[2]), int(fields[3] or 0)
        c = self.config.contracts.get(conid)
        if c is None:
            session.error(req_id, 200, "No security definition has been found for the request")
            return
        under = self.config.contracts.get(c.under_conid)
        # Layout by the agreed version, as ib_insync's decoder.py contractDetails reads it: below 164 a message
        # version and the obsolete mdSizeMultiplier; 163 ends with suggestedSizeIncrement, 164+ with minSize,
        # sizeIncrement and suggestedSizeIncrement.
        old = session.version < 164
        if session.version >= 164:
            sizes: tuple[Any, ...] = (1, 1, 1)
        else:
            sizes = (1,) if session.version == 163 else ()
        session.send(
            CONTRACT_DATA,
            *((8,) if old else ()),
            req_id,
            c.symbol,
            c.sec_type,
            c.expiry,
            c.strike,
            c.right,
            c.exchange,
            c.currency,
            c.local_symbol,
            c.trading_class,
            c.trading_class,
            c.conid,
            c.min_tick,
            *((1,) if old else ()),
            c.multiplier,
            "ACTIVETIM,AD,LMT,MKT",
            "SMART,NASDAQ,ARCA",
            1,
            c.under_conid,
            f"{c.symbol} SIMULATED",
            c.primary_exchange,
            c.expiry[:6],
            "",
            "",
            "",
            "US/Eastern",
            "",
            "",
            "",
            "",
            0,  # numSecIds
            1,
            under.symbol if under else "",
            under.sec_type if under else "",
            "26",
            c.expiry,
            "COMMON" if c.sec_type == "STK" else "",
            *sizes,
        )
        session.send(CONTRACT_DATA_END, 1, req_id)

    def _mkt_data(self, session: _Session, fields: list[str]) -> None:
        req_id, conid, sec_type, exchange = int(fields[2]), int(fields[3] or 0), fields[5], fields[10]
        rest = fields[15:]
        if sec_type == "BAG":
            n_legs = int(rest[0])
            rest = rest[1 + 4 * n_legs :]
        rest = rest[4:] if rest[0] == "1" else rest[1:]
        generic_ticks, snapshot = rest[0], rest[1] == "1"
        if req_id in session.streams or req_id in session.snapshots:
            session.error(req_id, 322, f"Error processing request.-'bW' : cause - Duplicate ticker id:{req_id}")
            return
        c = self.config.contracts.get(conid)
        if c is None:
            session.error(req_id, 200, "No security definition has been found for the request")
            return
        if not exchange:
            session.error(req_id, 321, "Error validating request.-'bW' : cause - Please enter exchange")
            return
        if snapshot and generic_ticks:
            session.error(
                req_id,
                321,
                "Error validating request.-'bW' : cause - Snapshot market data subscription is not applicable "
                "to generic ticks",
            )
            return
        code = self._refusal(session, conid, snapshot)
        if code is not None:
            text = _TEXTS.get(code, f"simulated error {code}").format(n=self.config.snapshot_rate_limit)
            session.error(req_id, code, text)
            return
        if ((snapshot and self.config.snapshots_use_lines) or not snapshot) and self._lines() >= self.config.line_limit:
            session.error(req_id, 101, f"Max number of tickers has been reached:{self.config.line_limit}")
            return
        if snapshot:
            session.snapshots[req_id] = conid
        else:
            session.streams[req_id] = conid
        self._peak_lines = max(self._peak_lines, self._lines())
        farm_down = self._farm_down_for(conid)
        if snapshot and (conid in self._never_answer or farm_down):  # farm down: "silent" or "end"
            if farm_down and self.config.farm_down_snapshots == "end":
                session.send(TICK_SNAPSHOT_END, 1, req_id)
                del session.snapshots[req_id]
            return
        session.send(TICK_REQ_PARAMS, req_id, c.min_tick, "9c0001", 3)
        if conid in self.config.unsubscribed:  # only with type 3/4 here: 1/2 were refused with 354
            session.error(req_id, 10167, _TEXTS[10167])
        advisory = self.config.advisories.get(conid)
        if advisory is not None:
            session.error(req_id, advisory, _TEXTS.get(advisory, f"simulated advisory {advisory}"))
        session.send(MARKET_DATA_TYPE, 1, req_id, self._data_type_id(session, conid))
        if not snapshot:
            self._quote(session, req_id, c, full=True)
            return
        low, high = self.config.snapshot_delay_min_s, self.config.snapshot_delay_max_s
        delay = self._rng.uniform(low, high) if high > low else low
        if delay > 0:
            assert self._loop is not None
            self._loop.call_later(delay, self._snapshot_quote, session, req_id, c)
        else:
            self._snapshot_quote(session, req_id, c)

    def _refusal(self, session: _Session, conid: int, snapshot: bool) -> int | None:
        """The error code IB answers a market data request with (before the line check), or None."""
        config = self.config
        if conid in config.refused:
            return config.refused[conid]
        if conid in config.unsubscribed and session.market_data_type in (1, 2):
            return 354
        if self._farm_down_for(conid) and not (snapshot and config.farm_down_snapshots in ("silent", "end")):
            return 10182
        if snapshot and config.snapshot_rate_limit > 0:
            now = time.monotonic()
            times = self._snapshot_times
            while times and now - times[0] >= config.snapshot_rate_window_s:
                times.popleft()
            if len(times) >= config.snapshot_rate_limit:
                return 321
            times.append(now)
        return None

    def _data_type_id(self, session: _Session, conid: int) -> int:
        """What tick 58 says: 1 live, 2 frozen, 3 delayed, 4 delayed-frozen."""
        frozen = self.config.market_closed and session.market_data_type in (2, 4)
        if conid in self.config.unsubscribed:
            return 4 if frozen else 3
        return 2 if frozen else 1

    def _snapshot_quote(self, session: _Session, req_id: int, c: SimContract) -> None:
        if req_id not in session.snapshots:
            return  # cancelled (or killed) before its quote was due
        self._quote(session, req_id, c, full=True)
        with self._lock:
            self._snapshot_quotes[c.conid] += 1
        assert self._loop is not None
        self._loop.call_later(self.config.snapshot_end_delay_s, self._end_snapshot, session, req_id)

    def _end_snapshot(self, session: _Session, req_id: int) -> None:
        if session.snapshots.pop(req_id, None) is not None:
            session.send(TICK_SNAPSHOT_END, 1, req_id)

    def _cancel_mkt_data(self, session: _Session, fields: list[str]) -> None:
        req_id = int(fields[2])
        if session.streams.pop(req_id, None) is None and session.snapshots.pop(req_id, None) is None:
            session.error(req_id, 300, f"Can't find EId with tickerId:{req_id}")

    def _quote(self, session: _Session, req_id: int, c: SimContract, full: bool) -> None:
        """Deterministic prices from the conid and the session's tick counter."""
        session.tick_no += 1
        n = session.tick_no
        if c.sec_type == "OPT":
            under = self.config.contracts.get(c.under_conid)
            und_price = _base_price(under.conid) if under else 100.0
            base = max(0.05, round(abs(und_price - c.strike) * 0.5 + 2.0, 2))
        else:
            und_price, base = 0.0, _base_price(c.conid)
        bid = round(base + 0.01 * (n % 7), 2)
        ask = round(bid + 0.02, 2)
        kind = self._data_type_id(session, c.conid)
        tick = (lambda t: DELAYED_TICKS[t]) if kind in (3, 4) else (lambda t: t)
        illiquid = c.conid in self.config.illiquid
        no_data = self.config.no_data_price
        if illiquid or (self.config.market_closed and kind in (1, 3)):  # not frozen: IB's "no data" marker
            session.send(TICK_PRICE, 6, req_id, tick(1), no_data, 0, 0)
            session.send(TICK_PRICE, 6, req_id, tick(2), no_data, 0, 0)
        else:
            if c.conid in self.config.no_bid:
                session.send(TICK_SIZE, 6, req_id, 69 if kind in (3, 4) else 0, 0)
            else:
                session.send(TICK_PRICE, 6, req_id, tick(1), bid, 100 + n % 50, 0)
            session.send(TICK_PRICE, 6, req_id, tick(2), ask, 200 + n % 50, 0)
        if illiquid:
            session.send(TICK_PRICE, 6, req_id, tick(4), no_data, 0, 0)
        else:
            session.send(TICK_PRICE, 6, req_id, tick(4), round(bid + 0.01, 2), 5, 0)
        if full:
            session.send(TICK_PRICE, 6, req_id, tick(9), round(base - 0.5, 2), 0, 0)
            session.send(TICK_SIZE, 6, req_id, tick(8), 1000 + n)
        if c.sec_type == "OPT":
            sign = 1.0 if c.right == "C" else -1.0
            delta = sign * round(0.5 - (c.strike - und_price) / 200.0, 4)
            tick_types = (10, 11, 12, 13) if full else (13,)
            computed = (0.25 + 0.001 * (c.conid % 10), delta, bid, 0.0, 0.02, 0.11, -0.05, und_price)
            values = self.config.model_greeks.get(c.conid, computed)
            for tick_type in tick_types:
                session.send(TICK_OPTION_COMPUTATION, req_id, tick_type, 1, *values)

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick_interval_s)
            for session in list(self._sessions):
                for req_id, conid in list(session.streams.items()):
                    self._quote(session, req_id, self.config.contracts[conid], full=False)


    def _mark(self, c: SimContract) -> float:
        """The mark IB's portfolio updates carry: the quote's base price."""
        if c.sec_type == "OPT":
            under = self.config.contracts.get(c.under_conid)
            und_price = _base_price(under.conid) if under else 100.0
            return max(0.05, round(abs(und_price - c.strike) * 0.5 + 2.0, 2))
        return _base_price(c.conid)


def _base_price(conid: int) -> float:
    return 20.0 + (conid * 7919) % 400 + (conid % 100) / 100.0
