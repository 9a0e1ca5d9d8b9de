"""A snapshot and a stream of the same conid are two requests: neither reads, answers or ends the other.

This is the case where the client libraries differ (actors/ib_client.py):
ib_async 2.x keys its tickers by contract, so without the bridge both
requests would share one Ticker -- the stream's ticks would answer the
snapshot before its own quote came, and dropping the snapshot would silence
the stream. Run against the fake and the real actor with every client.
"""

from __future__ import annotations

import time
from typing import Any

import pykka

from actors.messaging import ask, ask_async
from events.ib import IbStats, IbStatsReply, MarketUpdate, Snapshot, SnapshotResult, Subscribe
from tests.contract.conftest import STOCKS, IbHarness, Realities
from tests.support import Inbox, wait_until

#: The snapshot's own quote comes this long after its request; the stream ticks every 20-50 ms meanwhile.
QUOTE_DELAY_S = 0.3


def stats(ref: pykka.ActorRef[Any]) -> IbStatsReply:
    reply = ask(ref, IbStats())
    assert isinstance(reply, IbStatsReply)
    return reply


def streamed(conid: int) -> Any:
    return lambda m: isinstance(m, MarketUpdate) and m.conid == conid and m.source == "stream"


def assert_still_streaming(inbox: Inbox, conid: int) -> None:
    """Two more stream updates of ``conid`` after everything received so far."""
    before = sum(1 for m in inbox.messages(MarketUpdate) if streamed(conid)(m))
    inbox.wait_for_count(streamed(conid), before + 2, timeout=5)


def assert_answered_by_its_own_quote(result: SnapshotResult, conid: int, elapsed: float, timeout_s: float) -> None:
    assert [(u.conid, u.source) for u in result.updates] == [(conid, "queue")], result
    assert not result.failures
    assert elapsed >= QUOTE_DELAY_S, f"answered after {elapsed:.3f} s: by the stream's ticks, not its own quote"
    assert elapsed < timeout_s - 0.5, f"answered after {elapsed:.3f} s: by the timeout, not its first quote"


def test_a_snapshot_of_a_streaming_conid_leaves_the_stream_alone(ib: IbHarness) -> None:
    ref, inbox = ib.start(100, realities=Realities(snapshot_delay_s=QUOTE_DELAY_S, snapshot_end_delay_s=5.0))
    conid = STOCKS[0]
    ref.tell(Subscribe(conid=conid))
    inbox.wait_for(streamed(conid))
    started = time.monotonic()
    result = ask(ref, Snapshot(conids=[conid], timeout_s=4.0), timeout=10)
    assert isinstance(result, SnapshotResult)
    assert_answered_by_its_own_quote(result, conid, time.monotonic() - started, 4.0)
    assert_still_streaming(inbox, conid)
    wait_until(lambda: stats(ref).lines_in_use == 1, what="the snapshot's line to be free, the stream's held")
    reply = stats(ref)
    assert (reply.streams, reply.snapshots_in_flight) == (1, 0)


def test_a_stream_started_during_a_snapshot_of_its_conid_neither_answers_nor_ends_it(ib: IbHarness) -> None:
    ref, inbox = ib.start(100, realities=Realities(snapshot_delay_s=QUOTE_DELAY_S, snapshot_end_delay_s=5.0))
    conid = STOCKS[1]
    started = time.monotonic()
    future = ask_async(ref, Snapshot(conids=[conid], timeout_s=4.0))
    wait_until(lambda: stats(ref).snapshots_in_flight == 1, what="the snapshot to be open")
    ref.tell(Subscribe(conid=conid))
    inbox.wait_for(streamed(conid))
    result = future.get(timeout=10)
    assert isinstance(result, SnapshotResult)
    assert_answered_by_its_own_quote(result, conid, time.monotonic() - started, 4.0)
    assert_still_streaming(inbox, conid)
    wait_until(lambda: stats(ref).lines_in_use == 1, what="the snapshot's line to be free, the stream's held")
