"""The IB harnesses the contract suite runs against: the fake actor, and the real one on the simulator.

Both see the same account (the simulator's default universe), so a test can
name the same conids whichever implementation it drives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pykka
import pytest

from actors.fake_ib import FakeIbActor, FakeIbSettings, InjectDisconnect
from actors.ib import IbActor
from events.ib import Connect, ConnectionState, ConnectionStateChanged, IbSettings, PositionChanged
from tests.simulator import SimConfig, TwsSimulator, default_universe
from tests.support import Inbox

STOCKS = list(range(1001, 1041))
CALL = 900001
UNKNOWN = 4242


@dataclass
class IbHarness:
    """How a contract test drives one implementation."""

    name: str
    #: (line limit, min_stream_age_s=0.05) -> connected (ref, inbox)
    start: Callable[..., tuple[pykka.ActorRef[Any], Inbox]]
    drop: Callable[[pykka.ActorRef[Any]], None]  # lose the connection; the implementation reconnects


def _universe() -> SimConfig:
    return default_universe(n_stocks=40, n_option_strikes=2)


#: Every conid the account holds (both implementations report these positions).
POSITION_CONIDS = frozenset(p.conid for p in _universe().positions)


def _fake_positions(config: SimConfig) -> list[PositionChanged]:
    out = []
    for pos in config.positions:
        c = config.contracts[pos.conid]
        out.append(
            PositionChanged(
                account=config.account,
                conid=c.conid,
                symbol=c.symbol,
                sec_type=c.sec_type,
                position=pos.position,
                avg_cost=pos.avg_cost,
                right=c.right,
                strike=c.strike,
                expiry=c.expiry,
                multiplier=float(c.multiplier or 1),
            )
        )
    return out


def _wait_connected(inbox: Inbox) -> None:
    inbox.wait_for(lambda m: isinstance(m, ConnectionStateChanged) and m.state == ConnectionState.CONNECTED, timeout=10)


@pytest.fixture(params=["fake", "real"])
def ib(request: pytest.FixtureRequest) -> Iterator[IbHarness]:
    config = _universe()
    if request.param == "fake":

        def start_fake(line_limit: int, min_stream_age_s: float = 0.05) -> tuple[pykka.ActorRef[Any], Inbox]:
            inbox = Inbox.start()
            assert inbox.ref is not None
            settings = FakeIbSettings(
                positions=_fake_positions(config),
                line_limit=line_limit,
                tick_interval_s=0.02,
                min_stream_age_s=min_stream_age_s,
            )
            ref = FakeIbActor.start(settings, [inbox.ref])
            ref.tell(Connect())
            _wait_connected(inbox)
            return ref, inbox

        yield IbHarness("fake", start_fake, lambda ref: ref.tell(InjectDisconnect()))
        return

    sim = TwsSimulator(config)
    sim.start()

    def start_real(line_limit: int, min_stream_age_s: float = 0.05) -> tuple[pykka.ActorRef[Any], Inbox]:
        sim.set_line_limit(line_limit)
        inbox = Inbox.start()
        assert inbox.ref is not None
        settings = IbSettings(
            port=sim.port,
            min_stream_age_s=min_stream_age_s,
            reconnect_initial_s=0.05,
            reconnect_max_s=0.5,
            connect_timeout_s=5,
        )
        ref = IbActor.start(settings, [inbox.ref])
        ref.tell(Connect())
        _wait_connected(inbox)
        return ref, inbox

    try:
        yield IbHarness("real", start_real, lambda _ref: sim.drop_connections())
    finally:
        pykka.ActorRegistry.stop_all(timeout=10)
        sim.stop()
