"""How the costs grow: a log after many commits, recovery of bigger logs, memory per item, positions flushes.

Four measurements, each answering "does it still hold when the data is big":

1. **Event log after N commits** (``--commits``, default 1000,10000): one
   log under the production settings (maintenance on: checkpoints, compaction,
   vacuum) receives small commits (20 events each, waited for, as a quiet
   runtime makes them); at each N it measures the latency of lone small
   commits (p50/p99 over ``--probe`` commits) and the throughput of 4
   producers appending ``--burst`` events. If commit cost grew with the
   number of commits, these figures would drift; maintenance is what keeps
   them flat. 100,000 commits take about an hour here: pass
   ``--commits 1000,10000,100000`` for them.
2. **Recovery vs log size** (``--recovery-events``, default 10^4,10^5,10^6):
   ``benchmarks/recovery.py`` in a subprocess for each size (full replay and
   snapshot + tail replay, in fresh processes).
3. **Memory per queued item and per registered contract**: tracemalloc over
   the pure ``QueueState`` / ``RegistryState`` fed N events (``--memory-n``,
   default 100,000), divided by N; the RSS of the process is reported beside
   it as a cross-check.
4. **Positions flushes after N flushes** (``--positions-flushes``, default
   1000,5000): ``storage.positions_table.PositionsTable`` as the positions
   writer uses it (maintenance on), 200 rows a flush, back to back; flush
   latency p50/p99 over the last 500 flushes before each N. A flush a second
   is ~23,000 flushes a trading day.

    python benchmarks/growth.py [--json] [--commits 1000,10000] [--recovery-events ...]
        [--positions-flushes 1000,5000] [--skip log,recovery,memory,positions]
"""

from __future__ import annotations

import os
import sys

# benchmarks/ holds a ``queue.py``: keep it from shadowing the stdlib module.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import gc
import json
import resource
import subprocess
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

from loguru import logger

HERE = Path(__file__).resolve().parent
PRODUCERS = 4


def _counts(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


# ---------------------------------------------------------------------- 1. the log after N commits


def log_growth(
    checkpoints: list[int], probe: int, burst: int, retention_minutes: float | None
) -> list[dict[str, Any]]:
    """Small commits up to each checkpoint, then a latency probe and a throughput burst."""
    import msgspec

    from events.queue import ItemEnqueued
    from storage.event_log import EventLog
    from storage.tables import LogConfig

    def event(i: int) -> ItemEnqueued:
        return ItemEnqueued(item_id=i, conid=100_000 + i % 10_000, priority=2, reason="position", enqueued_us=i)

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="slotwise-growth-") as tmp:
        # production settings; the directory of commit files reaches its steady state once the
        # run is longer than the retention (a minute by default)
        config = LogConfig()
        if retention_minutes is not None:
            config = msgspec.structs.replace(config, log_retention_minutes=retention_minutes)
        log = EventLog.open(Path(tmp) / "data", config=config)
        n = 0
        commits = 0
        started = time.perf_counter()
        for target in sorted(checkpoints):
            while commits < target:
                receipts = [log.append(event(n + k), stream="queue", key=str(k)) for k in range(20)]
                n += 20
                receipts[-1].wait(60)
                commits += 1
            # latency of a lone small commit, as a quiet runtime sees it
            lat = []
            for _ in range(probe):
                t0 = time.perf_counter()
                receipts = [log.append(event(n + k), stream="queue", key=str(k)) for k in range(20)]
                n += 20
                receipts[-1].wait(60)
                lat.append((time.perf_counter() - t0) * 1000)
            commits += probe
            lat.sort()
            # throughput of 4 producers
            per = burst // PRODUCERS
            last: list[Any] = []
            base = n

            def produce(t: int, base: int = base, per: int = per, last: list[Any] = last) -> None:
                receipt = None
                for i in range(per):
                    receipt = log.append(event(base + t * per + i), stream="queue", key=str(i % 10_000))
                assert receipt is not None
                last.append(receipt.batch)

            before = log.commits
            t0 = time.perf_counter()
            threads = [threading.Thread(target=produce, args=(t,)) for t in range(PRODUCERS)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            for batch in last:
                batch.wait(120)
            seconds = time.perf_counter() - t0
            n += per * PRODUCERS
            commits += log.commits - before
            stats = log.stats()
            maint = stats["maintenance"] or {}
            row = {
                "after_commits": target,
                "commit_ms_p50": round(lat[len(lat) // 2], 2),
                "commit_ms_p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2),
                "events_per_s": round(per * PRODUCERS / seconds),
                "table_version": log._dt.version() if log._dt is not None else None,
                "data_files": len(log._dt.file_uris()) if log._dt is not None else None,
                "delta_log_files": sum(1 for _ in (Path(tmp) / "data" / "events" / "_delta_log").iterdir()),
                "maintenance_rounds": maint.get("rounds", 0),
                "checkpoints": maint.get("checkpoints", 0),
                "elapsed_s": round(time.perf_counter() - started, 1),
            }
            print(f"log after {target} commits: {row}", file=sys.stderr, flush=True)
            results.append(row)
        log.close()
    return results


# ---------------------------------------------------------------------- 2. recovery vs log size


def recovery_growth(sizes: list[int]) -> list[dict[str, Any]]:
    """``benchmarks/recovery.py --events N`` for each N, each in its own process."""
    rows = []
    for events in sizes:
        contracts = max(100, min(10_000, events // 100))
        t0 = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                str(HERE / "recovery.py"),
                "--events",
                str(events),
                "--contracts",
                str(contracts),
                "--json",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=3600,
        )
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            rows.append({"events": events, "error": f"exit {proc.returncode}: {tail}"})
            continue
        figures = json.loads(lines[-1])
        row = {
            "events": events,
            "contracts": contracts,
            "replay_s": figures["replay_s"],
            "replay_with_snapshot_s": figures["replay_with_snapshot_s"],
            "peak_rss_mb": figures["peak_rss_mb"],
            "wall_s_including_build": round(time.perf_counter() - t0, 1),
        }
        print(f"recovery: {row}", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- 3. memory per item


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _measure(build: Any, n: int) -> dict[str, float]:
    """Bytes retained by ``build(n)``'s result, per item: by tracemalloc, and by RSS as a cross-check.

    The RSS build runs first and without tracemalloc (whose own bookkeeping
    would double it); tracemalloc counts exactly what the second build keeps.
    """
    gc.collect()
    rss0 = _rss_mb()
    state = build(n)
    gc.collect()
    rss1 = _rss_mb()
    del state
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    state = build(n)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del state
    return {
        "n": n,
        "bytes_per_item": round((after - before) / n, 1),
        "rss_bytes_per_item": round((rss1 - rss0) * 2**20 / n, 1),
    }


def memory(n: int) -> dict[str, Any]:
    """Bytes per queued item (PENDING, one per contract) and per registered contract (one strategy each)."""
    from actors.queue_state import QueueState
    from actors.registry import RegistryState
    from events.queue import ItemEnqueued
    from events.registry import ContractActivated, LegAdded

    def queue(n: int) -> QueueState:
        state = QueueState()
        for i in range(1, n + 1):
            state.apply(ItemEnqueued(item_id=i, conid=1_000_000 + i, priority=2, reason="position", enqueued_us=i))
        return state

    def registry(n: int) -> RegistryState:
        state = RegistryState()
        for i in range(1, n + 1):
            conid = 1_000_000 + i
            state.apply(LegAdded(conid=conid, strategy=f"strategy-{i % 40}", source="api", expected_quantity=1.0))
            state.apply(ContractActivated(conid=conid, strategy=f"strategy-{i % 40}"))
        return state

    return {"queue_item": _measure(queue, n), "registry_contract": _measure(registry, n)}


# ---------------------------------------------------------------------- 4. positions flushes


def positions_growth(checkpoints: list[int], rows_per_flush: int = 200) -> list[dict[str, Any]]:
    """Flush latency of the positions table after each N flushes, maintenance on."""
    from datetime import UTC, datetime

    from storage.positions_table import PositionsTable

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="slotwise-growth-positions-") as tmp:
        table = PositionsTable(tmp)
        latencies: list[float] = []
        started = time.perf_counter()
        try:
            for target in sorted(checkpoints):
                while len(latencies) < target:
                    now = datetime.now(UTC)
                    rows = PositionsTable.to_arrow(
                        [
                            {"conid": 1000 + i, "symbol": "X", "position": 1.0, "mark": 1.0, "source": "stream", "ts": now}
                            for i in range(rows_per_flush)
                        ]
                    )
                    t0 = time.perf_counter()
                    table.append(rows)
                    latencies.append((time.perf_counter() - t0) * 1000)
                window = sorted(latencies[-500:])
                stats = table.maintenance_stats() or {}
                row = {
                    "after_flushes": target,
                    "flush_ms_p50": round(window[len(window) // 2], 2),
                    "flush_ms_p99": round(window[min(len(window) - 1, int(len(window) * 0.99))], 2),
                    "delta_log_files": sum(1 for _ in (Path(tmp) / "positions" / "_delta_log").iterdir()),
                    "maintenance_rounds": stats.get("rounds", 0),
                    "elapsed_s": round(time.perf_counter() - started, 1),
                }
                print(f"positions after {target} flushes: {row}", file=sys.stderr, flush=True)
                results.append(row)
        finally:
            table.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--commits", default="1000,10000", help="measure the log after these many commits")
    parser.add_argument(
        "--log-retention-minutes",
        type=float,
        default=None,
        help="LogConfig.log_retention_minutes (default: the production value)",
    )
    parser.add_argument("--probe", type=int, default=200, help="lone commits timed at each point")
    parser.add_argument("--burst", type=int, default=200_000, help="events in each throughput burst")
    parser.add_argument("--recovery-events", default="10000,100000,1000000")
    parser.add_argument("--memory-n", type=int, default=100_000)
    parser.add_argument("--positions-flushes", default="1000,5000", help="measure positions flushes after these many")
    parser.add_argument("--skip", default="", help="comma list of: log, recovery, memory, positions")
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    started = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "growth"}
    if "memory" not in skip:
        result["memory"] = memory(args.memory_n)
        print(f"memory: {result['memory']}", file=sys.stderr, flush=True)
    if "log" not in skip:
        result["log"] = log_growth(_counts(args.commits), args.probe, args.burst, args.log_retention_minutes)
    if "recovery" not in skip:
        result["recovery"] = recovery_growth(_counts(args.recovery_events))
    if "positions" not in skip:
        result["positions"] = positions_growth(_counts(args.positions_flushes))
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if not args.json:
        print(json.dumps(result, indent=2))
    else:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
