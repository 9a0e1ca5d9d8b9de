"""What-if replay speed: a trading day (6.5 h, 500 contracts, 100 lines) re-run per configuration.

    python benchmarks/what_if.py [--json] [--hours 6.5] [--contracts 500] [--actives 50] [--lines 60,100,200] [--step S] [--demo]

The recorded day is built in memory (the ``RecordedDay`` that
``storage.recorded_day`` reads from a data directory), so the figure is the
replay alone: the real router, queue and worker on simulated time
(``actors.what_if_sim``) plus the age figures (``actors.what_if_report``).
The day: ``--contracts`` positions (30% options with deltas), ``--actives``
of them active from the open with strategy priorities, a strategy switched
on and off every 10 minutes, snapshot latencies of 0.2-4 s (uniform, per
contract, recorded in order), 1% of the contracts without a market data
subscription (354), a farm blip every hour and one 5-minute disconnect. The
account's IB limit is the configuration's line count; the runtime knew its
limit at the start (a restart keeps it). The day is a gateway's: requests
reach IB through the IB actor's pacer (``[ib] pacing_per_s``); ``--demo``
replays it as the demo's fake IB, without one.

Reported per configuration: wall and CPU seconds of the replay, snapshots
requested, loop steps, CPU µs per snapshot, and the p99 ages it found.
Target: ``replay_s <= 10`` per configuration at 6.5 h.
"""

from __future__ import annotations

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout, not benchmarks/

import argparse
import json
import random
import time
from typing import Any

import numpy as np

from actors.what_if_report import figures_of_outcome
from actors.what_if_sim import SimConfig, simulate
from events.ib import IbSettings
from storage.recorded_day import ActiveChange, RecordedContract, RecordedDay, SnapshotSample

START_US = 1_780_000_000_000_000  # a Tuesday, 2026-05-28 20:26 UTC; only differences matter


def trading_day(hours: float, contracts: int, actives: int, seed: int = 7) -> RecordedDay:
    rng = random.Random(seed)
    end_us = START_US + int(hours * 3600e6)
    held = []
    for i in range(contracts):
        option = i < int(contracts * 0.3)
        held.append(
            RecordedContract(
                conid=100_000 + i,
                symbol=f"U{i % 40}" if option else f"S{i}",
                sec_type="OPT" if option else "STK",
                position=float(rng.choice([1, 2, 5, 10, 50, 100, 500])),
                delta=round(rng.uniform(0.05, 0.95), 2) if option else None,
                appeared_us=START_US,
            )
        )
    active = {100_000 + i: {f"strategy-{i // 4}": rng.choice([0, 0, 1, 2])} for i in range(actives)}
    changes = []
    switch_conid = 100_000 + actives  # one more strategy, on and off every 10 minutes
    for k, t in enumerate(range(START_US + 600_000_000, end_us, 600_000_000)):
        kind = "activated" if k % 2 == 0 else "deactivated"
        if kind == "activated":
            changes.append(ActiveChange(t, switch_conid, "switcher", "leg_added", 1))
        changes.append(ActiveChange(t, switch_conid, "switcher", kind))
    snapshots = {}
    for contract in held:
        if rng.random() < 0.01:
            snapshots[contract.conid] = [SnapshotSample(0.3, "terminal", 354)]
        else:
            snapshots[contract.conid] = [SnapshotSample(round(rng.uniform(0.2, 4.0), 3), "ok") for _ in range(30)]
    blips = list(range(START_US + 1800_000_000, end_us, 3600_000_000))
    middle = START_US + (end_us - START_US) // 2
    return RecordedDay(
        start_us=START_US,
        end_us=end_us,
        max_lines=100,
        settings={},
        true_lines=None,
        learned_at_start=100,
        contracts=held,
        active_at_start=active,
        active_changes=changes,
        snapshots=snapshots,
        interruptions_us=blips,
        down=[(middle, middle + 300_000_000)],
        portfolio={c.conid: np.array([START_US + 2_000_000], dtype=np.int64) for c in held},
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--hours", type=float, default=6.5)
    p.add_argument("--contracts", type=int, default=500)
    p.add_argument("--actives", type=int, default=50)
    p.add_argument("--lines", default="60,100,200")
    p.add_argument("--step", type=float, default=0.0, help="the replayed worker's step in seconds (what-if --step; 0, the default: exact)")
    p.add_argument("--demo", action="store_true", help="replay as a demo day: no IB actor's pacer (default: a gateway's day, paced)")
    args = p.parse_args()
    day = trading_day(args.hours, args.contracts, args.actives)
    rows: list[dict[str, Any]] = []
    for lines in (int(x) for x in args.lines.split(",")):
        config = SimConfig(
            label=f"{lines} lines",
            max_lines=lines,
            true_lines=lines,
            learned_at_start=lines,
            step_s=args.step,
            pacing_per_s=None if args.demo else IbSettings().pacing_per_s,
            pacing_window_s=1.0 + IbSettings().pacing_guard_s,
        )
        wall, cpu = time.perf_counter(), time.process_time()
        outcome = simulate(day, config)
        figures = figures_of_outcome(day, outcome)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rows.append(
            {
                "lines": lines,
                "replay_s": round(wall, 2),
                "replay_cpu_s": round(cpu, 2),
                "snapshots": outcome.snapshots_sent,
                "loop_steps": outcome.loop_steps,
                "cpu_us_per_snapshot": round(cpu / max(1, outcome.snapshots_sent) * 1e6, 1),
                "active_p99_s": figures.active.p99_s,
                "other_p99_s": figures.other.p99_s,
                "streamed_share": figures.streamed_share,
                "missed_s": figures.missed_s,
            }
        )
        if not args.json:
            print(json.dumps(rows[-1]))
    result = {
        "benchmark": "what_if",
        "hours": args.hours,
        "contracts": args.contracts,
        "actives": args.actives,
        "step_s": args.step,
        "paced": not args.demo,
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "configs": rows,
        "replay_s": max(r["replay_s"] for r in rows),
        "replay_cpu_s": max(r["replay_cpu_s"] for r in rows),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
