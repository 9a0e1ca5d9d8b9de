"""IB's data realities (issue 11, point 4), asserted against the fake and the real actor on the simulator.

Each test names one behaviour the worker and the router rely on: a snapshot
frees its line when it answers, resets and farm blips interrupt (not fail)
snapshots, streams killed by a blip come back without the holder's help,
market data types and the closed market shape the quote, 321 is the rate
limit, and portfolio updates give every position a price without a line.
"""

from __future__ import annotations

import time
from typing import Any

import pykka
import pytest

from actors.messaging import ask, ask_async
from events.ib import (
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
    Unsubscribe,
)
from tests.contract.conftest import POSITION_CONIDS, STOCKS, IbHarness, Realities
from tests.support import wait_until


def stats(ref: pykka.ActorRef[Any]) -> IbStatsReply:
    reply = ask(ref, IbStats())
    assert isinstance(reply, IbStatsReply)
    return reply


def snapshot(ref: pykka.ActorRef[Any], *conids: int, timeout_s: float = 5.0) -> SnapshotResult:
    result = ask(ref, Snapshot(conids=list(conids), timeout_s=timeout_s), timeout=timeout_s + 5)
    assert isinstance(result, SnapshotResult)
    return result


def interrupted(conid: int) -> Any:
    return lambda m: isinstance(m, IbError) and m.code == 10182 and m.conid == conid


def stream_update(conid: int) -> Any:
    return lambda m: isinstance(m, MarketUpdate) and m.conid == conid and m.source == "stream"


def open_snapshot(ref: pykka.ActorRef[Any], conid: int) -> pykka.Future[Any]:
    """Send a snapshot that stays open (its quote is delayed) and wait until it holds its line."""
    future = ask_async(ref, Snapshot(conids=[conid], timeout_s=10))
    wait_until(lambda: stats(ref).snapshots_in_flight == 1, what="the snapshot to be open")
    return future


# ------------------------------------------------------- snapshots and lines


def test_a_snapshot_frees_its_line_when_it_answers(ib: IbHarness) -> None:
    """One line, snapshots one after another: IB ends each only 5 s later, so only a cancel frees the line."""
    ref, inbox = ib.start(1, realities=Realities(snapshot_end_delay_s=5.0))
    for conid in STOCKS[:3]:
        result = snapshot(ref, conid)
        assert [u.conid for u in result.updates] == [conid]
        reply = stats(ref)
        assert (reply.snapshots_in_flight, reply.lines_in_use) == (0, 0)
    assert not inbox.messages(IbError)  # no 101: each line was free at IB before the next request


def test_a_snapshot_past_the_line_limit_is_max_tickers(ib: IbHarness) -> None:
    ref, inbox = ib.start(1)
    ref.tell(Subscribe(conid=STOCKS[0]))
    inbox.wait_for(stream_update(STOCKS[0]))
    result = snapshot(ref, STOCKS[1])
    assert [(f.conid, f.kind, f.code) for f in result.failures] == [(STOCKS[1], IbErrorKind.MAX_TICKERS, 101)]


@pytest.mark.parametrize("code", [1100, 1101])
def test_a_reset_interrupts_open_snapshots(ib: IbHarness, code: int) -> None:
    ref, _ = ib.start(100, realities=Realities(snapshot_delay_s=5.0))
    future = open_snapshot(ref, STOCKS[0])
    ib.reset(ref, code)
    result = future.get(timeout=5)
    assert [(f.conid, f.kind, f.code) for f in result.failures] == [
        (STOCKS[0], IbErrorKind.DATA_INTERRUPTED, code)
    ]
    wait_until(lambda: stats(ref).snapshots_in_flight == 0, what="the interrupted snapshot's line to be free")


def test_snapshots_while_ib_is_unreachable_are_interrupted_at_once(ib: IbHarness) -> None:
    ref, inbox = ib.start(100)
    ib.reset(ref, 1100)
    inbox.wait_for(lambda m: isinstance(m, ConnectionStateChanged) and m.state == ConnectionState.CONNECTIVITY_LOST)
    result = snapshot(ref, STOCKS[0], timeout_s=30)  # not a 30 s timeout: an answer at once
    assert [(f.kind, f.code) for f in result.failures] == [(IbErrorKind.DATA_INTERRUPTED, 1100)]
    ib.reset(ref, 1102)
    inbox.wait_for(lambda m: isinstance(m, ConnectionStateChanged) and m.state == ConnectionState.RESTORED_DATA_KEPT)
    assert [u.conid for u in snapshot(ref, STOCKS[0]).updates] == [STOCKS[0]]


def test_a_farm_blip_interrupts_open_snapshots(ib: IbHarness) -> None:
    ref, _ = ib.start(100, realities=Realities(snapshot_delay_s=5.0))
    future = open_snapshot(ref, STOCKS[0])
    ib.farm_blip(ref, None)
    result = future.get(timeout=5)
    assert [(f.conid, f.kind, f.code) for f in result.failures] == [
        (STOCKS[0], IbErrorKind.DATA_INTERRUPTED, 10182)
    ]


# --------------------------------------------------------------- farm blips


def test_streams_killed_by_a_farm_blip_come_back_when_the_farm_does(ib: IbHarness) -> None:
    # a backoff far beyond the waits below: only the farm's "OK" can bring the streams back in time
    ref, inbox = ib.start(100, realities=Realities(reissue_initial_s=60.0))
    a, b = STOCKS[0], STOCKS[1]
    ref.tell(Subscribe(conid=a))
    ref.tell(Subscribe(conid=b))
    inbox.wait_for(stream_update(a))
    inbox.wait_for(stream_update(b))
    ib.farm_blip(ref, None)
    for conid in (a, b):
        assert inbox.wait_for(interrupted(conid)).kind == IbErrorKind.DATA_INTERRUPTED
    wait_until(lambda: stats(ref).streams == 0, what="the killed streams to hold no line")
    inbox.clear()
    ib.farm_ok(ref)
    inbox.wait_for(stream_update(a))
    inbox.wait_for(stream_update(b))
    wait_until(lambda: stats(ref).streams == 2, what="both streams to be back")
    assert not inbox.messages(StreamEnded)  # the holder keeps its lines: it is never told


def test_a_farm_that_stays_down_is_retried_with_backoff(ib: IbHarness) -> None:
    ref, inbox = ib.start(100, realities=Realities(reissue_initial_s=0.05))
    a = STOCKS[0]
    ref.tell(Subscribe(conid=a))
    inbox.wait_for(stream_update(a))
    started = time.monotonic()
    ib.farm_blip(ref, None)
    inbox.wait_for_count(interrupted(a), count=4)  # the blip, then three re-requests the farm refused
    # never a storm: the waits double, 0.05 + 0.1 + 0.2 s at least before the third re-request
    assert time.monotonic() - started >= 0.35
    assert not inbox.messages(StreamEnded)
    ib.farm_ok(ref)
    inbox.wait_for(stream_update(a))
    wait_until(lambda: stats(ref).streams == 1, what="the stream to be back")


def test_a_stream_requested_while_the_farm_is_down_starts_when_it_is_back(ib: IbHarness) -> None:
    ref, inbox = ib.start(100, realities=Realities(reissue_initial_s=60.0))
    ib.farm_blip(ref, None)
    ref.tell(Subscribe(conid=STOCKS[2]))
    inbox.wait_for(interrupted(STOCKS[2]))
    ib.farm_ok(ref)
    inbox.wait_for(stream_update(STOCKS[2]))
    assert not inbox.messages(StreamEnded)


def test_unsubscribing_an_interrupted_stream_ends_it_for_good(ib: IbHarness) -> None:
    # dead at IB since the blip: ended at once, not after the minimum stream age a cancel would wait for
    ref, inbox = ib.start(100, min_stream_age_s=30.0, realities=Realities(reissue_initial_s=60.0))
    a, b = STOCKS[0], STOCKS[1]
    ref.tell(Subscribe(conid=a))
    ref.tell(Subscribe(conid=b))
    inbox.wait_for(stream_update(a))
    inbox.wait_for(stream_update(b))
    ib.farm_blip(ref, None)
    inbox.wait_for(interrupted(a))
    inbox.wait_for(interrupted(b))
    ref.tell(Unsubscribe(conid=a))
    end = inbox.wait_for(lambda m: isinstance(m, StreamEnded) and m.conid == a)
    assert end.reason == "cancelled"
    inbox.clear()
    ib.farm_ok(ref)
    inbox.wait_for_count(stream_update(b), count=3)  # b is back and ticking; a stays gone
    assert not [m for m in inbox.messages() if stream_update(a)(m)]
    assert stats(ref).streams == 1


# ------------------------------------------------------- market data types


def test_the_default_type_gives_live_data_where_subscribed(ib: IbHarness) -> None:
    ref, _ = ib.start(100)
    [update] = snapshot(ref, STOCKS[0]).updates
    assert update.data_type == "live"
    assert update.bid is not None


@pytest.mark.parametrize("market_data_type", [1, 2])
def test_an_unsubscribed_contract_without_delayed_data_type_is_not_subscribed(
    ib: IbHarness, market_data_type: int
) -> None:
    ref, inbox = ib.start(100, realities=Realities(market_data_type=market_data_type, unsubscribed=[STOCKS[3]]))
    result = snapshot(ref, STOCKS[3])
    assert [(f.kind, f.code) for f in result.failures] == [(IbErrorKind.NOT_SUBSCRIBED, 354)]
    ref.tell(Subscribe(conid=STOCKS[3]))
    end = inbox.wait_for(lambda m: isinstance(m, StreamEnded) and m.conid == STOCKS[3])
    assert (end.reason, end.code) == ("refused", 354)


@pytest.mark.parametrize("market_data_type", [3, 4])
def test_an_unsubscribed_contract_gets_delayed_data(ib: IbHarness, market_data_type: int) -> None:
    ref, inbox = ib.start(100, realities=Realities(market_data_type=market_data_type, unsubscribed=[STOCKS[3]]))
    [update] = snapshot(ref, STOCKS[3]).updates
    assert (update.data_type, update.source) == ("delayed", "queue")
    assert update.bid is not None
    assert update.ask is not None
    ref.tell(Subscribe(conid=STOCKS[3]))
    streamed = inbox.wait_for(lambda m: stream_update(STOCKS[3])(m) and m.bid is not None)
    assert streamed.data_type == "delayed"
    assert not inbox.messages(IbError)  # 10167 is advisory, not news


def test_no_delayed_data_either_is_not_subscribed(ib: IbHarness) -> None:
    ref, _ = ib.start(100, realities=Realities(refused={STOCKS[4]: 10168}))
    result = snapshot(ref, STOCKS[4])
    assert [(f.kind, f.code) for f in result.failures] == [(IbErrorKind.NOT_SUBSCRIBED, 10168)]


def test_a_competing_session_refuses_snapshots_and_streams(ib: IbHarness) -> None:
    """10197: another login of the account took the data; not this contract's fault."""
    ref, inbox = ib.start(100, realities=Realities(refused={STOCKS[5]: 10197}))
    result = snapshot(ref, STOCKS[5])
    assert [(f.kind, f.code) for f in result.failures] == [(IbErrorKind.COMPETING_SESSION, 10197)]
    ref.tell(Subscribe(conid=STOCKS[5]))
    end = inbox.wait_for(lambda m: isinstance(m, StreamEnded) and m.conid == STOCKS[5])
    assert (end.reason, end.code) == ("refused", 10197)
    assert stats(ref).lines_in_use == 0


def test_closed_market_live_bid_and_ask_are_no_quote(ib: IbHarness) -> None:
    ref, inbox = ib.start(100, realities=Realities(market_data_type=1, market_closed=True))
    [update] = snapshot(ref, STOCKS[0]).updates
    assert (update.bid, update.ask, update.data_type) == (None, None, "live")
    assert update.last is not None
    ref.tell(Subscribe(conid=STOCKS[0]))
    streamed = inbox.wait_for(lambda m: stream_update(STOCKS[0])(m) and m.last is not None)
    assert (streamed.bid, streamed.ask) == (None, None)


@pytest.mark.parametrize("market_data_type", [2, 4])
def test_closed_market_frozen_types_give_the_last_values(ib: IbHarness, market_data_type: int) -> None:
    ref, _ = ib.start(100, realities=Realities(market_data_type=market_data_type, market_closed=True))
    [update] = snapshot(ref, STOCKS[0]).updates
    assert update.data_type == "frozen"
    assert update.bid is not None
    assert update.ask is not None


# ---------------------------------------------------------------- rate limit


def test_snapshots_past_the_rate_limit_are_rate_limited(ib: IbHarness) -> None:
    ref, inbox = ib.start(100, realities=Realities(snapshot_rate_limit=3, snapshot_rate_window_s=60.0))
    result = snapshot(ref, *STOCKS[:5])
    assert [u.conid for u in result.updates] == STOCKS[:3]
    assert [(f.conid, f.kind, f.code) for f in result.failures] == [
        (conid, IbErrorKind.SNAPSHOT_RATE_LIMITED, 321) for conid in STOCKS[3:5]
    ]
    errors = inbox.wait_for_count(lambda m: isinstance(m, IbError) and m.code == 321, count=2)
    assert {e.kind for e in errors} == {IbErrorKind.SNAPSHOT_RATE_LIMITED}


# ----------------------------------------------------------------- portfolio


def test_portfolio_updates_price_every_position_without_a_line(ib: IbHarness) -> None:
    ref, inbox = ib.start(100, realities=Realities(portfolio_interval_s=0.2))

    def portfolio(m: Any) -> bool:
        return isinstance(m, MarketUpdate) and m.source == "portfolio"

    first = inbox.wait_for_count(portfolio, count=len(POSITION_CONIDS))
    assert {u.conid for u in first} == POSITION_CONIDS
    assert all(u.last is not None and u.last > 0 for u in first)
    assert all(u.data_type == "live" for u in first)
    inbox.wait_for_count(portfolio, count=2 * len(POSITION_CONIDS))  # and again at IB's cadence
    assert stats(ref).lines_in_use == 0


def test_reset_1101_keeps_its_resubscribe_path(ib: IbHarness) -> None:
    """1101 is not a farm blip: the holder resubmits (resubscribe=True), the actor re-requests nothing itself."""
    ref, inbox = ib.start(100)
    ref.tell(Subscribe(conid=STOCKS[0]))
    inbox.wait_for(stream_update(STOCKS[0]))
    ib.reset(ref, 1101)
    back = inbox.wait_for(lambda m: isinstance(m, ConnectionStateChanged) and m.resubscribe)
    assert back.state == ConnectionState.RESTORED_DATA_LOST
    wait_until(lambda: stats(ref).streams == 0, what="the streams IB dropped to be forgotten")
    assert not inbox.messages(StreamEnded)


def test_portfolio_updates_come_back_after_1101(ib: IbHarness) -> None:
    """1101 loses the account subscription too, so the IB actor resubmits it: the portfolio floor never stops.

    IB's text for 1101 is "Connectivity between IB and TWS has been restored -
    data lost. Market and account data subscription requests must be
    resubmitted" (the TWS API's message table, ``tws-api/message_codes.html``,
    and the C++ client's ``EClientErrors``); ib_insync resubmits nothing
    (``ib_insync/wrapper.py`` ``error`` only logs and emits). The router
    resubmits the streams; the account updates (reqAccountUpdates, the
    line-free portfolio marks) are the IB actor's own. Two whole rounds after
    the 1101: at most one round sent before it can still be on its way.
    """
    ref, inbox = ib.start(100, realities=Realities(portfolio_interval_s=0.2))

    def portfolio(m: Any) -> bool:
        return isinstance(m, MarketUpdate) and m.source == "portfolio"

    inbox.wait_for(portfolio)
    assert len(inbox.messages(PositionsComplete)) == 1  # the connect's
    ib.reset(ref, 1101)
    # the positions are asked for again too (counted, not cleared: they may come before the state change is seen)
    inbox.wait_for_count(lambda m: isinstance(m, PositionsComplete), count=2)
    inbox.wait_for(lambda m: isinstance(m, ConnectionStateChanged) and m.resubscribe)
    inbox.clear()
    after = inbox.wait_for_count(portfolio, count=2 * len(POSITION_CONIDS))
    assert {u.conid for u in after} == POSITION_CONIDS
