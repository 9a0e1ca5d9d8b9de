"""IB's error 100 ("Max rate of messages per second has been exceeded") through the real IbActor.

The simulator refuses a message past its rate (it is not processed) and
answers 100 with that message's request id, as TWS does. The actor's pacer
is set far above the simulator's rate here, so that 100s really come, as
they would from a gateway that counts its window differently or carries
other traffic. Every wait is on a message, a reply or a counter, with a
timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pykka
import pytest

from actors.messaging import ask
from events.ib import (
    IbError,
    IbErrorKind,
    MarketUpdate,
    PositionsComplete,
    Snapshot,
    SnapshotResult,
    StreamEnded,
    Subscribe,
    Unsubscribe,
)
from tests.integration.conftest import stats
from tests.simulator import SimConfig, SimContract, TwsSimulator, default_universe
from tests.support import Inbox, wait_until

Start = Callable[..., tuple[pykka.ActorRef[Any], Inbox]]
STOCKS = list(range(1001, 1301))
CANCEL_MKT_DATA = 2
#: The actor's pacer, far above the simulator's rate: the burst reaches IB unpaced.
UNPACED = 1000.0
#: A contract IB knows but the account holds no position in: streaming it needs its contract details first.
UNHELD = 777001


def test_snapshot_refused_with_100_fails_at_once_as_pacing(connect_ib: Start, sim: TwsSimulator) -> None:
    ref, inbox = connect_ib(pacing_per_s=UNPACED)
    inbox.wait_for(lambda m: isinstance(m, PositionsComplete))  # contracts cached: one message per snapshot
    sim.set_pacing_limit(10)
    conids = STOCKS[:40]
    started = time.monotonic()
    # The batch's own timeout is far away: the reply must not wait for it.
    result = ask(ref, Snapshot(conids=conids, timeout_s=60), timeout=10)
    assert isinstance(result, SnapshotResult)
    assert time.monotonic() - started < 10
    assert sorted([u.conid for u in result.updates] + [f.conid for f in result.failures]) == conids
    assert result.failures  # at least 30 of the 40 were past the rate
    assert {(f.kind, f.code) for f in result.failures} == {(IbErrorKind.PACING, 100)}
    assert all(isinstance(e, IbError) and e.kind == IbErrorKind.PACING for e in inbox.messages(IbError))
    wait_until(lambda: stats(ref).snapshots_in_flight == 0)  # a refused request holds no line


def test_stream_refused_with_100_ends_refused(connect_ib: Start, sim: TwsSimulator) -> None:
    ref, inbox = connect_ib(pacing_per_s=UNPACED)
    inbox.wait_for(lambda m: isinstance(m, PositionsComplete))
    sim.set_pacing_limit(5)
    conids = STOCKS[:20]
    for conid in conids:
        ref.tell(Subscribe(conid=conid))
    refused = inbox.wait_for(lambda m: isinstance(m, StreamEnded) and m.reason == "refused", timeout=5)
    assert refused.code == 100
    assert refused.conid in conids
    errors = [e for e in inbox.messages(IbError) if e.conid == refused.conid]
    assert [(e.code, e.kind) for e in errors] == [(100, IbErrorKind.PACING)]  # the IbError comes first
    # No phantom line: every stream we count is one IB holds.
    wait_until(lambda: stats(ref).streams == sim.stats().streams, what="our streams are IB's")
    assert stats(ref).streams < len(conids)
    # The refused streams are cancelled at IB too, in case IB served them all the same; this IB had dropped them
    # and answers 300, which is expected, not news.
    sim.set_pacing_limit(50)
    wait_until(lambda: sim.stats().errors_by_code.get(300, 0) >= 1, what="a cancel of a refused stream")
    assert ask(ref, Snapshot(conids=[STOCKS[-1]], timeout_s=5)).updates  # its answer comes after the 300s
    assert not [e for e in inbox.messages(IbError) if e.code == 300]


def test_a_stream_refused_with_100_that_ib_processed_all_the_same_holds_no_line(
    connect_ib: Start, sim: TwsSimulator
) -> None:
    """IB's documents do not say that a message answered 100 was dropped. If IB served it all the same, the
    stream the actor ended as refused (and the router asks for again) would hold a line nobody counts: the
    actor cancels it at IB too, which costs one message and at worst a 300 for a request IB never had."""
    ref, inbox = connect_ib(pacing_per_s=UNPACED)
    inbox.wait_for(lambda m: isinstance(m, PositionsComplete))
    sim.configure(pacing_processes_refused=True)
    sim.set_pacing_limit(5)
    conids = STOCKS[:20]
    for conid in conids:
        ref.tell(Subscribe(conid=conid))
    inbox.wait_for(lambda m: isinstance(m, StreamEnded) and m.reason == "refused" and m.code == 100, timeout=5)
    sim.set_pacing_limit(50)
    # every line IB holds is one of our streams: the refused-but-served ones were cancelled
    wait_until(lambda: stats(ref).streams == sim.stats().streams, timeout=10, what="our streams are IB's")
    assert not [e for e in inbox.messages(IbError) if e.code == 300]  # the expected 300s are not news


def test_cancel_refused_with_100_is_sent_again(connect_ib: Start, sim: TwsSimulator) -> None:
    ref, inbox = connect_ib(pacing_per_s=UNPACED)
    inbox.wait_for(lambda m: isinstance(m, PositionsComplete))
    ref.tell(Subscribe(conid=1001))
    inbox.wait_for(lambda m: isinstance(m, MarketUpdate) and m.conid == 1001)
    sim.set_pacing_limit(0)  # the gateway's window is full (other traffic): the cancel is refused
    ref.tell(Unsubscribe(conid=1001))
    end = inbox.wait_for(lambda m: isinstance(m, StreamEnded) and m.conid == 1001, timeout=5)
    assert end.reason == "cancelled"  # the cancel left the pacer
    wait_until(lambda: sim.stats().errors_by_code.get(100, 0) >= 1, what="the cancel refused")
    refused_at = time.monotonic()
    assert sim.stats().streams == 1  # IB still holds the line
    sim.set_pacing_limit(50)  # the other traffic is gone; the actor waits one window before sending again
    full_for_s = time.monotonic() - refused_at  # on a loaded machine the window may stay full past one pause
    wait_until(lambda: sim.stats().streams == 0, timeout=5, what="the cancel sent again and accepted")
    assert stats(ref).streams == 0
    # Each refused cancel sent again once, the last one accepted...
    refusals = sim.stats().errors_by_code[100]
    assert sim.stats().by_msg_id[CANCEL_MKT_DATA] == refusals + 1
    # ...and after a pause of a window (1.1 s), not at once into the same full window: no storm of refusals.
    assert refusals <= 2 + full_for_s / 1.1, (refusals, full_for_s)


@pytest.fixture
def sim_config() -> SimConfig:
    """The default account, and one contract IB knows that the account holds no position in."""
    config = default_universe(n_stocks=300, n_option_strikes=10)
    config.contracts[UNHELD] = SimContract(conid=UNHELD, symbol="ZZZ", local_symbol="ZZZ", trading_class="NMS")
    return config


def test_contract_details_refused_with_100_are_no_answer_not_no_contract(connect_ib: Start, sim: TwsSimulator) -> None:
    """ib_insync ends a request refused with an error with an empty answer, as it does for 200 "no security
    definition": read as no such contract, the stream would end refused (200) and wait out a minute's backoff."""
    ref, inbox = connect_ib(pacing_per_s=UNPACED, reissue_initial_s=0.2)
    inbox.wait_for(lambda m: isinstance(m, PositionsComplete))
    sim.set_pacing_limit(0)  # the gateway's window is full: the contract details request is refused
    ref.tell(Subscribe(conid=UNHELD))
    wait_until(lambda: sim.stats().errors_by_code.get(100, 0) >= 1, what="the details request refused")
    sim.set_pacing_limit(50)
    # resolved again after the reissue backoff, and streamed
    inbox.wait_for(lambda m: isinstance(m, MarketUpdate) and m.conid == UNHELD, timeout=10)
    assert not [m for m in inbox.messages(StreamEnded) if m.conid == UNHELD]
