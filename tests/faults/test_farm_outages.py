"""A market data farm outage against the whole runtime: it costs no queue item an attempt, nor the others their turn.

The runtime's own graph (``runtime.Runtime``) with the real IB actor, through
ib_insync, against the TWS simulator. IB says a farm is down (2103) and,
instead of answering new snapshot requests 10182, holds them ("silent") or
ends them without a quote ("end"). Every snapshot of that farm's contracts
sent meanwhile comes back without a price; none of that is the contract's
fault. After the farm is back (2104) snapshots succeed again, and the log
holds no retry and no dead letter. When only one farm is down, the other
farm's contracts keep being refreshed: the down farm's items go back held,
not first in line again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.config import Config, RuntimeSettings
from events.ib import IbSettings
from runtime import Runtime
from storage.reader import read_events
from storage.tables import LogConfig
from tests.simulator import TwsSimulator, default_universe
from tests.support import wait_until


def _runtime(sim: TwsSimulator, data_dir: Path, max_lines: int) -> Runtime:
    return Runtime(
        Config(
            runtime=RuntimeSettings(data_dir=str(data_dir), max_lines=max_lines),
            ib=IbSettings(port=sim.port, reconnect_initial_s=0.05, connect_timeout_s=5.0, snapshot_timeout_s=0.5),
            log=LogConfig(flush_ms=2.0, maintenance=False),
        ),
        demo=False,
    )


def _worker(rt: Runtime) -> dict[str, int]:
    return rt.status()["worker"]


def _charged(data_dir: Path) -> list[str]:
    """Queue events that charged an item an attempt (or its life)."""
    charged = ("queue.item_retry_scheduled", "queue.item_dead_lettered")
    return [
        tag
        for stored in read_events(str(data_dir / "events"), streams=["queue"])
        if (tag := type(stored.event).__struct_config__.tag) in charged
    ]


@pytest.mark.parametrize("answer", ["silent", "end"])
def test_snapshots_without_data_while_a_farm_is_down_cost_no_attempt(data_dir: Path, answer: str) -> None:
    config = default_universe(n_stocks=120, n_option_strikes=0)
    config.farm_down_snapshots = answer
    sim = TwsSimulator(config)
    sim.start()
    rt = _runtime(sim, data_dir, max_lines=20)
    try:
        rt.start()
        wait_until(lambda: _worker(rt)["succeeded"] >= 5, timeout=30, interval=0.05)
        sim.farm_blip(None)
        # snapshots sent during the outage come back without a price: given back, not failed
        wait_until(lambda: _worker(rt)["released"] + _worker(rt)["failed"] >= 3, timeout=30, interval=0.05)
        assert _worker(rt)["failed"] == 0, _worker(rt)
        succeeded = _worker(rt)["succeeded"]
        sim.farm_ok()
        wait_until(lambda: _worker(rt)["succeeded"] >= succeeded + 5, timeout=30, interval=0.05)
        assert _worker(rt)["failed"] == 0, _worker(rt)
    finally:
        rt.stop()
        sim.stop()
    assert _charged(data_dir) == []


def test_one_farm_down_leaves_the_other_farms_contracts_refreshed(data_dir: Path) -> None:
    """The options' farm goes down and TWS holds their snapshots silently; the stocks' farm still serves.

    Each option's snapshot times out and is excused (no attempt), and the item goes back held: before, it went
    back the stalest and unheld, the worker paused and probed one snapshot at a time, and the probe was always
    the next silent option, so the stocks were not refreshed while the outage lasted.
    """
    config = default_universe(n_stocks=20, n_option_strikes=5)  # 20 stocks on usfarm, 10 options on usopt
    config.farm_down_snapshots = "silent"
    stocks = [c for c, contract in config.contracts.items() if contract.sec_type == "STK"]
    options = [c for c, contract in config.contracts.items() if contract.sec_type == "OPT"]
    sim = TwsSimulator(config)
    sim.start()
    rt = _runtime(sim, data_dir, max_lines=20)

    def quoted_since(before: dict[int, int], conids: list[int], times: int) -> bool:
        now = sim.snapshot_quotes()
        return all(now.get(c, 0) >= before.get(c, 0) + times for c in conids)

    try:
        rt.start()
        wait_until(lambda: quoted_since({}, stocks + options, 1), timeout=60, interval=0.05)
        sim.farm_blip(None, farm="usopt")
        wait_until(lambda: _worker(rt)["released"] >= 3, timeout=30, interval=0.05)  # options excused
        during = sim.snapshot_quotes()
        # every stock refreshed twice more while the options' farm is still down
        wait_until(lambda: quoted_since(during, stocks, 2), timeout=60, interval=0.05, what="stocks refreshed")
        assert all(sim.snapshot_quotes().get(c, 0) == during.get(c, 0) for c in options)  # still down
        assert _worker(rt)["failed"] == 0, _worker(rt)
        back = sim.snapshot_quotes()
        sim.farm_ok(farm="usopt")
        # every option refreshed once its hold ends (a few seconds: held 2 s, doubling while cut)
        wait_until(lambda: quoted_since(back, options, 1), timeout=90, interval=0.05, what="options refreshed")
        assert _worker(rt)["failed"] == 0, _worker(rt)
    finally:
        rt.stop()
        sim.stop()
    assert _charged(data_dir) == []
