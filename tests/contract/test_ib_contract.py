"""One behaviour contract for the IB actor, run against the fake and the real one (on the simulator).

Whatever the router, the worker or the demo rely on is asserted here, so the
fake cannot drift from the real actor.
"""

from __future__ import annotations

from typing import Any

import pykka

from actors.messaging import ask
from events.ib import (
    ConnectionState,
    ConnectionStateChanged,
    Disconnect,
    IbError,
    IbErrorKind,
    IbStats,
    IbStatsReply,
    MarketUpdate,
    Snapshot,
    SnapshotResult,
    Subscribe,
    Unsubscribe,
)
from tests.contract.conftest import CALL, STOCKS, UNKNOWN, IbHarness
from tests.support import wait_until


def stats(ref: pykka.ActorRef[Any]) -> IbStatsReply:
    reply = ask(ref, IbStats())
    assert isinstance(reply, IbStatsReply)
    return reply


def test_subscribe_streams_updates(ib: IbHarness) -> None:
    ref, inbox = ib.start(100)
    ref.tell(Subscribe(conid=STOCKS[0]))
    ref.tell(Subscribe(conid=CALL))
    stock = inbox.wait_for_count(lambda m: isinstance(m, MarketUpdate) and m.conid == STOCKS[0], count=2)
    assert all(u.source == "stream" for u in stock)
    # A stream's first updates may be partial (ticks arrive one by one); a full quote follows.
    inbox.wait_for(lambda m: isinstance(m, MarketUpdate) and m.conid == STOCKS[0] and m.bid and m.ask)
    option = inbox.wait_for(lambda m: isinstance(m, MarketUpdate) and m.conid == CALL and m.delta is not None)
    assert option.source == "stream"
    ref.tell(Subscribe(conid=STOCKS[0]))  # already streaming: no-op
    assert stats(ref).streams == 2


def test_snapshot_of_n_returns_n_answers(ib: IbHarness) -> None:
    ref, _ = ib.start(100)
    conids = [*STOCKS[:20], CALL]
    result = ask(ref, Snapshot(conids=conids, timeout_s=5), timeout=10)
    assert isinstance(result, SnapshotResult)
    assert [u.conid for u in result.updates] == conids
    assert not result.failures
    assert all(u.source == "queue" for u in result.updates)
    assert result.updates[-1].delta is not None


def test_101_past_the_line_limit(ib: IbHarness) -> None:
    ref, inbox = ib.start(2)
    for conid in STOCKS[:3]:
        ref.tell(Subscribe(conid=conid))
    error = inbox.wait_for(lambda m: isinstance(m, IbError) and m.code == 101)
    assert (error.kind, error.conid) == (IbErrorKind.MAX_TICKERS, STOCKS[2])
    wait_until(lambda: stats(ref).streams == 2)
    assert stats(ref).lines_in_use == 2


def test_unknown_conid_is_a_typed_failure(ib: IbHarness) -> None:
    ref, inbox = ib.start(100)
    result = ask(ref, Snapshot(conids=[STOCKS[0], UNKNOWN], timeout_s=5))
    assert [u.conid for u in result.updates] == [STOCKS[0]]
    assert [(f.conid, f.kind) for f in result.failures] == [(UNKNOWN, IbErrorKind.NO_CONTRACT)]
    ref.tell(Subscribe(conid=UNKNOWN + 1))
    error = inbox.wait_for(lambda m: isinstance(m, IbError) and m.conid == UNKNOWN + 1)
    assert error.kind == IbErrorKind.NO_CONTRACT


def test_disconnect_signals_resubscribe(ib: IbHarness) -> None:
    ref, inbox = ib.start(100)
    ref.tell(Subscribe(conid=STOCKS[0]))
    inbox.wait_for(lambda m: isinstance(m, MarketUpdate))
    ib.drop(ref)
    inbox.wait_for(lambda m: isinstance(m, ConnectionStateChanged) and m.state == ConnectionState.DISCONNECTED)
    back = inbox.wait_for(lambda m: isinstance(m, ConnectionStateChanged) and m.resubscribe, timeout=10)
    assert back.state == ConnectionState.CONNECTED
    assert stats(ref).streams == 0
    inbox.clear()
    ref.tell(Subscribe(conid=STOCKS[0]))
    inbox.wait_for(lambda m: isinstance(m, MarketUpdate) and m.conid == STOCKS[0])


def test_stats_counters(ib: IbHarness) -> None:
    ref, inbox = ib.start(100)
    ref.tell(Subscribe(conid=STOCKS[0]))
    ref.tell(Subscribe(conid=STOCKS[1]))
    inbox.wait_for_count(lambda m: isinstance(m, MarketUpdate) and m.conid in STOCKS[:2], count=2)
    wait_until(lambda: stats(ref).streams == 2)
    ref.tell(Unsubscribe(conid=STOCKS[0]))
    wait_until(lambda: stats(ref).streams == 1)
    reply = stats(ref)
    assert reply.connected
    assert reply.state == ConnectionState.CONNECTED
    assert reply.lines_in_use == 1
    assert reply.peak_lines >= 2
    assert reply.requests_sent >= 3
    assert reply.snapshots_in_flight == 0


def test_disconnected_commands_answer_typed_failures(ib: IbHarness) -> None:
    ref, inbox = ib.start(100)
    ref.tell(Disconnect())
    inbox.wait_for(lambda m: isinstance(m, ConnectionStateChanged) and m.state == ConnectionState.DISCONNECTED)
    result = ask(ref, Snapshot(conids=STOCKS[:2]))
    assert [f.kind for f in result.failures] == [IbErrorKind.DISCONNECTED] * 2
    ref.tell(Subscribe(conid=STOCKS[0]))
    error = inbox.wait_for(lambda m: isinstance(m, IbError))
    assert (error.kind, error.conid) == (IbErrorKind.DISCONNECTED, STOCKS[0])
    assert not stats(ref).connected
