"""A market data farm outage against the whole runtime: it costs no queue item an attempt.

The runtime's own graph (``runtime.Runtime``) with the real IB actor, through
ib_insync, against the TWS simulator. IB says its farm is down (2103) and,
instead of answering new snapshot requests 10182, holds them ("silent") or
ends them without a quote ("end"). Every snapshot sent meanwhile comes back
without a price; none of that is the contract's fault. After the farm is back
(2104) snapshots succeed again, and the log holds no retry and no dead letter.
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
    rt = Runtime(
        Config(
            runtime=RuntimeSettings(data_dir=str(data_dir), max_lines=20),
            ib=IbSettings(port=sim.port, reconnect_initial_s=0.05, connect_timeout_s=5.0, snapshot_timeout_s=0.5),
            log=LogConfig(flush_ms=2.0, maintenance=False),
        ),
        demo=False,
    )
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
