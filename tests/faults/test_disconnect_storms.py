"""IB disconnect storms against the whole actor graph: streams come back, no work is lost, lines stay in budget.

The graph is the runtime's own (``runtime.Runtime``), built in-process so
the test can reach the IB side: once with the fake IB actor of ``--demo``
(``InjectDisconnect`` again and again, snapshots slowed down so that some
are in flight at every drop), once with the real IB actor through ib_insync
against the TWS simulator (``drop_connections`` again and again). After the
storm:

* every stream the router holds is open again at IB (resubmitted after
  each reconnect), and the counts agree;
* no queue item was dead-lettered or charged a failed attempt because of a
  disconnect (the log holds no ``item_dead_lettered``/``item_retry_scheduled``);
* IB's line count never went over ``max_lines`` (the fake's ``peak_lines``,
  the simulator's own peak);
* the log verifies after a clean stop.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.config import Config, DemoSettings, RuntimeSettings
from actors.fake_ib import InjectDisconnect, SetSnapshotLatency
from actors.messaging import ask
from events.ib import IbSettings
from events.registry import AddActive, AddActiveMany
from runtime import Runtime
from storage.reader import read_events
from storage.replay import replay
from storage.tables import LogConfig
from storage.verify import verify_data_dir
from tests.simulator import TwsSimulator, default_universe
from tests.support import wait_until

MAX_LINES = 100


def _config(data_dir: Path, ib: IbSettings | None = None) -> Config:
    return Config(
        runtime=RuntimeSettings(
            data_dir=str(data_dir),
            max_lines=MAX_LINES,
            lease_s=30.0,
            snapshot_every=500,
        ),
        ib=ib or IbSettings(),
        log=LogConfig(flush_ms=2.0, maintenance=False),
        demo=DemoSettings(tick_interval_s=0.1),
    )


@pytest.fixture
def started() -> Iterator[list[Runtime]]:
    """Runtimes the test starts; each is stopped afterwards, whatever happened."""
    runtimes: list[Runtime] = []
    yield runtimes
    for rt in runtimes:
        rt.stop()


def _settled(rt: Runtime) -> bool:
    """Connected, and every stream the router holds is open at IB."""
    s = rt.status()
    return bool(s["ib"]["connected"]) and s.get("streams", -1) > 0 and s.get("lines_in_use", 0) >= s["streams"]


def _disconnect_casualties(data_dir: Path) -> dict[str, int]:
    """Events that would mean a disconnect cost an item an attempt or its life."""
    bad = ("queue.item_dead_lettered", "queue.item_retry_scheduled")
    counts = dict.fromkeys(bad, 0)
    for stored in read_events(str(data_dir / "events"), streams=["queue"]):
        tag = type(stored.event).__struct_config__.tag
        if tag in counts:
            counts[tag] += 1
    return counts


def _released(data_dir: Path) -> int:
    return sum(
        1
        for e in read_events(str(data_dir / "events"), streams=["queue"])
        if type(e.event).__struct_config__.tag == "queue.item_released"
    )


def _after_storm(rt: Runtime, data_dir: Path, started: list[Runtime]) -> dict[str, Any]:
    wait_until(lambda: _settled(rt), timeout=60, interval=0.1)
    status = rt.status()
    assert status["dead_letters"] == 0, status
    assert status["peak_lines"] <= MAX_LINES, status
    started.remove(rt)
    rt.stop()
    report = verify_data_dir(str(data_dir))
    assert report.ok, report
    assert _disconnect_casualties(data_dir) == {"queue.item_dead_lettered": 0, "queue.item_retry_scheduled": 0}
    durable = replay(str(data_dir))
    assert all(item.failures == 0 for item in durable.queue.items.values())
    return status


def test_fake_ib_disconnect_storm(data_dir: Path, started: list[Runtime]) -> None:
    rt = Runtime(_config(data_dir), demo=True)
    started.append(rt)
    rt.start()
    wait_until(lambda: _settled(rt), timeout=30, interval=0.05)
    before = rt.status()["streams"]
    ib = rt.refs["ib"]
    ib.tell(SetSnapshotLatency(seconds=0.15))  # snapshots in flight when the line drops
    rng = random.Random(11)
    for _ in range(25):
        ib.tell(InjectDisconnect())
        time.sleep(rng.uniform(0.02, 0.3))  # the storm's rhythm: random gaps are the stimulus, not a wait
    # snapshots succeed again after it (on a loaded machine every one asked before and during the storm can have
    # been cut, and IB back with its streams is not yet a snapshot answered: CI once read 0 succeeded right then)
    wait_until(lambda: rt.status()["worker"]["succeeded"] > 0, timeout=60, interval=0.1)
    status = _after_storm(rt, data_dir, started)
    assert status["streams"] == before, status
    assert status["worker"]["succeeded"] > 0, status
    assert _released(data_dir) > 0, "no claimed work was in flight at any drop: the storm proved little"


def test_simulator_disconnect_storm(data_dir: Path, started: list[Runtime]) -> None:
    sim = TwsSimulator(default_universe(n_stocks=300, n_option_strikes=10))
    sim.start()
    try:
        ib = IbSettings(
            port=sim.port,
            min_stream_age_s=0.05,
            reconnect_initial_s=0.05,
            reconnect_max_s=0.5,
            connect_timeout_s=2.0,  # a drop mid-handshake costs one timeout
            snapshot_timeout_s=5.0,
        )
        rt = Runtime(_config(data_dir, ib), demo=False)
        started.append(rt)
        rt.start()
        # more active contracts than lines: the overflow waits in the queue
        items = [AddActive(conid=1001 + i, strategy="storm") for i in range(110)]
        ask(rt.refs["registry"], AddActiveMany(items=items), timeout=30)
        wait_until(lambda: _settled(rt) and rt.status()["streams"] >= 80, timeout=60, interval=0.1)
        rng = random.Random(12)
        for _ in range(8):
            # each drop cuts a live session: wait for the reconnect, then a random moment of resubscribing
            wait_until(lambda: sim.stats().sessions >= 1, timeout=30, interval=0.02)
            time.sleep(rng.uniform(0.05, 1.0))
            sim.drop_connections()
        wait_until(lambda: sim.stats().streams == rt.status().get("streams"), timeout=60, interval=0.1)
        sim_stats = sim.stats()
        status = _after_storm(rt, data_dir, started)
        assert sim_stats.connections >= 9, sim_stats
        assert sim_stats.peak_lines <= MAX_LINES, sim_stats
        assert sim_stats.streams == status["streams"] >= 80, (sim_stats, status)
    finally:
        for rt in started:
            rt.stop()
        started.clear()
        sim.stop()
