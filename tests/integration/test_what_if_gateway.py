"""``what-if`` on a day recorded against a gateway: the real IB actor (ib_insync) and the TWS simulator.

The demo's fake IB answers a request the moment it is made; a gateway gets
the runtime's requests through the IB actor's pacer (45 messages in any
1.1 s). When a strategy switches on many contracts at once in an account
whose true line count is below ``max_lines``, the subscribes reach IB over
more than a second, while snapshot answers and their cancels go on, and IB
refuses the ones beyond its count as they come: the runtime learns its
limit from several 101s, not one. The replay must meet the same burst the
same way, or its row for what ran is not what ran.

One run is recorded per module (about 30 s): 50 stocks held, IB's true
count 30 of the 45 lines configured, 36 stocks activated together, and
180 snapshots recorded after the burst (shorter periods leave the p99 ages
to a few seconds of the burst, and to chance).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_end_to_end import cli, gateway_run, wait_for, what_if_json
from tests.simulator import default_universe

ACTIVATED = [str(1001 + i) for i in range(36)]
#: Snapshots recorded after the burst (shorter periods leave the p99 ages to a few seconds of the burst).
SNAPSHOTS_AFTER_BURST = 180
#: [freshness] line_probe_s of the recorded run: short, so that the ~25 s after the burst hold several probes.
LINE_PROBE_S = 5.0


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A data directory with ~20 s of an account behind the TWS simulator, and the config it ran with."""
    tmp = tmp_path_factory.mktemp("gateway")
    universe = default_universe(n_stocks=50, n_option_strikes=0)
    universe.line_limit = 30
    universe.snapshot_delay_min_s, universe.snapshot_delay_max_s = 0.2, 1.0
    with gateway_run(
        tmp,
        universe,
        runtime={"max_lines": 45},
        freshness={"monitoring_s": 10.0, "line_probe_s": LINE_PROBE_S},
        ib={"min_stream_age_s": 0.05, "snapshot_timeout_s": 5.0},
    ) as (_, rt):
        wait_for(lambda: (rt.socket_status() or {}).get("positions_rows_written", 0) >= 20, 30, "snapshots under way")
        added = cli("registry", "add", *ACTIVATED, "--strategy", "burst", *rt.dir_args())
        assert added.returncode == 0, added.stderr
        status = rt.wait_status(lambda s: s["streams"] >= 20, 30, "the burst's streams at IB")
        # then the burst's 101s and enough snapshots of the overflow and the others for steady p99 ages: counted
        # in snapshots, not seconds, so a loaded machine records as much (about 25 s on an idle one)
        enough = status["worker"]["succeeded"] + SNAPSHOTS_AFTER_BURST
        rt.wait_status(lambda s: s["worker"]["succeeded"] >= enough, 120, f"{SNAPSHOTS_AFTER_BURST} snapshots after the burst")
    return rt.data_dir, rt.config


def test_the_replay_meets_the_burst_as_the_gateway_did_and_matches_the_record(recorded: tuple[Path, Path]) -> None:
    learned = cli("audit", "--data-dir", str(recorded[0]), "--type", "router.line_limit_learned", "--format", "jsonl")
    assert learned.returncode == 0, learned.stderr
    events = [json.loads(line) for line in learned.stdout.splitlines() if line.strip()]
    steps = [e["limit"] for e in events]
    taught_by_a_101 = [e for e in events if e["reason"].startswith("101 on")]  # not "max_lines held without a 101"
    assert len(steps) > 1, steps  # the runtime met IB's limit in a burst: several 101s
    assert steps[-1] <= 30, steps
    report = what_if_json(*recorded)
    assert report["period"]["pacing_per_s"] == 45.0  # a gateway's day: the IB actor's pacer, [ib] pacing_per_s
    as_run = report["faithfulness"]["as_run"]
    assert report["faithfulness"]["recorded"]["extra"]["refusals_101"] >= len(taught_by_a_101)  # each was a 101
    # the same burst, refused as it reached IB: several 101s, as many as the gateway gave within a factor of
    # three (answered at once, the first refusal would have taught the replayed router everything)
    assert as_run["extra"]["refusals_101"] >= max(2, len(steps) / 3), (as_run["extra"], steps)
    assert as_run["extra"]["line_limit_at_end"] <= 30
    assert report["faithfulness"]["faithful"], report["faithfulness"]["p99"]


def test_after_the_burst_the_router_probes_for_more_lines_every_line_probe_s(recorded: tuple[Path, Path]) -> None:
    """The burst's levels were counted with subscribes still in the IB actor's pacer, and some were proven before
    IB's 101s for them came back. Kept as the run's peak, they made the limit IB taught look like lines lent to
    another client, and the router probed towards them every tenth of line_probe_s (59 probes in 150 s at a
    line_probe_s of 20 s, each a 101 and a stream demoted), where it probes once a line_probe_s (7)."""
    log = cli("audit", "--data-dir", str(recorded[0]), "--format", "jsonl")
    assert log.returncode == 0, log.stderr
    events = [json.loads(line) for line in log.stdout.splitlines() if line.strip()]
    taught = [e["seq"] for e in events if e["type"] == "router.line_limit_learned"]
    probes = [e for e in events if e["type"] == "router.line_limit_probed"]
    assert taught, "the burst met IB's limit"
    span_s = (_ts(events[-1]) - _ts(next(e for e in events if e["seq"] == taught[0]))).total_seconds()
    assert span_s > 3 * LINE_PROBE_S, span_s  # long enough to tell one pace from the other
    assert len(probes) <= span_s / LINE_PROBE_S + 1, (len(probes), span_s)


def _ts(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["ts"].replace("Z", "+00:00"))
