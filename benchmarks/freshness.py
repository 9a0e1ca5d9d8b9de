"""Freshness against its physical bound: the real runtime and IB actor (ib_insync) against the TWS simulator.

    python benchmarks/freshness.py [--json] [--positions 500] [--true-lines 80] [--max-lines 120]
                                   [--actives 50] [--snapshot-delay 0.2-4] [--msgs-per-s 10]
                                   [--monitoring-s 60] [--warmup-s 60] [--measure-s 100]

The simulated account holds ``--positions`` contracts (stocks and options on
one underlying), has ``--true-lines`` market data lines while Slotwise is told
``--max-lines``, answers snapshots after a delay drawn uniformly from
``--snapshot-delay``, and counts an open snapshot as a line (101 beyond).
``--actives`` options are registered active (streamed); the rest are served by
the queue. ``runtime.py`` runs as a subprocess, exactly as on a trading host.

The physical bound of one refresh cycle over the non-active contracts is::

    bound_cycle_s = N_rest x max(mean_snapshot_s / free_lines, 1 / max_snapshot_msgs_per_s)

with ``free_lines = true_lines - actives`` (what streams leave) and
``mean_snapshot_s`` the mean of the delay range: no scheduler can refresh a
contract more often than that. The measured figures come from the positions
table alone (every quote is a row, stamped when it arrived): for each
non-active contract, the age of its newest queue-served quote sampled every
``--sample-s`` over the measurement window (after ``--warmup-s``). Reported:
the worst and p99 of those ages, their ratio to the bound
(``staleness_vs_bound``, target <= 1.25), contracts never priced by the queue
(target 0) and the 101s IB sent (target <= 10).
"""

from __future__ import annotations

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout, not benchmarks/

import argparse
import json
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from deltalake import DeltaTable

from actors.freshness import percentile
from tests.simulator import TwsSimulator, default_universe

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = str(ROOT / "runtime.py")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--positions", type=int, default=500)
    p.add_argument("--true-lines", type=int, default=80)
    p.add_argument("--max-lines", type=int, default=120)
    p.add_argument("--actives", type=int, default=50)
    p.add_argument("--snapshot-delay", default="0.2-4", help="MIN-MAX seconds before a snapshot's quote")
    p.add_argument("--msgs-per-s", type=float, default=10.0, help="[freshness] max_snapshot_msgs_per_s")
    p.add_argument("--monitoring-s", type=float, default=60.0, help="[freshness] monitoring_s")
    p.add_argument("--warmup-s", type=float, default=60.0, help="run this long before measuring")
    p.add_argument("--measure-s", type=float, default=100.0, help="then measure this long")
    p.add_argument("--sample-s", type=float, default=0.5, help="age sampling step over the window")
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args()


def delay_range(text: str) -> tuple[float, float]:
    low, _, high = text.partition("-")
    lo, hi = float(low), float(high or low)
    if not 0 <= lo <= hi:
        raise SystemExit(f"--snapshot-delay {text!r}: expected MIN-MAX seconds with 0 <= MIN <= MAX")
    return lo, hi


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, RUNTIME, *args], capture_output=True, text=True, timeout=120, check=False)


def status(data_dir: Path) -> dict[str, Any] | None:
    done = cli("status", "--json", "--data-dir", str(data_dir))
    return json.loads(done.stdout) if done.returncode == 0 else None


def wait(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def quote_times(data_dir: Path, conids: set[int]) -> dict[int, list[float]]:
    """conid -> sorted arrival times (s since the epoch) of its queue-served quotes, from the positions table."""
    table = DeltaTable(str(data_dir / "positions")).to_pyarrow_table(columns=["conid", "source", "ts"])
    table = table.filter(pc.equal(table["source"], "queue"))
    times: dict[int, list[float]] = {c: [] for c in conids}
    for conid, ts in zip(table["conid"].to_pylist(), table["ts"].cast("int64").to_pylist(), strict=True):
        if conid in times:
            times[conid].append(ts / 1e6)
    for values in times.values():
        values.sort()
    return times


def ages_over(times: dict[int, list[float]], start: float, end: float, step: float) -> tuple[list[float], int]:
    """Every contract's quote age at each sample instant of [start, end]; and how many had no quote by ``start``."""
    ages: list[float] = []
    unpriced = 0
    for quotes in times.values():
        if not quotes or quotes[0] > start:
            unpriced += 1  # its first refresh came after the window opened (or never): its age is unknown there
        i = 0
        t = start
        while t <= end:
            while i < len(quotes) and quotes[i] <= t:
                i += 1
            if i:
                ages.append(t - quotes[i - 1])
            t += step
    return ages, unpriced


def main() -> int:
    args = parse_args()
    low, high = delay_range(args.snapshot_delay)
    strikes = max(1, (args.actives + 1) // 2)
    universe = default_universe(n_stocks=max(1, args.positions - 2 * strikes), n_option_strikes=strikes)
    universe.line_limit = args.true_lines
    universe.snapshot_delay_min_s, universe.snapshot_delay_max_s = low, high
    universe.tick_interval_s = 0.5
    universe.seed = args.seed
    options = sorted(c for c, k in universe.contracts.items() if k.sec_type != "STK")
    actives = options[: args.actives]
    rest = {p.conid for p in universe.positions} - set(actives)
    sim = TwsSimulator(universe)
    port = sim.start()
    tmp = Path(tempfile.mkdtemp(prefix="slotwise-freshness-"))
    data_dir = tmp / "data"
    config = tmp / "bench.toml"
    config.write_text(
        f"[runtime]\nmax_lines = {args.max_lines}\nstatus_interval_s = 3600\n"
        f"[freshness]\nmonitoring_s = {args.monitoring_s}\nmax_snapshot_msgs_per_s = {args.msgs_per_s}\n"
        f"[ib]\nport = {port}\nmin_stream_age_s = 0.5\n"
        f"[positions]\nflush_interval_s = 1.0\n[audit]\nsign = false\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLOTWISE_")}
    log = (tmp / "runtime.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, RUNTIME, "run", "--config", str(config), "--data-dir", str(data_dir)],
        stdout=subprocess.DEVNULL,
        stderr=log,
        env=env,
    )
    try:
        wait("the runtime to connect", lambda: (s := status(data_dir)) and s["ib"]["connected"], 60)
        added = cli("registry", "add", *map(str, actives), "--strategy", "bench", "--data-dir", str(data_dir))
        if added.returncode != 0:
            raise SystemExit(f"registry add failed: {added.stderr.strip()}")
        started = time.time()
        time.sleep(args.warmup_s)
        window_start = time.time()
        time.sleep(args.measure_s)
        window_end = time.time()
        final = status(data_dir) or {}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        stats = sim.stats()
        sim.stop()
    mean_snapshot_s = (low + high) / 2
    free_lines = max(1, args.true_lines - args.actives)
    bound_cycle_s = len(rest) * max(mean_snapshot_s / free_lines, 1 / args.msgs_per_s)
    times = quote_times(data_dir, rest)
    ages, unpriced_at_start = ages_over(times, window_start, window_end, args.sample_s)
    never = sum(1 for quotes in times.values() if not quotes)
    worst = max(ages) if ages else float("nan")
    ages.sort()  # the same nearest-rank percentile as the runtime's status (actors.freshness)
    p99 = percentile(ages, 99) if ages else float("nan")
    refreshes = sum(1 for q in times.values() for t in q if window_start <= t <= window_end)
    result = {
        "positions": len(universe.positions),
        "actives": len(actives),
        "non_active": len(rest),
        "true_lines": args.true_lines,
        "max_lines": args.max_lines,
        "snapshot_delay_s": [low, high],
        "max_snapshot_msgs_per_s": args.msgs_per_s,
        "monitoring_s": args.monitoring_s,
        "warmup_s": round(window_start - started, 1),
        "measure_s": round(window_end - window_start, 1),
        "bound_cycle_s": round(bound_cycle_s, 2),
        "worst_age_s": round(worst, 2),
        "p99_age_s": round(p99, 2),
        "p50_age_s": round(percentile(ages, 50), 2) if ages else float("nan"),
        "staleness_vs_bound": round(worst / bound_cycle_s, 3),
        "p99_vs_bound": round(p99 / bound_cycle_s, 3),
        "refreshes_per_s": round(refreshes / max(1e-9, window_end - window_start), 2),
        "never_priced": never,
        "unpriced_when_window_opened": unpriced_at_start,
        "errors_101": stats.errors_by_code.get(101, 0),
        "errors_by_code": {str(k): v for k, v in sorted(stats.errors_by_code.items())},
        "peak_lines_at_ib": stats.peak_lines,
        "pacing_violations": stats.pacing_violations,
        "learned_line_limit": final.get("learned_line_limit"),
        "streams": final.get("streams"),
        "targets": {"staleness_vs_bound": 1.25, "never_priced": 0, "errors_101": 10},
    }
    if not args.json:
        for key, value in result.items():
            print(f"{key:>28}: {value}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
