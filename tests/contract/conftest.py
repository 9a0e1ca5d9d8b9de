"""The IB harnesses the contract suite runs against: the fake actor, and the real one on the simulator.

The real actor runs once per client library (``[ib] client``): ib_insync and
ib_async. The ib_async run is skipped only where ib_async is not installed
(the test extra installs it, so CI runs it).

Both see the same account (the simulator's default universe), so a test can
name the same conids whichever implementation it drives. IB's data realities
(:class:`Realities`) are named once here and translated into the fake's
settings and the simulator's config, so one test states one behaviour for both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pykka
import pytest

from actors.fake_ib import FakeIbActor, FakeIbSettings, InjectDisconnect, InjectError, InjectFarmBlip, InjectFarmOk
from actors.ib import IbActor
from actors.ib_client import CLIENTS, client_problem
from events.ib import Connect, ConnectionState, ConnectionStateChanged, IbSettings, PositionChanged
from tests.simulator import SimConfig, TwsSimulator, default_universe
from tests.support import Inbox

STOCKS = list(range(1001, 1041))
CALL = 900001
UNKNOWN = 4242


@dataclass(kw_only=True)
class Realities:
    """How the simulated IB behaves, in one vocabulary for the fake and the simulator."""

    #: What the IB actor asks for with reqMarketDataType (1 live, 2 frozen, 3 delayed, 4 delayed-frozen).
    market_data_type: int = 4
    unsubscribed: list[int] = field(default_factory=list)
    #: conid -> error code every market data request of it gets.
    refused: dict[int, int] = field(default_factory=dict)
    market_closed: bool = False
    #: A snapshot's quote comes after this long (the fake answers then; the simulator quotes then).
    snapshot_delay_s: float = 0.0
    #: Quote -> tickSnapshotEnd at the simulator (the fake has no end: it frees the line with the answer).
    snapshot_end_delay_s: float = 0.02
    snapshot_rate_limit: int = 0
    snapshot_rate_window_s: float = 1.0
    portfolio_interval_s: float = 0.0
    reissue_initial_s: float = 2.0


@dataclass
class IbHarness:
    """How a contract test drives one implementation."""

    name: str
    #: (line limit, min_stream_age_s=0.05, realities=Realities()) -> connected (ref, inbox)
    start: Callable[..., tuple[pykka.ActorRef[Any], Inbox]]
    drop: Callable[[pykka.ActorRef[Any]], None]  # lose the connection; the implementation reconnects
    #: (ref, code): 1100/1101/1102 on a socket that stays up.
    reset: Callable[[pykka.ActorRef[Any], int], None]
    #: (ref, down_s or None): a market data farm blip; None = until farm_ok.
    farm_blip: Callable[[pykka.ActorRef[Any], float | None], None]
    farm_ok: Callable[[pykka.ActorRef[Any]], None]


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


@pytest.fixture(params=["fake", *CLIENTS])
def ib(request: pytest.FixtureRequest) -> Iterator[IbHarness]:
    config = _universe()
    if request.param != "fake" and (problem := client_problem(request.param)) is not None:
        pytest.skip(problem)
    if request.param == "fake":

        def start_fake(
            line_limit: int, min_stream_age_s: float = 0.05, realities: Realities | None = None
        ) -> tuple[pykka.ActorRef[Any], Inbox]:
            r = realities or Realities()
            inbox = Inbox.start()
            assert inbox.ref is not None
            settings = FakeIbSettings(
                positions=_fake_positions(config),
                line_limit=line_limit,
                tick_interval_s=0.02,
                min_stream_age_s=min_stream_age_s,
                market_data_type=r.market_data_type,
                unsubscribed=r.unsubscribed,
                errors=r.refused,
                market_closed=r.market_closed,
                snapshot_latency_s=r.snapshot_delay_s,
                snapshot_rate_limit=r.snapshot_rate_limit,
                snapshot_rate_window_s=r.snapshot_rate_window_s,
                portfolio_interval_s=r.portfolio_interval_s,
                reissue_initial_s=r.reissue_initial_s,
            )
            ref = FakeIbActor.start(settings, [inbox.ref])
            ref.tell(Connect())
            _wait_connected(inbox)
            return ref, inbox

        yield IbHarness(
            "fake",
            start_fake,
            lambda ref: ref.tell(InjectDisconnect()),
            reset=lambda ref, code: ref.tell(InjectError(code=code)),
            farm_blip=lambda ref, down_s: ref.tell(InjectFarmBlip(down_s=down_s)),
            farm_ok=lambda ref: ref.tell(InjectFarmOk()),
        )
        return

    sim = TwsSimulator(config)
    sim.start()

    def start_real(
        line_limit: int, min_stream_age_s: float = 0.05, realities: Realities | None = None
    ) -> tuple[pykka.ActorRef[Any], Inbox]:
        r = realities or Realities()
        sim.configure(
            line_limit=line_limit,
            unsubscribed=set(r.unsubscribed),
            refused=dict(r.refused),
            market_closed=r.market_closed,
            snapshot_delay_min_s=r.snapshot_delay_s,
            snapshot_delay_max_s=r.snapshot_delay_s,
            snapshot_end_delay_s=r.snapshot_end_delay_s,
            snapshot_rate_limit=r.snapshot_rate_limit,
            snapshot_rate_window_s=r.snapshot_rate_window_s,
            portfolio_interval_s=r.portfolio_interval_s,
        )
        inbox = Inbox.start()
        assert inbox.ref is not None
        settings = IbSettings(
            port=sim.port,
            min_stream_age_s=min_stream_age_s,
            reconnect_initial_s=0.05,
            reconnect_max_s=0.5,
            connect_timeout_s=5,
            market_data_type=r.market_data_type,
            reissue_initial_s=r.reissue_initial_s,
            client=request.param,
        )
        ref = IbActor.start(settings, [inbox.ref])
        ref.tell(Connect())
        _wait_connected(inbox)
        return ref, inbox

    try:
        yield IbHarness(
            request.param,
            start_real,
            lambda _ref: sim.drop_connections(),
            reset=lambda _ref, code: sim.send_error(code),
            farm_blip=lambda _ref, down_s: sim.farm_blip(down_s),
            farm_ok=lambda _ref: sim.farm_ok(),
        )
    finally:
        pykka.ActorRegistry.stop_all(timeout=10)
        sim.stop()
