"""Fixtures for the real IB actor against the TWS simulator."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pykka
import pytest

from actors.ib import IbActor
from actors.messaging import ask
from events.ib import Connect, ConnectionState, ConnectionStateChanged, IbSettings, IbStats, IbStatsReply
from tests.simulator import SimConfig, TwsSimulator, default_universe
from tests.support import Inbox


@pytest.fixture
def sim_config() -> SimConfig:
    return default_universe(n_stocks=300, n_option_strikes=10)


@pytest.fixture
def sim(sim_config: SimConfig) -> Iterator[TwsSimulator]:
    simulator = TwsSimulator(sim_config)
    simulator.start()
    yield simulator
    pykka.ActorRegistry.stop_all(timeout=10)  # the actor first, so it does not reconnect into a closing server
    simulator.stop()


def fast_settings(port: int, **overrides: Any) -> IbSettings:
    """Settings with short waits so tests stay fast."""
    values: dict[str, Any] = {
        "port": port,
        "min_stream_age_s": 0.05,
        "reconnect_initial_s": 0.05,
        "reconnect_max_s": 0.5,
        "connect_timeout_s": 5.0,
        "snapshot_timeout_s": 5.0,
    }
    values.update(overrides)
    return IbSettings(**values)


def stats(ref: pykka.ActorRef[Any]) -> IbStatsReply:
    """The IB actor's counters (streams, snapshots in flight, lines, pacer)."""
    reply = ask(ref, IbStats())
    assert isinstance(reply, IbStatsReply)
    return reply


def is_connected(resubscribe: bool | None = None) -> Callable[[Any], bool]:
    def check(m: Any) -> bool:
        return (
            isinstance(m, ConnectionStateChanged)
            and m.state == ConnectionState.CONNECTED
            and (resubscribe is None or m.resubscribe == resubscribe)
        )

    return check


@pytest.fixture
def connect_ib(sim: TwsSimulator) -> Callable[..., tuple[pykka.ActorRef[Any], Inbox]]:
    """Start an IbActor on the simulator, connect it, wait for CONNECTED; returns (ref, inbox)."""

    def start(**overrides: Any) -> tuple[pykka.ActorRef[Any], Inbox]:
        inbox = Inbox.start()
        assert inbox.ref is not None
        ref = IbActor.start(fast_settings(sim.port, **overrides), [inbox.ref])
        ref.tell(Connect())
        inbox.wait_for(is_connected(), timeout=10)
        return ref, inbox

    return start
