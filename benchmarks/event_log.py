"""Event log throughput and ack latency, in steady state, against one-event-per-commit.

What it does, in one run on one machine (so the ratio is fair):

1. warm-up: fills a fresh log with ``--warm-commits`` small commits under the
   production settings, so checkpoints and compaction are running and the
   table is no longer the easy first hundred commits;
2. throughput: 4 producer threads append ``--events`` events as fast as they
   can; ``events_per_s`` = events / time until the last one is durable;
3. latency: 4 producers offer ``--offered`` events/s in total for
   ``--latency-s`` seconds; ``ack_p50_ms``/``ack_p99_ms`` are per event, from
   its append to its commit being confirmed;
4. baseline: one event per Delta write (``write_deltalake`` each), on a fresh
   table, which flatters the baseline.

``--fsync both`` (the default) runs 1-3 twice in the same run, on fresh logs,
without and then with fsync before each acknowledgement, and reports both
(``nosync_*`` figures are the page-cache-only log of before issue 12).
``commit_ms`` is the mean latency of one small commit in the warm-up phase:
what a lone event waits for.

Usage: python benchmarks/event_log.py [--json] [--events N] [--offered N] [--fsync both|on|off]
       python benchmarks/event_log.py --s3-server | --data-dir s3://bucket/prefix [...]

``--data-dir`` measures object storage (credentials and endpoint from the
``AWS_*`` variables); ``--s3-server`` starts the tests' loopback S3 server
(moto, one request at a time) and measures against it.
"""

from __future__ import annotations

import sys
from pathlib import Path

# this folder holds queue.py: drop it from the path before anything imports the stdlib queue
sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent
]

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
import pyarrow as pa
from deltalake import write_deltalake
from loguru import logger

from events.codec import encode_event
from events.queue import ItemEnqueued
from storage.event_log import CommitBatch, EventLog
from storage.hashing import GENESIS_HASH, row_hash
from storage.tables import EVENTS_SCHEMA, LogConfig
from storage.verify import verify_log

PRODUCERS = 4


def event(i: int) -> ItemEnqueued:
    return ItemEnqueued(item_id=i, conid=100_000 + i % 10_000, priority=2, reason="position", enqueued_us=i)


def warm_up(log: EventLog, commits: int) -> float:
    started = time.perf_counter()
    n = 0
    for _ in range(commits):
        receipts = [log.append(event(n + k + 1), stream="queue", key=str(k)) for k in range(20)]
        n += 20
        receipts[-1].wait(60)
    return time.perf_counter() - started


def throughput(log: EventLog, total: int) -> dict[str, Any]:
    per = total // PRODUCERS
    last_batches: list[CommitBatch] = []
    start_barrier = threading.Barrier(PRODUCERS + 1)

    def produce(t: int) -> None:
        start_barrier.wait()
        receipt = None
        base = 10_000_000 * (t + 1)
        for i in range(per):
            receipt = log.append(event(base + i), stream="queue", key=str(i % 10_000))
        assert receipt is not None
        last_batches.append(receipt.batch)

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(PRODUCERS)]
    for t in threads:
        t.start()
    commits_before = log.commits
    start_barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    for batch in last_batches:
        batch.wait(120)
    elapsed = time.perf_counter() - started
    commits = log.commits - commits_before
    return {
        "events": per * PRODUCERS,
        "seconds": elapsed,
        "commits": commits,
        "events_per_s": per * PRODUCERS / elapsed,
    }


def latency(log: EventLog, offered_per_s: float, seconds: float) -> dict[str, Any]:
    """Producers append at a steady offered rate; every event's ack latency is measured."""
    per_thread_rate = offered_per_s / PRODUCERS
    chunk = 100  # appended back to back, then the producer sleeps until its schedule says so
    samples: list[list[tuple[float, CommitBatch]]] = [[] for _ in range(PRODUCERS)]
    done_at: dict[int, float] = {}
    seen: set[int] = set()
    seen_lock = threading.Lock()

    def mark(batch: CommitBatch) -> None:
        done_at[id(batch)] = time.perf_counter()

    def produce(t: int) -> None:
        started = time.perf_counter()
        sent = 0
        base = 50_000_000 * (t + 1)
        while True:
            now = time.perf_counter()
            if now - started >= seconds:
                break
            due = int((now - started) * per_thread_rate)
            while sent < due:
                for _ in range(min(chunk, due - sent)):
                    t0 = time.perf_counter()
                    r = log.append(event(base + sent), stream="queue", key=str(sent % 10_000))
                    samples[t].append((t0, r.batch))
                    sent += 1
                    b = r.batch
                    if id(b) not in seen:
                        with seen_lock:
                            if id(b) not in seen:
                                seen.add(id(b))
                                b.add_done_callback(mark)
            time.sleep(0.0005)

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(PRODUCERS)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.flush(120)
    elapsed = time.perf_counter() - started
    lat = sorted((done_at[id(b)] - t0) * 1000 for chunk_ in samples for t0, b in chunk_)
    n = len(lat)
    return {
        "offered_per_s": offered_per_s,
        "achieved_per_s": n / elapsed,
        "events": n,
        "ack_p50_ms": lat[n // 2],
        "ack_p99_ms": lat[min(n - 1, int(n * 0.99))],
        "ack_max_ms": lat[-1],
    }


def baseline(directory: str, writes: int) -> dict[str, Any]:
    """One event per Delta commit, hashed and encoded the same way."""
    uri = f"{directory}/baseline"
    prev = GENESIS_HASH
    started = time.perf_counter()
    for i in range(1, writes + 1):
        payload = encode_event(event(i))
        ts = time.time_ns() // 1000
        prev = row_hash(prev, i, ts, "queue.item_enqueued", "queue", "k", 1, payload)
        row = pa.Table.from_pydict(
            {
                "seq": pa.array([i], pa.int64()),
                "ts": pa.array([ts], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
                "type": ["queue.item_enqueued"],
                "stream": ["queue"],
                "key": ["k"],
                "payload": [payload.decode()],
                "v": pa.array([1], pa.int32()),
                "hash": [prev],
            },
            schema=EVENTS_SCHEMA,
        )
        write_deltalake(uri, row, mode="append")
    elapsed = time.perf_counter() - started
    return {"writes": writes, "seconds": elapsed, "events_per_s": writes / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="last line: one JSON object with the figures")
    parser.add_argument("--events", type=int, default=400_000, help="events in the throughput phase (>= 200000)")
    parser.add_argument("--warm-commits", type=int, default=1_000, help="small commits before measuring")
    parser.add_argument("--offered", type=float, default=100_000, help="events/s offered in the latency phase")
    parser.add_argument("--latency-s", type=float, default=8.0)
    parser.add_argument("--baseline-writes", type=int, default=300)
    parser.add_argument("--dir", help="where the logs go (default: the system temp dir; fsync costs depend on it)")
    parser.add_argument("--runs", type=int, default=1, help="repeat throughput/latency; report medians")
    parser.add_argument("--flush-ms", type=float, help="override LogConfig.flush_ms (default: the production value)")
    parser.add_argument(
        "--fsync", choices=["both", "on", "off"], default="both", help="fsync before ack; both: off, then on"
    )
    parser.add_argument("--data-dir", help="a delta-rs URI (s3://bucket/prefix) to measure object storage instead of --dir")
    parser.add_argument("--s3-server", action="store_true", help="start the tests' loopback S3 server and use a new bucket there")
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")

    server = None
    if args.s3_server:
        from tests.support.s3_server import S3Server

        server = S3Server().start()
        os.environ.update(server.env())
        args.data_dir = server.create_bucket("slotwise-bench")
    settings = {"both": [False, True], "on": [True], "off": [False]}[args.fsync]
    if args.data_dir:
        settings = [True]  # fsync is for local disks; an object store's PUT is durable when it answers
    try:
        results = [measure(args, fsync) for fsync in settings]
    finally:
        if server is not None:
            server.stop()
    result = results[-1]
    if len(results) == 2:
        result.update({f"nosync_{k}": v for k, v in results[0].items() if k in _COMPARED})
    if not args.json:
        for key, value in result.items():
            print(f"{key:32} {value}")
    print(json.dumps(result))


#: The figures ``--fsync both`` reports for the run without fsync too.
_COMPARED = ("events_per_s", "ack_p50_ms", "ack_p99_ms", "commit_ms", "latency_achieved_per_s")


@contextlib.contextmanager
def _place(args: argparse.Namespace) -> Iterator[str]:
    """Where one measurement's tables go: a fresh prefix under ``--data-dir`` (left there), else a temp dir."""
    if args.data_dir:
        yield f"{args.data_dir.rstrip('/')}/bench-{uuid.uuid4().hex[:8]}"
        return
    with tempfile.TemporaryDirectory(prefix="slotwise-bench-", dir=args.dir) as tmp:
        yield tmp


def measure(args: argparse.Namespace, fsync: bool) -> dict[str, Any]:
    """Phases 1-4 on a fresh log with production settings (maintenance on), fsync as given."""
    with _place(args) as directory:
        config = LogConfig(fsync=fsync)
        if args.flush_ms is not None:
            config = msgspec.structs.replace(config, flush_ms=args.flush_ms)
        log = EventLog.open(f"{directory}/data", config=config)
        warm_s = warm_up(log, args.warm_commits)
        runs = [(throughput(log, args.events), latency(log, args.offered, args.latency_s)) for _ in range(args.runs)]
        stats = log.stats()
        log.close()
        intact = verify_log(f"{directory}/data/events")
        base = baseline(directory, args.baseline_writes)

    events_per_s = statistics.median(r[0]["events_per_s"] for r in runs)
    return {
        "benchmark": "event_log",
        "producers": PRODUCERS,
        "events": runs[0][0]["events"],
        "events_per_s": round(events_per_s),
        "commits_in_throughput_phase": runs[0][0]["commits"],
        "ack_p50_ms": round(statistics.median(r[1]["ack_p50_ms"] for r in runs), 2),
        "ack_p99_ms": round(statistics.median(r[1]["ack_p99_ms"] for r in runs), 2),
        "ack_max_ms": round(max(r[1]["ack_max_ms"] for r in runs), 2),
        "latency_offered_per_s": args.offered,
        "latency_achieved_per_s": round(statistics.median(r[1]["achieved_per_s"] for r in runs)),
        "warm_commits": args.warm_commits,
        "warm_s": round(warm_s, 2),
        "total_commits": stats["commits"],
        "maintenance_rounds": stats["maintenance"]["rounds"] if stats["maintenance"] else 0,
        "log_verified": intact.ok,
        "log_events": intact.events,
        "baseline_events_per_s": round(base["events_per_s"], 1),
        "ratio_vs_per_event_commit": round(events_per_s / base["events_per_s"], 1),
        "runs": args.runs,
        "flush_ms": config.flush_ms,
        "fsync": fsync,
        "storage": args.data_dir.split("://")[0] if args.data_dir else "local",
        "commit_ms": round(warm_s / max(1, args.warm_commits) * 1000, 2),
    }


if __name__ == "__main__":
    main()
