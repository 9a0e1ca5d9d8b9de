"""One behaviour contract for the IB actor, run against the fake and the real one (on the simulator).

Whatever the router, the worker or the demo rely on is asserted here, so the
fake cannot drift from the real actor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
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
    PositionChanged,
    PositionsComplete,
    RequestPositions,
    Snapshot,
    SnapshotResult,
    StreamEnded,
    Subscribe,
    Unsubscribe,
)
from tests.contract.conftest import CALL, POSITION_CONIDS, STOCKS, UNKNOWN, IbHarness
from tests.support import Inbox, wait_until

Predicate = Callable[[Any], bool]


def stats(ref: pykka.ActorRef[Any]) -> IbStatsReply:
    reply = ask(ref, IbStats())
    assert isinstance(reply, IbStatsReply)
    return reply


def ended(conid: int) -> Predicate:
    return lambda m: isinstance(m, StreamEnded) and m.conid == conid


def update_of(conid: int) -> Predicate:
    return lambda m: isinstance(m, MarketUpdate) and m.conid == conid


def index(inbox: Inbox, predicate: Predicate, start: int = 0) -> int:
    """Position of the first message at or after ``start`` matching ``predicate`` in arrival order."""
    messages = inbox.messages()
    return next(i for i in range(start, len(messages)) if predicate(messages[i]))


def wait_after(inbox: Inbox, position: int, predicate: Predicate, count: int = 1, timeout: float = 5.0) -> None:
    """Wait for ``count`` messages matching ``predicate`` that arrived after ``position``."""
    before = sum(1 for m in inbox.messages()[: position + 1] if predicate(m))
    inbox.wait_for_count(predicate, before + count, timeout=timeout)


def connected(m: Any) -> bool:
    return isinstance(m, ConnectionStateChanged) and m.state == ConnectionState.CONNECTED


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
    end = inbox.wait_for(ended(STOCKS[2]))
    assert (end.reason, end.code) == ("refused", 101)
    assert index(inbox, lambda m: m is error) < index(inbox, lambda m: m is end)
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
    end = inbox.wait_for(ended(UNKNOWN + 1))
    assert (end.reason, end.code) == ("refused", 200)
    assert index(inbox, lambda m: m is error) < index(inbox, lambda m: m is end)


def test_disconnect_signals_resubscribe(ib: IbHarness) -> None:
    ref, inbox = ib.start(100)
    ref.tell(Subscribe(conid=STOCKS[0]))
    inbox.wait_for(lambda m: isinstance(m, MarketUpdate))
    ib.drop(ref)
    inbox.wait_for(lambda m: isinstance(m, ConnectionStateChanged) and m.state == ConnectionState.DISCONNECTED)
    back = inbox.wait_for(lambda m: isinstance(m, ConnectionStateChanged) and m.resubscribe, timeout=10)
    assert back.state == ConnectionState.CONNECTED
    assert stats(ref).streams == 0
    assert not inbox.messages(StreamEnded)  # streams lost with the connection: the resubscribe covers them
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


# ----------------------------------------------------------------- positions


def test_connect_sends_every_position_then_complete_before_connected(ib: IbHarness) -> None:
    _, inbox = ib.start(100)
    messages = inbox.messages()
    done = index(inbox, lambda m: isinstance(m, PositionsComplete))
    assert {m.conid for m in messages[:done] if isinstance(m, PositionChanged)} == POSITION_CONIDS
    assert done < index(inbox, connected)
    assert len(inbox.messages(PositionsComplete)) == 1


def test_request_positions_sends_every_position_then_complete(ib: IbHarness) -> None:
    ref, inbox = ib.start(100)
    inbox.clear()
    ref.tell(RequestPositions())
    inbox.wait_for(lambda m: isinstance(m, PositionsComplete))
    done = index(inbox, lambda m: isinstance(m, PositionsComplete))
    assert {m.conid for m in inbox.messages()[:done] if isinstance(m, PositionChanged)} == POSITION_CONIDS


def test_reconnect_sends_every_position_again_then_complete(ib: IbHarness) -> None:
    ref, inbox = ib.start(100)
    inbox.clear()
    ib.drop(ref)
    inbox.wait_for(lambda m: connected(m) and m.resubscribe, timeout=10)
    down = index(inbox, lambda m: isinstance(m, ConnectionStateChanged) and m.state == ConnectionState.DISCONNECTED)
    done = index(inbox, lambda m: isinstance(m, PositionsComplete), start=down)
    up = index(inbox, lambda m: connected(m) and m.resubscribe)
    assert down < done < up
    fresh = {m.conid for m in inbox.messages()[down:done] if isinstance(m, PositionChanged)}
    assert fresh == POSITION_CONIDS


# --------------------------------------------------------------- StreamEnded


def test_unsubscribe_ends_the_stream_once_its_cancel_is_out(ib: IbHarness) -> None:
    ref, inbox = ib.start(100, min_stream_age_s=0.2)
    a, b = STOCKS[0], STOCKS[1]
    started = time.monotonic()
    ref.tell(Subscribe(conid=a))
    ref.tell(Subscribe(conid=b))
    inbox.wait_for(update_of(a))
    ref.tell(Unsubscribe(conid=a))
    end = inbox.wait_for(ended(a))
    assert time.monotonic() - started >= 0.2  # the cancel waited for the minimum stream age
    assert (end.reason, end.code) == ("cancelled", None)
    position = index(inbox, lambda m: m is end)
    wait_after(inbox, position, update_of(b), count=3)  # b streams on for several ticks ...
    assert not [m for m in inbox.messages()[position:] if update_of(a)(m)]  # ... a sends nothing more
    assert len(inbox.messages(StreamEnded)) == 1
    assert stats(ref).streams == 1


def test_unsubscribe_of_nothing_ends_at_once(ib: IbHarness) -> None:
    ref, inbox = ib.start(100)
    ref.tell(Unsubscribe(conid=STOCKS[5]))
    assert inbox.wait_for(ended(STOCKS[5])).reason == "cancelled"


def test_a_confirmed_line_is_free_at_ib(ib: IbHarness) -> None:
    """One line handed from stream to stream: each Subscribe goes out only after the previous StreamEnded."""
    ref, inbox = ib.start(1)
    for conid in STOCKS[:4]:
        ref.tell(Subscribe(conid=conid))
        inbox.wait_for(update_of(conid))
        ref.tell(Unsubscribe(conid=conid))
        assert inbox.wait_for(ended(conid)).reason == "cancelled"
    assert not inbox.messages(IbError)
    reply = stats(ref)
    assert (reply.streams, reply.lines_in_use, reply.peak_lines) == (0, 0, 1)


def test_subscribe_while_the_cancel_waits_streams_anew_after_it(ib: IbHarness) -> None:
    ref, inbox = ib.start(100, min_stream_age_s=0.3)
    a = STOCKS[0]
    started = time.monotonic()
    ref.tell(Subscribe(conid=a))
    ref.tell(Unsubscribe(conid=a))
    ref.tell(Subscribe(conid=a))  # does not revive the old stream: cancel first, then a new one
    end = inbox.wait_for(ended(a))
    assert time.monotonic() - started >= 0.3
    assert end.reason == "cancelled"
    wait_after(inbox, index(inbox, lambda m: m is end), update_of(a))
    assert stats(ref).streams == 1


def test_unsubscribe_twice_while_the_cancel_waits_ends_once(ib: IbHarness) -> None:
    ref, inbox = ib.start(100, min_stream_age_s=0.2)
    a, b = STOCKS[0], STOCKS[1]
    ref.tell(Subscribe(conid=a))
    ref.tell(Unsubscribe(conid=a))
    ref.tell(Subscribe(conid=a))
    ref.tell(Unsubscribe(conid=a))  # withdraws the Subscribe; the pending cancel answers both Unsubscribes
    end = inbox.wait_for(ended(a))
    assert end.reason == "cancelled"
    # b's cancel is due after a's: once b has ended, anything still pending for a would have come.
    ref.tell(Subscribe(conid=b))
    ref.tell(Unsubscribe(conid=b))
    inbox.wait_for(ended(b))
    assert [m.conid for m in inbox.messages(StreamEnded)] == [a, b]
    assert not [m for m in inbox.messages()[index(inbox, lambda m: m is end) :] if update_of(a)(m)]
    assert stats(ref).streams == 0


def test_unsubscribe_while_disconnected_ends_at_once(ib: IbHarness) -> None:
    ref, inbox = ib.start(100)
    ref.tell(Subscribe(conid=STOCKS[0]))
    inbox.wait_for(update_of(STOCKS[0]))
    ref.tell(Disconnect())
    inbox.wait_for(lambda m: isinstance(m, ConnectionStateChanged) and m.state == ConnectionState.DISCONNECTED)
    assert not inbox.messages(StreamEnded)  # gone with the connection: not confirmed
    ref.tell(Unsubscribe(conid=STOCKS[0]))
    end = inbox.wait_for(ended(STOCKS[0]))
    assert (end.reason, end.code) == ("disconnected", None)
