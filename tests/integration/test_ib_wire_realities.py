"""What a real TWS sends that the simulator's defaults do not, through the real IbActor and each client library.

Every test names the IB source it was written from (the official TWS API
client's decoder, IB's message table, ib_insync's / ib_async's own source),
makes the simulator send exactly that, and checks what the IB actor's
subscribers see. Nothing here is the simulator's invention.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pykka
import pytest

from actors.ib import IbActor
from actors.ib_client import CLIENTS, client_problem
from actors.messaging import ask
from events.ib import (
    Connect,
    ConnectionState,
    ConnectionStateChanged,
    IbError,
    IbErrorKind,
    IbStats,
    IbStatsReply,
    MarketUpdate,
    PositionsComplete,
    Snapshot,
    SnapshotResult,
    StreamEnded,
    Subscribe,
)
from tests.integration.conftest import fast_settings
from tests.simulator import SimConfig, SimContract, TwsSimulator, default_universe
from tests.support import Inbox, wait_until

Start = Callable[..., tuple[pykka.ActorRef[Any], Inbox]]
CALL, PUT = 900001, 900002
STOCK = 1001
#: A future the account does not hold: its contract is not known from the positions, so it is resolved by conid.
FUT = 5001
REQ_CONTRACT_DETAILS = 9


@pytest.fixture
def sim_config() -> SimConfig:
    config = default_universe(n_stocks=20, n_option_strikes=2)
    config.contracts[FUT] = SimContract(
        conid=FUT,
        symbol="ES",
        sec_type="FUT",
        expiry="20261218",
        multiplier="50",
        exchange="CME",
        primary_exchange="",
        local_symbol="ESZ6",
        trading_class="ES",
    )
    return config


@pytest.fixture(params=list(CLIENTS))
def client(request: pytest.FixtureRequest) -> str:
    """Each test runs through ib_insync and ib_async (skipped only where ib_async is not installed)."""
    if (problem := client_problem(request.param)) is not None:
        pytest.skip(problem)
    return str(request.param)


def snapshot_of(ref: pykka.ActorRef[Any], conid: int) -> MarketUpdate:
    result = ask(ref, Snapshot(conids=[conid], timeout_s=5.0), timeout=10)
    assert isinstance(result, SnapshotResult)
    assert not result.failures, result.failures
    [update] = result.updates
    return update


# ------------------------------------------------------------ option greeks


def test_greeks_ib_did_not_compute_are_none_not_minus_two(connect_ib: Start, sim: TwsSimulator, client: str) -> None:
    """IB's "not computed" markers in tickOptionComputation are no values, never greeks.

    IB sends -1 for an impliedVol / optPrice / pvDividend / undPrice and -2 for
    a delta / gamma / vega / theta it could not compute (e.g. no underlying
    price). The official client's decoder turns them into "unset" (ibapi
    ``decoder.py`` ``processTickOptionComputationMsg``: ``if impliedVol < 0:
    # -1 is the "not computed" indicator``, ``if delta == -2: # -2 is the "not
    computed" indicator``, the same for gamma, vega, theta). ib_insync 0.9.86
    (``wrapper.py`` ``tickOptionComputation``: ``vega if vega != -2 else vega``,
    theta alike) and ib_async 2.1 keep vega and theta at -2, so the IB actor
    must not trust the library for them.
    """
    sim.configure(model_greeks={CALL: (-1.0, -2.0, -1.0, -1.0, -2.0, -2.0, -2.0, -1.0)})
    ref, _ = connect_ib(client=client)
    update = snapshot_of(ref, CALL)
    assert update.bid is not None  # the prices are there; only the model had nothing
    greeks = (update.iv, update.delta, update.gamma, update.vega, update.theta, update.und_price)
    assert greeks == (None, None, None, None, None, None)


def test_a_delta_of_minus_one_is_a_delta(connect_ib: Start, sim: TwsSimulator, client: str) -> None:
    """-1 is a deep in-the-money put's delta, not a "no value" marker: IB's marker for delta is -2.

    (ibapi ``decoder.py`` ``processTickOptionComputationMsg``: only ``delta ==
    -2`` is "not computed"; ib_insync's ``wrapper.py`` ``tickOptionComputation``
    likewise maps only -2 to None.) A zero gamma and vega are values too.
    """
    sim.configure(model_greeks={PUT: (0.31, -1.0, 12.4, 0.0, 0.0, 0.0, -0.01, 88.0)})
    ref, _ = connect_ib(client=client)
    update = snapshot_of(ref, PUT)
    assert (update.iv, update.delta, update.gamma, update.vega, update.theta) == (0.31, -1.0, 0.0, 0.0, -0.01)
    assert update.und_price == 88.0


# ------------------------------------------------------------- snapshots


@pytest.mark.parametrize("no_data_price", [-1.0, 0.0])
def test_a_snapshot_still_incomplete_at_the_timeout_answers_what_ib_sent(
    connect_ib: Start, sim: TwsSimulator, client: str, no_data_price: float
) -> None:
    """A contract nobody quotes gets the same answer at our deadline as at IB's tickSnapshotEnd: what IB sent.

    IB's snapshot sends "the currently available market data once before a
    tickSnapshotEnd event is sent 11 seconds later ... in some cases values
    may not be returned for all tick types" (``tws-api/md_request.html``):
    an illiquid contract gets -1 bid and ask, no last, only the close, and
    no complete quote ever. The IB actor's own deadline
    (``ib.snapshot_timeout_s``, 11 s, counted from before the request left
    the pacer) comes no later than IB's end, so answering TIMEOUT there
    turned every such contract into a failed attempt, and after
    ``max_attempts`` into a dead letter. IB's end is set after the deadline
    here, as it is in production.

    IB's "no data" is -1 or 0 with a size of 0 (``EWrapper::tickPrice``: "A
    tickPrice value of -1 or 0 followed by a tickSize of 0 indicates there is
    no data for this field currently available"): a last of 0 is no trade,
    not a complete quote at 0 answered as fresh.
    """
    sim.configure(illiquid={STOCK}, snapshot_end_delay_s=5.0, no_data_price=no_data_price)
    ref, _ = connect_ib(client=client)
    result = ask(ref, Snapshot(conids=[STOCK], timeout_s=0.5), timeout=10)
    assert isinstance(result, SnapshotResult)
    assert not result.failures, result.failures
    [update] = result.updates
    assert (update.bid, update.ask, update.last) == (None, None, None)
    assert update.close is not None
    reply = ask(ref, IbStats())
    assert isinstance(reply, IbStatsReply)
    assert reply.snapshots_in_flight == 0  # cancelled at IB before the answer left


# ------------------------------------------------------------------ quotes


def test_a_bid_whose_size_went_to_zero_is_no_bid(connect_ib: Start, sim: TwsSimulator, client: str) -> None:
    """A bid or ask of size 0 is an empty side, not a quote: the stale price must not be published as the bid.

    IB ends a side with a size of 0. ib_insync 0.9.86 keeps the last bid
    price in the Ticker then (``wrapper.py`` ``tickSize`` only sets
    ``bidSize``) and its own ``Ticker.hasBidAsk`` counts a bid only with
    ``bidSize > 0`` (``ticker.py``); ib_async 2.1 turns a side of size 0 into
    its empty price (``wrapper.py`` ``tickSize`` / ``priceSizeTick``:
    ``if size == 0: price = self.defaultEmptyPrice``, "Bid/Ask updates always
    have a Price+Size delivered at the same time").
    """
    ref, inbox = connect_ib(client=client)
    ref.tell(Subscribe(conid=STOCK))
    inbox.wait_for(lambda m: isinstance(m, MarketUpdate) and m.conid == STOCK and m.bid is not None)
    sim.configure(no_bid={STOCK})
    inbox.wait_for(lambda m: isinstance(m, MarketUpdate) and m.conid == STOCK and m.bid is None)
    updates = [m for m in inbox.messages(MarketUpdate) if m.conid == STOCK]
    assert all(u.bid is None for u in updates if u.bid_size == 0)  # never a price on an empty side
    assert updates[-1].ask is not None


def test_part_of_the_data_not_subscribed_is_a_notice_not_a_refusal(
    connect_ib: Start, sim: TwsSimulator, client: str
) -> None:
    """10090 / 10091 say part of a request's data is missing while the rest flows: INFO, never NOT_SUBSCRIBED.

    IB's texts: 10090 "Part of requested market data is not subscribed.
    Subscription-independent ticks are still active", 10091 "Part of
    requested market data requires additional subscription for API ...
    Delayed market data is available" (``tws-api/message_codes.html``; IB's
    error-codes page for 10090: "other default ticks will be returned").
    NOT_SUBSCRIBED is the kind of a refusal (354, 10168: terminal, the
    contract dead-lettered); the audit must not record one for a stream that
    streams.
    """
    sim.configure(advisories={CALL: 10090, STOCK: 10091})
    ref, inbox = connect_ib(client=client)
    for conid in (CALL, STOCK):
        ref.tell(Subscribe(conid=conid))
        inbox.wait_for(lambda m, c=conid: isinstance(m, MarketUpdate) and m.conid == c and m.source == "stream")
    notices = inbox.wait_for_count(lambda m: isinstance(m, IbError) and m.code in (10090, 10091), count=2)
    assert {(n.code, n.conid, n.kind) for n in notices} == {
        (10090, CALL, IbErrorKind.INFO),
        (10091, STOCK, IbErrorKind.INFO),
    }
    assert not inbox.messages(StreamEnded)


# ------------------------------------------------------- contract details


def test_contract_details_ib_does_not_answer_are_not_no_contract(
    connect_ib: Start, sim: TwsSimulator, client: str
) -> None:
    """A reqContractDetails IB leaves unanswered is a timeout, never "no such contract" (which dead-letters).

    A market data request needs the exchange, so a conid the positions did
    not describe is resolved with reqContractDetails first. Its answer comes
    from the security definition farm (IB's message table: 2157 "Sec-def data
    farm connection is broken", 2158 "... is OK"), and ib_insync's
    ``reqContractDetailsAsync`` (``ib_insync/ib.py``) has no timeout of its
    own. Only IB's 200 ("No security definition has been found") or an empty
    answer means the contract does not exist.
    """
    ref, inbox = connect_ib(client=client, snapshot_timeout_s=0.3)
    sim.secdef_down()
    notice = inbox.wait_for(lambda m: isinstance(m, IbError) and m.code == 2157)
    assert notice.kind == IbErrorKind.INFO  # a farm's state, like 2103: not an unknown error
    result = ask(ref, Snapshot(conids=[FUT], timeout_s=5.0), timeout=10)
    assert isinstance(result, SnapshotResult)
    [failure] = result.failures
    assert (failure.conid, failure.kind) == (FUT, IbErrorKind.TIMEOUT)
    sim.secdef_ok()
    assert snapshot_of(ref, FUT).conid == FUT  # asked again, it resolves: nothing was remembered as missing


def test_a_stream_whose_contract_details_go_unanswered_starts_when_the_farm_is_back(
    connect_ib: Start, sim: TwsSimulator, client: str
) -> None:
    """A stream is not refused because the sec-def farm was down: the IB actor asks again, and streams once it answers.

    Same IB facts as above (2157/2158; no timeout in ``reqContractDetailsAsync``).
    Refusing it would make the router back off for a minute or more and
    record "no contract" for a contract that exists.
    """
    ref, inbox = connect_ib(client=client, snapshot_timeout_s=0.3, reissue_initial_s=0.2)
    sim.secdef_down()
    ref.tell(Subscribe(conid=FUT))
    wait_until(
        lambda: sim.stats().by_msg_id.get(REQ_CONTRACT_DETAILS, 0) >= 2,
        what="the unanswered contract details request to be asked again",
    )
    sim.secdef_ok()
    inbox.wait_for(lambda m: isinstance(m, MarketUpdate) and m.conid == FUT and m.source == "stream")
    assert not inbox.messages(StreamEnded)


# --------------------------------------------------------------- handshake


def test_a_gateway_too_old_for_the_client_says_so(sim: TwsSimulator, client: str) -> None:
    """A server below the client's minimum is named as the reason the connect failed, not as a bare timeout.

    A TWS / Gateway answers the handshake with its own version; ib_insync
    0.9.86 (``client.py``: ``if self._serverVersion < self.MinClientVersion``,
    157) and ib_async then report "TWS/gateway version must be >= 972" through
    ``Client.apiError`` only, and ``connectAsync`` fails later with a
    ``TimeoutError``. The operator must see the first, which says what to do.
    """
    sim.configure(server_version=151)  # older than ib_insync's and ib_async's MinClientVersion, 157
    inbox = Inbox.start()
    assert inbox.ref is not None
    ref = IbActor.start(fast_settings(sim.port, client=client, connect_timeout_s=0.5), [inbox.ref])
    ref.tell(Connect())
    failed = inbox.wait_for(
        lambda m: isinstance(m, ConnectionStateChanged) and m.state == ConnectionState.DISCONNECTED, timeout=10
    )
    assert "version must be" in failed.detail, failed.detail


@pytest.mark.parametrize("server_version", [157, 163, 176, 178])
def test_every_server_version_the_clients_accept_serves_quotes(
    connect_ib: Start, sim: TwsSimulator, client: str, server_version: int
) -> None:
    """A Gateway on another version than the simulator's 176 serves positions, contracts, snapshots and streams.

    The handshake settles on the highest version both sides know (ib_insync
    asks for 157..176, ib_async for 157..178: their ``client.py``
    ``MinClientVersion`` / ``MaxClientVersion``), and what the server sends
    is laid out for that version (below 164, contract details carry a message
    version and mdSizeMultiplier: ib_insync's ``decoder.py``
    ``contractDetails``). Nothing in the IB actor may depend on the version:
    the future is resolved through contract details at each version.
    """
    sim.configure(server_version=server_version)
    ref, inbox = connect_ib(client=client)
    inbox.wait_for(lambda m: isinstance(m, PositionsComplete))
    assert snapshot_of(ref, STOCK).bid is not None
    assert snapshot_of(ref, CALL).delta is not None
    assert snapshot_of(ref, FUT).bid is not None  # contract details by conid, laid out for the version
    ref.tell(Subscribe(conid=STOCK))
    inbox.wait_for(lambda m: isinstance(m, MarketUpdate) and m.conid == STOCK and m.source == "stream")
