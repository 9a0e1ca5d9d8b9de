"""``what-if`` on a day with a partial farm outage, recorded against the TWS simulator through the real IB actor.

The options' market data farm goes down and TWS holds their snapshot
requests silently (no 10182); the stocks' farm serves on. The IB actor
answers each silent option snapshot DATA_INTERRUPTED 2103 at its timeout
(no attempt), and the worker holds the option back. The replay must see
that outage as the options' alone: read as farm blips, it would cut every
stock's snapshot ending near each of those answers, and the replayed
stocks would be much staler than the positions table shows they were.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_end_to_end import gateway_run, what_if_json
from tests.simulator import default_universe


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("outage")
    universe = default_universe(n_stocks=30, n_option_strikes=5)  # 30 stocks on usfarm, 10 options on usopt
    universe.farm_down_snapshots = "silent"
    universe.snapshot_delay_min_s, universe.snapshot_delay_max_s = 0.2, 1.0
    with gateway_run(
        tmp,
        universe,
        runtime={"max_lines": 20},
        freshness={"monitoring_s": 10.0},
        ib={"min_stream_age_s": 0.05, "snapshot_timeout_s": 2.0},
    ) as (sim, rt):
        status = rt.wait_status(lambda s: s["worker"]["succeeded"] >= 60, 60, "every contract priced")
        sim.farm_blip(None, farm="usopt")
        succeeded = status["worker"]["succeeded"]
        # counted in snapshots, not seconds: a loaded machine records as much (about 15 s on an idle one)
        rt.wait_status(lambda s: s["worker"]["released"] >= 15 and s["worker"]["succeeded"] >= succeeded + 120, 120, "the outage")
        sim.farm_ok(farm="usopt")
        succeeded = rt.wait_status(lambda s: True, 10, "status")["worker"]["succeeded"]
        rt.wait_status(lambda s: s["worker"]["succeeded"] >= succeeded + 40, 60, "the options back")
    return rt.data_dir, rt.config


def test_a_partial_outage_is_replayed_as_the_down_farms_alone_and_matches_the_record(recorded: tuple[Path, Path]) -> None:
    """The replay's row for what ran matches the positions table (p99 ages within 20%). Read as blips, the
    outage's answers made the replayed p99 of the other contracts 1.3 times the recorded one (11.4 s for 8.6 s)."""
    report = what_if_json(*recorded)
    assert report["faithfulness"]["faithful"], report["faithfulness"]["p99"]
