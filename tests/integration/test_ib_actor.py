"""The real IbActor, through the real ib_insync client, against the TWS simulator.

Each test waits on messages, replies or the simulator's counters with
timeouts; nothing sleeps to synchronise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pykka
import pytest

from actors.ib import IbActor
from actors.messaging import ask, ask_async
from events.ib import (
    Connect,
    ConnectionState,
    ConnectionStateChanged,
    Disconnect,
    IbError,
    IbErrorKind,
    MarketUpdate,
    PositionChanged,
    PositionsComplete,
    Snapshot,
    SnapshotResult,
    StreamEnded,
    Subscribe,
    Unsubscribe,
)
from tests.integration.conftest import fast_settings, is_connected, stats
from tests.simulator import TwsSimulator
from tests.support import Inbox, wait_until

Start = Callable[..., tuple[pykka.ActorRef[Any], Inbox]]
STOCKS = list(range(1001, 1301))
CALL = 900001


def test_connect_reports_every_position(connect_ib: Start, sim: TwsSimulator) -> None:
    ref, inbox = connect_ib()
    positions = inbox.wait_for_count(lambda m: isinstance(m, PositionChanged), count=320)
    by_conid = {p.conid: p for p in positions}
    assert set(by_conid) == set(STOCKS) | set(range(900001, 900021))
    call = by_conid[CALL]
    assert (call.sec_type, call.right, call.strike, call.multiplier, call.expiry) == (
        "OPT",
        "C",
        100.0,
        100.0,
        "20260116",
    )
    assert call.position == -1.0
    assert by_conid[1001].account == "DU1234567"
    assert stats(ref).connected
    assert len(inbox.messages(PositionsComplete)) == 1  # ib_insync's positionEnd, seen through its wrapper


def test_stream_of_an_option_carries_greeks(connect_ib: Start) -> None:
    ref, inbox = connect_ib()
    ref.tell(Subscribe(conid=CALL))
    update = inbox.wait_for(
        lambda m: isinstance(m, MarketUpdate) and m.conid == CALL and m.delta is not None and m.bid and m.ask
    )
    assert update.source == "stream"
    assert update.bid is not None
    assert update.ask is not None
    assert update.gamma is not None
    assert update.iv is not None
    assert update.und_price is not None
    # Streaming goes on: several updates arrive.
    inbox.wait_for_count(lambda m: isinstance(m, MarketUpdate) and m.conid == CALL, count=3)
    assert stats(ref).streams == 1


def test_subscribe_twice_is_one_request(connect_ib: Start, sim: TwsSimulator) -> None:
    ref, inbox = connect_ib()
    ref.tell(Subscribe(conid=1001))
    ref.tell(Subscribe(conid=1001))
    inbox.wait_for(lambda m: isinstance(m, MarketUpdate) and m.conid == 1001)
    assert stats(ref).streams == 1
    assert sim.stats().by_msg_id.get(1) == 1


def test_snapshot_batch_of_50(connect_ib: Start, sim: TwsSimulator) -> None:
    ref, _ = connect_ib()
    conids = STOCKS[:50]
    result = ask(ref, Snapshot(conids=conids, timeout_s=5), timeout=10)
    assert isinstance(result, SnapshotResult)
    assert [u.conid for u in result.updates] == conids
    assert not result.failures
    assert all(u.source == "queue" and u.bid is not None and u.ask is not None for u in result.updates)
    wait_until(lambda: stats(ref).snapshots_in_flight == 0)  # IB ended them all: no line held
    assert sim.stats().max_in_window <= 50


def test_snapshot_of_an_option_waits_for_greeks(connect_ib: Start) -> None:
    ref, _ = connect_ib()
    result = ask(ref, Snapshot(conids=[CALL, CALL + 1], timeout_s=5))
    assert [u.conid for u in result.updates] == [CALL, CALL + 1]
    assert all(u.delta is not None for u in result.updates)
    assert result.updates[0].delta > 0 > result.updates[1].delta


def test_line_limit_answers_101_with_the_conid(connect_ib: Start, sim: TwsSimulator) -> None:
    sim.set_line_limit(3)
    ref, inbox = connect_ib()
    for conid in STOCKS[:4]:
        ref.tell(Subscribe(conid=conid))
    error = inbox.wait_for(lambda m: isinstance(m, IbError) and m.code == 101)
    assert error.kind == IbErrorKind.MAX_TICKERS
    assert error.conid == STOCKS[3]
    wait_until(lambda: stats(ref).streams == 3)
    assert stats(ref).lines_in_use == 3
    # Not counted as a stream, so a later Subscribe (after a line frees) is sent again.
    ref.tell(Unsubscribe(conid=STOCKS[0]))
    wait_until(lambda: sim.stats().streams == 2)
    ref.tell(Subscribe(conid=STOCKS[3]))
    inbox.wait_for(lambda m: isinstance(m, MarketUpdate) and m.conid == STOCKS[3])


def test_burst_of_500_requests_stays_within_pacing(connect_ib: Start, sim: TwsSimulator) -> None:
    sim.set_line_limit(1000)  # this test is about pacing, not lines
    ref, inbox = connect_ib(min_stream_age_s=0.05)
    inbox.wait_for_count(lambda m: isinstance(m, PositionChanged), count=320)  # contracts cached
    before = sim.stats().by_msg_id
    conids = STOCKS[:250]
    for conid in conids:
        ref.tell(Subscribe(conid=conid))
    for conid in conids:
        ref.tell(Unsubscribe(conid=conid))

    def all_arrived() -> bool:
        counts = sim.stats().by_msg_id
        return counts.get(1, 0) - before.get(1, 0) == 250 and counts.get(2, 0) - before.get(2, 0) == 250

    wait_until(all_arrived, timeout=30, interval=0.1)
    final = sim.stats()
    assert final.max_in_window <= 50
    assert final.pacing_violations == 0
    assert final.streams == 0
    assert not [m for m in inbox.messages(IbError) if m.code in (100, 300, 354)]
    inbox.wait_for_count(lambda m: isinstance(m, StreamEnded), count=250)
    assert sorted(m.conid for m in inbox.messages(StreamEnded)) == conids
    assert {m.reason for m in inbox.messages(StreamEnded)} == {"cancelled"}
    reply = stats(ref)
    assert reply.streams == 0
    assert reply.requests_queued == 0
    assert reply.peak_lines >= 1


def test_unsubscribe_waits_for_the_minimum_stream_age(connect_ib: Start, sim: TwsSimulator) -> None:
    ref, inbox = connect_ib(min_stream_age_s=0.3)
    inbox.wait_for_count(lambda m: isinstance(m, PositionChanged), count=320)
    started = time.monotonic()
    ref.tell(Subscribe(conid=1001))
    ref.tell(Unsubscribe(conid=1001))
    wait_until(lambda: sim.stats().by_msg_id.get(2, 0) == 1, timeout=5)
    assert time.monotonic() - started >= 0.3
    assert sim.stats().streams == 0


def test_drop_reconnects_and_tells_to_resubscribe(connect_ib: Start, sim: TwsSimulator) -> None:
    ref, inbox = connect_ib()
    ref.tell(Subscribe(conid=1001))
    inbox.wait_for(lambda m: isinstance(m, MarketUpdate) and m.conid == 1001)
    sim.drop_connections()
    inbox.wait_for(lambda m: isinstance(m, ConnectionStateChanged) and m.state == ConnectionState.DISCONNECTED)
    inbox.wait_for(is_connected(resubscribe=True), timeout=10)
    assert stats(ref).streams == 0  # the stream set was forgotten
    inbox.clear()
    ref.tell(Subscribe(conid=1001))  # resubmitted by the router: not a no-op
    inbox.wait_for(lambda m: isinstance(m, MarketUpdate) and m.conid == 1001)
    assert sim.stats().connections == 2


def test_snapshot_that_never_answers_times_out(connect_ib: Start, sim: TwsSimulator) -> None:
    ref, _ = connect_ib()
    sim.set_never_answer(1002)
    started = time.monotonic()
    result = ask(ref, Snapshot(conids=[1001, 1002], timeout_s=0.5))
    assert time.monotonic() - started < 3
    assert [u.conid for u in result.updates] == [1001]
    assert [(f.conid, f.kind) for f in result.failures] == [(1002, IbErrorKind.TIMEOUT)]
    wait_until(lambda: sim.stats().open_snapshots == 0)  # cancelled at IB
    assert stats(ref).snapshots_in_flight == 0


def test_1101_tells_to_resubscribe(connect_ib: Start, sim: TwsSimulator) -> None:
    ref, inbox = connect_ib()
    ref.tell(Subscribe(conid=1001))
    inbox.wait_for(lambda m: isinstance(m, MarketUpdate) and m.conid == 1001)
    sim.send_error(1101)
    changed = inbox.wait_for(lambda m: isinstance(m, ConnectionStateChanged) and m.resubscribe)
    assert changed.state == ConnectionState.RESTORED_DATA_LOST
    assert inbox.wait_for(lambda m: isinstance(m, IbError) and m.code == 1101).kind == IbErrorKind.RESTORED_DATA_LOST
    assert stats(ref).streams == 0
    requests_before = sim.stats().by_msg_id[1]
    ref.tell(Subscribe(conid=1001))
    wait_until(lambda: sim.stats().by_msg_id[1] == requests_before + 1)


def test_1100_and_1102_are_reported_with_the_socket_up(connect_ib: Start, sim: TwsSimulator) -> None:
    ref, inbox = connect_ib()
    sim.send_error(1100)
    lost = inbox.wait_for(
        lambda m: isinstance(m, ConnectionStateChanged) and m.state == ConnectionState.CONNECTIVITY_LOST
    )
    assert not lost.resubscribe
    assert stats(ref).connected
    sim.send_error(1102)
    kept = inbox.wait_for(
        lambda m: isinstance(m, ConnectionStateChanged) and m.state == ConnectionState.RESTORED_DATA_KEPT
    )
    assert not kept.resubscribe
    assert sim.stats().connections == 1
    # Farm status notes (2104/2106/2158) at connect were not emitted.
    assert not [m for m in inbox.messages(IbError) if m.code in (2104, 2106, 2158)]


def test_1100_while_connecting_is_not_hidden_by_the_connect(sim: TwsSimulator) -> None:
    """TWS cut off from IB as the client connects: no CONNECTED until IB is back, and then a full resubscribe.

    The 1100 arrives while ib_insync is still synchronising. Reporting CONNECTED when the connect completes
    would tell the worker that data flows: its snapshots would time out and count as failed attempts.
    """
    sim.configure(codes_at_connect=(1100,))
    inbox = Inbox.start()
    assert inbox.ref is not None
    ref = IbActor.start(fast_settings(sim.port), [inbox.ref])
    ref.tell(Connect())
    inbox.wait_for(lambda m: isinstance(m, PositionsComplete), timeout=10)  # the connect is complete
    wait_until(lambda: stats(ref).connected)
    states = [m.state for m in inbox.messages(ConnectionStateChanged)]
    assert states[-1] == ConnectionState.CONNECTIVITY_LOST, states
    assert ConnectionState.CONNECTED not in states, states
    assert stats(ref).state == ConnectionState.CONNECTIVITY_LOST
    result = ask(ref, Snapshot(conids=[1001], timeout_s=5))
    assert [(f.conid, f.kind, f.code) for f in result.failures] == [(1001, IbErrorKind.DATA_INTERRUPTED, 1100)]
    assert sim.stats().by_msg_id.get(1, 0) == 0  # no reqMktData: nothing asked of an IB that cannot answer
    sim.send_error(1102)
    # The session holds no stream yet: "data maintained" still means every stream must be asked for.
    back = inbox.wait_for(
        lambda m: isinstance(m, ConnectionStateChanged) and m.state == ConnectionState.RESTORED_DATA_KEPT
    )
    assert back.resubscribe
    assert ask(ref, Snapshot(conids=[1001], timeout_s=5)).updates[0].conid == 1001


def test_disconnect_fails_snapshots_in_flight(connect_ib: Start, sim: TwsSimulator) -> None:
    ref, inbox = connect_ib()
    sim.set_never_answer(1001)
    pending = ask_async(ref, Snapshot(conids=[1001], timeout_s=30))
    wait_until(lambda: sim.stats().open_snapshots == 1)
    ref.tell(Disconnect())
    result = pending.get(timeout=3)
    assert [(f.conid, f.kind) for f in result.failures] == [(1001, IbErrorKind.DISCONNECTED)]
    inbox.wait_for(lambda m: isinstance(m, ConnectionStateChanged) and m.state == ConnectionState.DISCONNECTED)


def test_commands_while_disconnected_answer_typed_failures(sim: TwsSimulator) -> None:
    inbox = Inbox.start()
    assert inbox.ref is not None
    ref = IbActor.start(fast_settings(sim.port), [inbox.ref])
    result = ask(ref, Snapshot(conids=[1001, 1002]), timeout=3)
    assert {f.kind for f in result.failures} == {IbErrorKind.DISCONNECTED}
    assert len(result.failures) == 2
    ref.tell(Subscribe(conid=1001))
    error = inbox.wait_for(lambda m: isinstance(m, IbError))
    assert (error.kind, error.conid) == (IbErrorKind.DISCONNECTED, 1001)
    assert not stats(ref).connected


def test_unknown_conid_is_no_contract(connect_ib: Start) -> None:
    ref, inbox = connect_ib()
    result = ask(ref, Snapshot(conids=[77]))
    assert [(f.conid, f.kind) for f in result.failures] == [(77, IbErrorKind.NO_CONTRACT)]
    ref.tell(Subscribe(conid=78))
    error = inbox.wait_for(lambda m: isinstance(m, IbError) and m.conid == 78)
    assert (error.code, error.kind) == (200, IbErrorKind.NO_CONTRACT)
    assert stats(ref).streams == 0


def test_stream_ended_waits_for_the_cancel_to_leave_the_pacer(connect_ib: Start, sim: TwsSimulator) -> None:
    """A cancel queued behind other requests is confirmed only once it has left the pacer for the socket."""
    ref, inbox = connect_ib(pacing_per_s=5)
    inbox.wait_for(lambda m: isinstance(m, PositionsComplete))  # contracts cached: requests go out as they are
    ref.tell(Subscribe(conid=1001))
    inbox.wait_for(lambda m: isinstance(m, MarketUpdate) and m.conid == 1001)
    started = time.monotonic()
    for conid in STOCKS[1:11]:
        ref.tell(Subscribe(conid=conid))  # 10 requests at 5/s: the cancel waits behind them
    ref.tell(Unsubscribe(conid=1001))
    end = inbox.wait_for(lambda m: isinstance(m, StreamEnded), timeout=10)
    assert (end.conid, end.reason) == (1001, "cancelled")
    assert time.monotonic() - started >= 1.0  # at least one full pacing window later
    assert stats(ref).requests_queued == 0  # the cancel was the last one queued: it had left
    wait_until(lambda: sim.stats().by_msg_id.get(2, 0) == 1)
    assert sim.stats().by_msg_id[1] == 11
    assert sim.stats().pacing_violations == 0


def test_resubscribe_during_a_pending_cancel_goes_out_after_it(connect_ib: Start, sim: TwsSimulator) -> None:
    sim.set_line_limit(1)
    ref, inbox = connect_ib(min_stream_age_s=0.2)
    inbox.wait_for(lambda m: isinstance(m, PositionsComplete))
    ref.tell(Subscribe(conid=1001))
    ref.tell(Unsubscribe(conid=1001))
    ref.tell(Subscribe(conid=1001))
    inbox.wait_for(lambda m: isinstance(m, StreamEnded) and m.conid == 1001)
    wait_until(lambda: sim.stats().by_msg_id.get(1, 0) == 2 and sim.stats().streams == 1)
    assert sim.stats().by_msg_id[2] == 1
    assert not inbox.messages(IbError)  # the new request came after the cancel: no 101 on the single line
    assert sim.stats().peak_lines == 1
    assert stats(ref).streams == 1


def test_1101_withdraws_pending_cancels_unconfirmed(connect_ib: Start, sim: TwsSimulator) -> None:
    ref, inbox = connect_ib(min_stream_age_s=0.5)
    inbox.wait_for(lambda m: isinstance(m, PositionsComplete))
    ref.tell(Subscribe(conid=1001))
    ref.tell(Unsubscribe(conid=1001))  # its cancel waits for the stream's age
    inbox.wait_for(lambda m: isinstance(m, MarketUpdate) and m.conid == 1001)
    sim.send_error(1101)
    inbox.wait_for(lambda m: isinstance(m, ConnectionStateChanged) and m.resubscribe)
    # 1002's cancel falls due after 1001's would have: once 1002 has ended, 1001's timer is past.
    ref.tell(Subscribe(conid=1002))
    ref.tell(Unsubscribe(conid=1002))
    inbox.wait_for(lambda m: isinstance(m, StreamEnded) and m.conid == 1002)
    assert [m.conid for m in inbox.messages(StreamEnded)] == [1002]  # 1001: lost to the 1101, never confirmed
    wait_until(lambda: sim.stats().by_msg_id.get(2, 0) == 1)  # only 1002's cancel went out
    assert not [m for m in inbox.messages(IbError) if m.code == 300]
    assert stats(ref).streams == 0


def test_reconnect_reports_positions_again(connect_ib: Start, sim: TwsSimulator) -> None:
    _, inbox = connect_ib()
    inbox.clear()
    sim.drop_connections()
    inbox.wait_for(is_connected(resubscribe=True), timeout=10)
    assert len(inbox.messages(PositionChanged)) == 320
    assert len(inbox.messages(PositionsComplete)) == 1
    assert sim.stats().by_msg_id[61] == 2  # reqPositions at each connect


# ------------------------------------------------------ IB's data realities (issue 11)
# The behaviours both IB actors share are in tests/contract/test_ib_realities.py; these are the real one's wire.

REQ_MARKET_DATA_TYPE = 59
CANCEL_MKT_DATA = 2


def test_market_data_type_is_requested_at_every_connect(connect_ib: Start, sim: TwsSimulator) -> None:
    ref, inbox = connect_ib(market_data_type=2)
    assert sim.stats().by_msg_id.get(REQ_MARKET_DATA_TYPE) == 1
    sim.drop_connections()
    inbox.wait_for(is_connected(resubscribe=True), timeout=10)
    assert sim.stats().by_msg_id.get(REQ_MARKET_DATA_TYPE) == 2
    sim.configure(market_closed=True)
    [update] = ask(ref, Snapshot(conids=[1001])).updates
    assert update.data_type == "frozen"  # the type asked for on the new session, before this request


def test_a_snapshot_is_cancelled_at_ib_at_its_first_quote(connect_ib: Start, sim: TwsSimulator) -> None:
    sim.configure(snapshot_end_delay_s=30.0)  # IB would hold the line for 30 s
    ref, _ = connect_ib()
    result = ask(ref, Snapshot(conids=[1001, 1002, 1003]))
    assert [u.conid for u in result.updates] == [1001, 1002, 1003]
    wait_until(lambda: sim.stats().open_snapshots == 0, what="the cancels to reach IB")
    assert sim.stats().by_msg_id.get(CANCEL_MKT_DATA) == 3


def test_a_cancel_that_crosses_the_snapshot_end_is_not_news(connect_ib: Start, sim: TwsSimulator) -> None:
    """IB ends a snapshot at once; our cancel, already on its way, earns a 300 that nobody needs to hear."""
    sim.configure(snapshot_end_delay_s=0.0)
    ref, inbox = connect_ib()
    for _ in range(10):  # until some of our cancels lost the race (IB's end came first at the client)
        result = ask(ref, Snapshot(conids=STOCKS[:10]))
        assert (len(result.updates), result.failures) == (10, [])
        if sim.stats().errors_by_code.get(300):
            break
    assert sim.stats().errors_by_code.get(300)
    ref.tell(Subscribe(conid=CALL))  # published after the 300s on the same path: a barrier for them
    inbox.wait_for(lambda m: isinstance(m, MarketUpdate) and m.conid == CALL)
    assert not [m for m in inbox.messages(IbError) if m.code == 300]


def test_1102_brings_back_streams_a_blip_killed(connect_ib: Start, sim: TwsSimulator) -> None:
    ref, inbox = connect_ib(reissue_initial_s=60.0)
    ref.tell(Subscribe(conid=1001))
    inbox.wait_for(lambda m: isinstance(m, MarketUpdate) and m.conid == 1001)
    sim.farm_blip(None)
    inbox.wait_for(lambda m: isinstance(m, IbError) and m.code == 10182 and m.conid == 1001)
    sim.farm_ok(announce=False)  # the data is back, said only by the 1102 below
    inbox.clear()
    sim.send_error(1102)
    inbox.wait_for(lambda m: isinstance(m, MarketUpdate) and m.conid == 1001 and m.source == "stream")
    assert stats(ref).streams == 1
    assert not inbox.messages(StreamEnded)


@pytest.mark.parametrize("answer", ["silent", "end"])
def test_a_snapshot_without_data_while_the_farm_is_down_is_interrupted_not_failed(
    connect_ib: Start, sim: TwsSimulator, answer: str
) -> None:
    """A TWS that, while its market data farm is down, holds snapshot requests or ends them without a quote.

    The missing quote is then the farm's, not the contract's: DATA_INTERRUPTED (back to the queue without an
    attempt, and the worker pauses), not TIMEOUT or NO_DATA (an attempt each, and after a few a dead letter).
    """
    sim.configure(farm_down_snapshots=answer)
    ref, inbox = connect_ib()
    sim.farm_blip(None)
    inbox.wait_for(lambda m: isinstance(m, IbError) and m.code == 2103)
    result = ask(ref, Snapshot(conids=[1001], timeout_s=0.3))
    assert [(f.conid, f.kind, f.code) for f in result.failures] == [(1001, IbErrorKind.DATA_INTERRUPTED, 2103)]
    sim.farm_ok()  # its 2104 reaches the actor before the answer to the next request
    assert ask(ref, Snapshot(conids=[1001], timeout_s=5)).updates[0].conid == 1001
    sim.set_never_answer(1002)
    result = ask(ref, Snapshot(conids=[1002], timeout_s=0.3))  # the farm is up: silence is the contract's now
    assert [(f.conid, f.kind) for f in result.failures] == [(1002, IbErrorKind.TIMEOUT)]


def test_a_snapshot_unanswered_while_tws_is_cut_off_from_the_data_server_is_interrupted(
    connect_ib: Start, sim: TwsSimulator
) -> None:
    """2110 "Connectivity between TWS and server is broken. It will be restored automatically": until a price
    comes through again (or 2104, 1101, 1102), a snapshot that gets none is the outage's, not the contract's."""
    ref, inbox = connect_ib()
    sim.set_never_answer(1001)
    sim.send_error(2110, "Connectivity between Trader Workstation and server is broken. It will be restored automatically.")
    inbox.wait_for(lambda m: isinstance(m, IbError) and m.code == 2110)
    result = ask(ref, Snapshot(conids=[1001], timeout_s=0.3))
    assert [(f.conid, f.kind, f.code) for f in result.failures] == [(1001, IbErrorKind.DATA_INTERRUPTED, 2110)]
    assert ask(ref, Snapshot(conids=[1002], timeout_s=5)).updates[0].conid == 1002  # a price: the link is back
    result = ask(ref, Snapshot(conids=[1001], timeout_s=0.3))
    assert [(f.conid, f.kind) for f in result.failures] == [(1001, IbErrorKind.TIMEOUT)]
    # the outage's end is published as a farm back (a 2104 after the price is not one): the worker lifts its holds
    inbox.wait_for(lambda m: isinstance(m, IbError) and m.code == 2104)


def test_a_snapshot_open_when_the_farm_goes_down_and_never_answered_is_interrupted(
    connect_ib: Start, sim: TwsSimulator
) -> None:
    """Asked before the 2103, held silently after it (and maybe past the 2104): still the farm's silence."""
    ref, inbox = connect_ib()
    sim.set_never_answer(1001)
    pending = ask_async(ref, Snapshot(conids=[1001], timeout_s=1.0))
    wait_until(lambda: sim.stats().open_snapshots == 1)
    sim.send_error(2103, "Market data farm connection is broken:usfarm")
    inbox.wait_for(lambda m: isinstance(m, IbError) and m.code == 2103)
    sim.send_error(2104, "Market data farm connection is OK:usfarm")  # back before the timeout
    result = pending.get(timeout=10)
    assert [(f.conid, f.kind, f.code) for f in result.failures] == [(1001, IbErrorKind.DATA_INTERRUPTED, 2103)]
    result = ask(ref, Snapshot(conids=[1001], timeout_s=0.3))  # asked with the farm up: the contract's silence
    assert [(f.conid, f.kind) for f in result.failures] == [(1001, IbErrorKind.TIMEOUT)]


def test_a_2108_for_the_farm_ends_its_outage_though_it_names_the_farm_after_a_period(
    connect_ib: Start, sim: TwsSimulator
) -> None:
    """IB's 2108 reads "... should be available upon demand.usfarm.nj" (the farm after a period, and farm names
    hold periods): it says the farm is usable, so a silent snapshot after it is the contract's own again."""
    ref, inbox = connect_ib()
    sim.set_never_answer(1001)
    sim.send_error(2103, "Market data farm connection is broken:usfarm.nj")
    inbox.wait_for(lambda m: isinstance(m, IbError) and m.code == 2103)
    result = ask(ref, Snapshot(conids=[1001], timeout_s=0.3))
    assert [(f.kind, f.code) for f in result.failures] == [(IbErrorKind.DATA_INTERRUPTED, 2103)]
    assert "usfarm.nj" in result.failures[0].message
    sim.send_error(2108, "Market data farm connection is inactive but should be available upon demand.usfarm.nj")
    sim.send_error(2103, "Market data farm connection is broken:eufarm")  # a marker: the 2108 came before it
    inbox.wait_for(lambda m: isinstance(m, IbError) and m.code == 2103 and "eufarm" in m.message)
    result = ask(ref, Snapshot(conids=[1001], timeout_s=0.3))
    assert [(f.kind, f.code) for f in result.failures] == [(IbErrorKind.DATA_INTERRUPTED, 2103)]
    assert "usfarm.nj" not in result.failures[0].message  # only eufarm is down now
    sim.send_error(2104, "Market data farm connection is OK:eufarm")
    assert ask(ref, Snapshot(conids=[1002], timeout_s=5)).updates  # 2104s are quiet: a request behind it
    result = ask(ref, Snapshot(conids=[1001], timeout_s=0.3))
    assert [(f.kind, f.code) for f in result.failures] == [(IbErrorKind.TIMEOUT, None)]
    # each note that ended an outage is published (the worker lifts its holds); those of the connect are not
    backs = [(m.code, m.message.rpartition(":")[2]) for m in inbox.messages(IbError) if m.code in (2104, 2108)]
    assert backs == [(2108, "Market data farm connection is inactive but should be available upon demand.usfarm.nj"), (2104, "eufarm")]


def test_1101_while_connecting_does_not_stall_the_connect(sim: TwsSimulator, caplog: pytest.LogCaptureFixture) -> None:
    """1101 asks for the account data again; during connectAsync's own synchronisation a second reqPositions
    would replace the request connectAsync waits for (ib_insync keys it 'positions'), and the connect would
    hang until its timeout. The account data is asked for again once the connect is complete, and no state
    that says data flows comes before the session is up."""
    sim.configure(codes_at_connect=(1101,))
    inbox = Inbox.start()
    assert inbox.ref is not None
    ref = IbActor.start(fast_settings(sim.port, connect_timeout_s=3.0), [inbox.ref])
    ref.tell(Connect())
    inbox.wait_for(is_connected(), timeout=20)
    assert not [r.getMessage() for r in caplog.records if "request timed out" in r.getMessage()]  # ib_insync's
    states = [m.state for m in inbox.messages(ConnectionStateChanged)]
    assert states == [ConnectionState.CONNECTING, ConnectionState.CONNECTED]
    wait_until(lambda: sim.stats().by_msg_id.get(61, 0) >= 2)  # reqPositions: connectAsync's, then ours
    wait_until(lambda: sim.stats().by_msg_id.get(6, 0) >= 2)  # reqAccountUpdates: the same
    assert sim.stats().connections == 1



def test_an_old_outage_with_prices_coming_through_no_longer_excuses_a_silent_contract(
    connect_ib: Start, sim: TwsSimulator
) -> None:
    """A farm reported broken long ago, while other contracts' prices come through, is not this contract's farm:
    its silence is its own again (TIMEOUT: an attempt, backing off to a dead letter), not an interruption that
    would put it back at the head of the queue at once, forever."""
    ref, inbox = connect_ib(outage_excuse_s=1.0)
    sim.set_never_answer(1001)
    open_at_outage = ask_async(ref, Snapshot(conids=[1001], timeout_s=3.0))
    wait_until(lambda: sim.stats().open_snapshots == 1)
    sim.send_error(2103, "Market data farm connection is broken:eufarm")  # usfarm still serves
    inbox.wait_for(lambda m: isinstance(m, IbError) and m.code == 2103)
    assert ask(ref, Snapshot(conids=[1002], timeout_s=5)).updates[0].conid == 1002  # a price all the same
    result = open_at_outage.get(timeout=10)  # 3 s after it was asked: the outage is older than 1 s now
    assert [(f.kind, f.code) for f in result.failures] == [(IbErrorKind.DATA_INTERRUPTED, 2103)]  # young outage
    result = ask(ref, Snapshot(conids=[1001], timeout_s=0.3))
    assert [(f.conid, f.kind) for f in result.failures] == [(1001, IbErrorKind.TIMEOUT)]
    # another farm goes down while eufarm still is: a young outage again, whose silence is excused
    sim.send_error(2103, "Market data farm connection is broken:usopt")
    inbox.wait_for(lambda m: isinstance(m, IbError) and m.code == 2103 and "usopt" in m.message)
    result = ask(ref, Snapshot(conids=[1001], timeout_s=0.3))
    assert [(f.conid, f.kind) for f in result.failures] == [(1001, IbErrorKind.DATA_INTERRUPTED)]
