"""The fake IB actor: line limit and 101, peak counters, injected disconnects, errors, latency, timeouts."""

from __future__ import annotations

import time
from typing import Any

import pykka
import pytest

from actors.fake_ib import (
    FakeIbActor,
    FakeIbSettings,
    InjectDisconnect,
    InjectError,
    InjectFarmBlip,
    PushTicks,
    SetMarketClosed,
    SetNeverAnswer,
    SetSnapshotLatency,
    demo_positions,
)
from actors.ib_base import AddSubscriber
from actors.messaging import ask, ask_async
from events.ib import (
    Connect,
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
    StreamEnded,
    Subscribe,
    Unsubscribe,
)
from tests.support import Inbox

POSITIONS = demo_positions(20, 4, seed=7)
STOCKS = [p.conid for p in POSITIONS if p.sec_type == "STK"]
OPTIONS = [p.conid for p in POSITIONS if p.sec_type == "OPT"]


def start(**settings: Any) -> tuple[pykka.ActorRef[Any], Inbox]:
    inbox = Inbox.start()
    assert inbox.ref is not None
    ref = FakeIbActor.start(FakeIbSettings(positions=POSITIONS, **settings), [inbox.ref])
    ref.tell(Connect())
    inbox.wait_for(lambda m: isinstance(m, ConnectionStateChanged) and m.state == ConnectionState.CONNECTED)
    return ref, inbox


def stats(ref: pykka.ActorRef[Any]) -> IbStatsReply:
    return ask(ref, IbStats())


def test_connect_publishes_positions() -> None:
    _, inbox = start()
    got = inbox.wait_for_count(lambda m: isinstance(m, PositionChanged), count=len(POSITIONS))
    assert got == POSITIONS
    kinds = [type(m) for m in inbox.messages()]
    # every position, then PositionsComplete, then CONNECTED (the real actor's order)
    assert kinds == [PositionChanged] * len(POSITIONS) + [PositionsComplete, ConnectionStateChanged]


def test_request_positions_and_reconnect_publish_positions_then_complete() -> None:
    ref, inbox = start()
    inbox.clear()
    ref.tell(RequestPositions())
    inbox.wait_for(lambda m: isinstance(m, PositionsComplete))
    assert inbox.messages() == [*POSITIONS, inbox.messages(PositionsComplete)[0]]
    inbox.clear()
    ref.tell(InjectDisconnect())
    inbox.wait_for(lambda m: isinstance(m, ConnectionStateChanged) and m.resubscribe)
    kinds = [type(m) for m in inbox.messages()]
    assert kinds == [
        ConnectionStateChanged,
        *[PositionChanged] * len(POSITIONS),
        PositionsComplete,
        ConnectionStateChanged,
    ]


def test_unsubscribe_without_a_minimum_age_ends_at_once() -> None:
    ref, inbox = start()
    ref.tell(Subscribe(conid=STOCKS[0]))
    ref.tell(Unsubscribe(conid=STOCKS[0]))
    assert stats(ref).lines_in_use == 0  # asked after the Unsubscribe: already processed
    end = inbox.wait_for(lambda m: isinstance(m, StreamEnded))
    assert (end.conid, end.reason) == (STOCKS[0], "cancelled")
    assert stats(ref).requests_sent == 2


def test_stream_endings_refused_and_lost() -> None:
    ref, inbox = start(errors={STOCKS[1]: 354})
    ref.tell(Subscribe(conid=STOCKS[1]))  # refused at once
    ref.tell(Subscribe(conid=STOCKS[0]))
    ref.tell(InjectError(code=10168, conid=STOCKS[0]))  # killed while streaming
    ref.tell(Subscribe(conid=STOCKS[2]))
    ref.tell(InjectError(code=1101))  # lost: no StreamEnded, the resubscribe covers it
    inbox.wait_for(lambda m: isinstance(m, ConnectionStateChanged) and m.resubscribe)
    messages = [m for m in inbox.messages() if isinstance(m, IbError | StreamEnded)]
    assert [(type(m).__name__, m.conid, m.code) for m in messages] == [
        ("IbError", STOCKS[1], 354),
        ("StreamEnded", STOCKS[1], 354),
        ("IbError", STOCKS[0], 10168),
        ("StreamEnded", STOCKS[0], 10168),
        ("IbError", None, 1101),
    ]
    assert {m.reason for m in inbox.messages(StreamEnded)} == {"refused"}


def test_demo_positions_are_deterministic_and_realistic() -> None:
    assert demo_positions(20, 4, seed=7) == POSITIONS
    options = [p for p in POSITIONS if p.sec_type == "OPT"]
    assert len(options) >= 4
    assert all(p.multiplier == 100.0 and p.right in ("C", "P") and p.strike > 0 for p in options)
    assert all(len(p.expiry) == 8 for p in options)
    assert len({p.conid for p in POSITIONS}) == len(POSITIONS)


def test_line_limit_answers_101_with_conid_and_peak_counts() -> None:
    ref, inbox = start(line_limit=3)
    for conid in STOCKS[:4]:
        ref.tell(Subscribe(conid=conid))
    error = inbox.wait_for(lambda m: isinstance(m, IbError))
    assert (error.code, error.kind, error.conid) == (101, IbErrorKind.MAX_TICKERS, STOCKS[3])
    reply = stats(ref)
    assert (reply.streams, reply.lines_in_use, reply.peak_lines) == (3, 3, 3)
    ref.tell(Unsubscribe(conid=STOCKS[0]))
    reply = stats(ref)
    assert (reply.lines_in_use, reply.peak_lines) == (2, 3)


def test_snapshots_in_flight_hold_lines() -> None:
    ref, _ = start(line_limit=3, snapshot_latency_s=0.2)
    ref.tell(Subscribe(conid=STOCKS[0]))
    pending = ask_async(ref, Snapshot(conids=STOCKS[1:4], timeout_s=2))
    reply = stats(ref)
    assert reply.snapshots_in_flight == 2
    assert reply.lines_in_use == 3
    result = pending.get(timeout=3)
    assert [u.conid for u in result.updates] == STOCKS[1:3]
    assert [(f.conid, f.kind) for f in result.failures] == [(STOCKS[3], IbErrorKind.MAX_TICKERS)]
    assert stats(ref).lines_in_use == 1


def test_streams_tick_on_demand_deterministically() -> None:
    ref, inbox = start()
    ref.tell(Subscribe(conid=OPTIONS[0]))
    ref.tell(Subscribe(conid=OPTIONS[0]))  # no-op
    ref.tell(PushTicks(n=3))
    updates = inbox.wait_for_count(lambda m: isinstance(m, MarketUpdate), count=4)
    assert all(u.source == "stream" and u.conid == OPTIONS[0] and u.delta is not None for u in updates)
    assert stats(ref).streams == 1


def test_streams_tick_on_a_timer() -> None:
    ref, inbox = start(tick_interval_s=0.01)
    ref.tell(Subscribe(conid=STOCKS[0]))
    inbox.wait_for_count(lambda m: isinstance(m, MarketUpdate), count=5)


def test_injected_disconnect_forgets_streams_and_tells_resubscribe() -> None:
    ref, inbox = start()
    ref.tell(Subscribe(conid=STOCKS[0]))
    ref.tell(InjectDisconnect())
    inbox.wait_for(lambda m: isinstance(m, ConnectionStateChanged) and m.state == ConnectionState.DISCONNECTED)
    back = inbox.wait_for(lambda m: isinstance(m, ConnectionStateChanged) and m.resubscribe)
    assert back.state == ConnectionState.CONNECTED
    assert stats(ref).streams == 0
    inbox.clear()
    ref.tell(Subscribe(conid=STOCKS[0]))
    inbox.wait_for(lambda m: isinstance(m, MarketUpdate))


def test_injected_errors_per_conid_and_1101() -> None:
    ref, inbox = start(errors={STOCKS[1]: 354})
    ref.tell(Subscribe(conid=STOCKS[1]))
    error = inbox.wait_for(lambda m: isinstance(m, IbError))
    assert (error.kind, error.conid) == (IbErrorKind.NOT_SUBSCRIBED, STOCKS[1])
    ref.tell(Subscribe(conid=STOCKS[0]))
    ref.tell(InjectError(code=10089, conid=STOCKS[0]))
    inbox.wait_for(lambda m: isinstance(m, IbError) and m.conid == STOCKS[0] and m.code == 10089)
    result = ask(ref, Snapshot(conids=[STOCKS[0]]))
    assert result.failures[0].kind == IbErrorKind.NOT_SUBSCRIBED
    ref.tell(Subscribe(conid=STOCKS[2]))
    ref.tell(InjectError(code=1101))
    lost = inbox.wait_for(lambda m: isinstance(m, ConnectionStateChanged) and m.resubscribe)
    assert lost.state == ConnectionState.RESTORED_DATA_LOST
    assert stats(ref).streams == 0


def test_latency_and_timeouts() -> None:
    ref, _ = start(never_answer=[STOCKS[2]])
    ref.tell(SetSnapshotLatency(seconds=0.05))
    started = time.monotonic()
    result = ask(ref, Snapshot(conids=STOCKS[:3], timeout_s=0.3))
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 2
    assert [u.conid for u in result.updates] == STOCKS[:2]
    assert [(f.conid, f.kind) for f in result.failures] == [(STOCKS[2], IbErrorKind.TIMEOUT)]
    ref.tell(SetNeverAnswer(conid=STOCKS[2], never=False))
    assert len(ask(ref, Snapshot(conids=[STOCKS[2]], timeout_s=1)).updates) == 1
    assert stats(ref).snapshots_in_flight == 0


def test_disconnected_answers_typed_failures_promptly() -> None:
    ref, inbox = start(never_answer=[STOCKS[0]])
    pending = ask_async(ref, Snapshot(conids=[STOCKS[0]], timeout_s=30))
    ref.tell(Disconnect())
    assert pending.get(timeout=2).failures[0].kind == IbErrorKind.DISCONNECTED
    assert ask(ref, Snapshot(conids=[STOCKS[1]])).failures[0].kind == IbErrorKind.DISCONNECTED
    ref.tell(Subscribe(conid=STOCKS[1]))
    error = inbox.wait_for(lambda m: isinstance(m, IbError))
    assert (error.kind, error.conid) == (IbErrorKind.DISCONNECTED, STOCKS[1])


def test_add_subscriber_after_start() -> None:
    ref, _ = start()
    late = Inbox.start()
    ref.tell(AddSubscriber(late.ref))
    ref.tell(Subscribe(conid=STOCKS[0]))
    late.wait_for(lambda m: isinstance(m, MarketUpdate))


@pytest.mark.parametrize("conid", [1, 2**40])
def test_unknown_conid_is_no_contract(conid: int) -> None:
    ref, inbox = start()
    assert ask(ref, Snapshot(conids=[conid])).failures[0].kind == IbErrorKind.NO_CONTRACT
    ref.tell(Subscribe(conid=conid))
    assert inbox.wait_for(lambda m: isinstance(m, IbError)).kind == IbErrorKind.NO_CONTRACT


def test_a_farm_blip_with_a_duration_recovers_by_itself() -> None:
    ref, inbox = start(reissue_initial_s=60.0)  # only the farm's own return can bring the stream back in time
    ref.tell(Subscribe(conid=STOCKS[0]))
    inbox.wait_for(lambda m: isinstance(m, MarketUpdate) and m.conid == STOCKS[0])
    ref.tell(InjectFarmBlip(down_s=0.05))
    inbox.wait_for(lambda m: isinstance(m, IbError) and m.code == 10182 and m.conid == STOCKS[0])
    inbox.clear()
    inbox.wait_for(lambda m: isinstance(m, MarketUpdate) and m.conid == STOCKS[0])
    assert stats(ref).streams == 1
    assert not inbox.messages(StreamEnded)


def test_closing_the_market_takes_live_bid_and_ask_away() -> None:
    ref, inbox = start(market_data_type=1)
    ref.tell(Subscribe(conid=STOCKS[0]))
    inbox.wait_for(lambda m: isinstance(m, MarketUpdate) and m.bid is not None)
    ref.tell(SetMarketClosed(closed=True))
    ref.tell(PushTicks())
    closed = inbox.wait_for(lambda m: isinstance(m, MarketUpdate) and m.bid is None)
    assert (closed.ask, closed.data_type) == (None, "live")
    assert closed.last is not None
    ref.tell(SetMarketClosed(closed=False))
    inbox.clear()
    ref.tell(PushTicks())
    assert inbox.wait_for(lambda m: isinstance(m, MarketUpdate)).bid is not None
