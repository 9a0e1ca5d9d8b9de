"""Benchmark: the queue's full item lifecycle through the real QueueActor on a real event log.

What is measured: ``--items`` items (default 100,000) go through enqueue
(EnqueueMany in chunks), claim (Claim(50) by ``--workers`` concurrent
workers) and succeed (one Succeed per claimed batch, with its leases; a
worker sends it together with its next Claim, which does not depend on it,
and waits for every ack before it finishes). Every step that depends on
another waits for the actor's reply, and the actor replies only once the events
it depends on are durable in the Delta log, so the figure is durable
throughput, not in-memory speed. Default LogConfig (maintenance on) and a
snapshot store, as in production.

Figures: ``items_per_s`` (items through the whole lifecycle per second of
wall time), ``events_per_s`` (log events made durable per second),
per-phase times, commits and commit latency. Target: items_per_s >= 20,000.

    python benchmarks/queue.py [--items N] [--workers W] [--json]
"""

from __future__ import annotations

import os
import sys

# This file is named like the stdlib's ``queue``: take its folder off the path
# before anything imports ``queue``, and import from the checkout instead.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import tempfile
import threading
import time

import pykka
from loguru import logger

from actors.messaging import ask, ask_async
from actors.queue import QueueActor
from events.queue import Claim, Enqueue, EnqueueMany, QueueStats, Succeed
from storage.event_log import EventLog
from storage.snapshots import SnapshotStore
from storage.tables import LogConfig


def run(items: int, workers: int, chunk: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="slotwise-bench-queue-") as tmp:
        log = EventLog.open(tmp, config=LogConfig())
        ref = QueueActor.start(log, SnapshotStore(tmp))
        try:
            started = time.perf_counter()
            futures = []
            for lo in range(0, items, chunk):
                batch = [
                    Enqueue(conid=c + 1, priority=1 + (c % 2), reason="bench")
                    for c in range(lo, min(lo + chunk, items))
                ]
                futures.append(ask_async(ref, EnqueueMany(items=batch)))
            enqueued = sum(f.get(timeout=300).changed for f in futures)
            t_enqueued = time.perf_counter()

            done = [0] * workers

            def worker(i: int) -> None:
                # A worker acks a batch and claims the next one at once: the next claim
                # does not depend on the ack, so both ride the same group commit.
                acks = []
                claimed = ask(ref, Claim(n=50, worker=f"w{i}"), timeout=300).items
                while claimed:
                    ids, leases = [c.item_id for c in claimed], [c.lease_until_us for c in claimed]
                    acks.append(ask_async(ref, Succeed(item_ids=ids, leases=leases)))
                    claimed = ask(ref, Claim(n=50, worker=f"w{i}"), timeout=300).items
                done[i] = sum(ack.get(timeout=300).changed for ack in acks)

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            finished = time.perf_counter()
            stats = ask(ref, QueueStats())
            assert enqueued == items, enqueued
            assert sum(done) == items, sum(done)
            assert stats.pending == stats.processing == 0, stats
            log_stats = log.stats()
            events = log.durable_seq
        finally:
            ref.stop()
            log.close()
            for thread in threading.enumerate():  # background snapshot writes, before the folder goes
                if thread.name == "snapshot-writer":
                    thread.join(timeout=60)
        wall = finished - started
        return {
            "benchmark": "queue_lifecycle",
            "items": items,
            "workers": workers,
            "events": events,
            "wall_s": round(wall, 3),
            "enqueue_s": round(t_enqueued - started, 3),
            "claim_succeed_s": round(finished - t_enqueued, 3),
            "items_per_s": round(items / wall),
            "events_per_s": round(events / wall),
            "commits": log_stats["commits"],
            "commit_ms_p50": log_stats["commit_ms_p50"],
            "commit_ms_max": log_stats["commit_ms_max"],
            "target_items_per_s": 20_000,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=1000, help="items per EnqueueMany")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    try:
        result = run(args.items, args.workers, args.chunk)
    finally:
        pykka.ActorRegistry.stop_all()
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>20}: {value}")


if __name__ == "__main__":
    main()
