"""Benchmark: cold rebuild of the registry and the queue from a log of 1,000,000 events.

What is measured: a fresh process (a subprocess, so nothing is warm or
cached in Python) opens the log and starts RegistryActor and QueueActor,
which recover exactly as in production (newest snapshot of their stream,
then replay of the later events of that stream); the clock runs from before
``EventLog.open`` until both actors have answered. Done twice: with no
snapshot store (full replay) and with the newest snapshots.

The log: ``--events`` events (default 1,000,000) about ``--contracts``
contracts (default 10,000). Registry: a third of the contracts in one or
two of 40 strategies to start with, then legs added and removed. Queue churn made by the QueueActor's own
decision code (never started: its persist collects the events), so the mix
is what the actor writes: enqueues that coalesce or reprioritise, claims in
batches of 50, successes, failures with backoff, dead letters, releases,
lease expiries. Events go in with ``EventLog.append_many`` in batches of
20,000 (one commit each). Snapshots of both streams are written at 99% of
the log, so the snapshot run also replays a tail of ~10,000 events.

Figures: ``events``, ``replay_s``, ``replay_with_snapshot_s``,
``peak_rss_mb`` (max RSS of the rebuilding processes), and the build time.
Targets: replay_s <= 5, replay_with_snapshot_s <= 0.5, peak_rss_mb <= 1000.

    python benchmarks/recovery.py [--events N] [--contracts N] [--keep DIR] [--json]
"""

from __future__ import annotations

import os
import sys

# benchmarks/ holds a ``queue.py``: keep it from shadowing the stdlib module.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import json
import random
import resource
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from loguru import logger

SEED = 20240601


def _direct_queue(clock: list[int]) -> tuple[Any, list[Any]]:
    from actors.queue import QueueActor

    events: list[Any] = []
    actor = QueueActor(object(), clock=lambda: clock[0], max_attempts=4, backoff_base_s=1.0, backoff_cap_s=60.0)  # type: ignore[arg-type]

    def persist(event: Any) -> None:
        actor.state.apply(event)
        events.append(event)

    actor.persist = persist  # type: ignore[method-assign]
    return actor, events


def _direct_registry() -> tuple[Any, list[Any]]:
    from actors.registry import RegistryActor

    events: list[Any] = []
    actor = RegistryActor(object())  # type: ignore[arg-type]

    def persist(event: Any) -> None:
        actor.state.apply(event)
        events.append(event)

    actor.persist = persist  # type: ignore[method-assign]
    return actor, events


def generate(total: int, contracts: int) -> Iterator[tuple[Any, str]]:
    """(event, stream) in log order, made by the actors' own decision code."""
    from events.queue import Claim, Enqueue, EnqueueMany, ExpireLeases, Fail, Release, Succeed
    from events.registry import AddActive, RemoveActive

    rng = random.Random(SEED)
    clock = [1_700_000_000_000_000]
    queue, q_events = _direct_queue(clock)
    registry, r_events = _direct_registry()
    strategies = [f"strategy-{i:02d}" for i in range(40)]
    conids = list(range(100_001, 100_001 + contracts))
    from events.registry import AddActiveMany

    seed = [AddActive(conid=c, strategy=rng.choice(strategies)) for c in conids[: contracts // 3] for _ in range(2)]
    for lo in range(0, len(seed), 500):
        registry.handle_command(AddActiveMany(items=seed[lo : lo + 500]))
    produced = 0
    while produced < total:
        clock[0] += 250_000
        roll = rng.random()
        if roll < 0.02:
            conid, strategy = rng.choice(conids[: contracts // 3]), rng.choice(strategies)
            if registry.state.has_leg(conid, strategy) and rng.random() < 0.4:
                registry.handle_command(RemoveActive(conid=conid, strategy=strategy))
            else:
                registry.handle_command(
                    AddActive(conid=conid, strategy=strategy, expected_quantity=rng.randint(-500, 500))
                )
        elif roll < 0.52:
            batch = [
                Enqueue(conid=rng.choice(conids), priority=rng.choice((1, 2, 2, 2)), reason="refresh")
                for _ in range(50)
            ]
            queue.handle_command(EnqueueMany(items=batch))
        else:
            claimed = queue.handle_command(Claim(n=50, lease_s=30)).items
            ok = [c.item_id for c in claimed if rng.random() < 0.9]
            queue.handle_command(Succeed(item_ids=ok))
            rest = [c for c in claimed if c.item_id not in set(ok)]
            for c in rest[: len(rest) // 2]:
                queue.handle_command(Fail(item_id=c.item_id, error="no market data", code=354))
            if rng.random() < 0.1:
                queue.handle_command(
                    Release(item_ids=[c.item_id for c in rest[len(rest) // 2 :]], reason="disconnected")
                )
            elif rng.random() < 0.05:
                clock[0] += 31_000_000
                queue.handle_command(ExpireLeases())
        for event in r_events:
            yield event, "registry"
        for event in q_events:
            yield event, "queue"
        produced += len(r_events) + len(q_events)
        r_events.clear()
        q_events.clear()


def build(data_dir: str, total: int, contracts: int) -> dict[str, Any]:
    from actors.queue import QueueState
    from actors.registry import RegistryState
    from storage.event_log import EventLog
    from storage.snapshots import SnapshotStore
    from storage.tables import LogConfig

    started = time.perf_counter()
    log = EventLog.open(data_dir, config=LogConfig(maintenance=False))
    snaps = SnapshotStore(data_dir)
    states = {"registry": RegistryState(), "queue": QueueState()}
    snapshot_at = int(total * 0.99)
    batch: list[tuple[Any, str, str]] = []
    written = 0
    snapped = False
    for event, stream in generate(total, contracts):
        if written + len(batch) >= total:
            break
        states[stream].apply(event)
        batch.append((event, stream, str(event.conid)))
        if len(batch) == 20_000 or (not snapped and written + len(batch) >= snapshot_at):
            log.append_many(batch)
            written += len(batch)
            batch.clear()
            if not snapped and written >= snapshot_at:
                seq = log.flush(timeout=300)
                for stream_name, state in states.items():
                    snaps.save(stream_name, seq, state.dump())
                snapped = True
    log.append_many(batch)
    written += len(batch)
    log.flush(timeout=300)
    events, commits = log.durable_seq, log.commits
    log.close()
    return {
        "events": events,
        "build_s": round(time.perf_counter() - started, 2),
        "commits": commits,
        "queue_items_live": len(states["queue"].items),
        "active_contracts": len(states["registry"].all_active()),
    }


def child(data_dir: str, with_snapshots: bool) -> None:
    """Runs in a fresh process: time the rebuild exactly as the runtime does it."""
    logger.remove()
    try:
        _timed_rebuild(data_dir, with_snapshots)
    except BaseException as exc:  # noqa: BLE001 - pykka's threads would keep a failed child alive forever
        print(f"rebuild failed: {exc!r}", file=sys.stderr, flush=True)
        os._exit(1)
    os._exit(0)


def _timed_rebuild(data_dir: str, with_snapshots: bool) -> None:
    from actors.messaging import ask
    from actors.queue import QueueActor
    from actors.registry import RegistryActor
    from events.queue import QueueStats
    from events.registry import ListActive
    from storage.event_log import EventLog
    from storage.snapshots import SnapshotStore
    from storage.tables import LogConfig

    started = time.perf_counter()
    log = EventLog.open(data_dir, config=LogConfig(maintenance=False))
    snaps = SnapshotStore(data_dir) if with_snapshots else None
    registry = RegistryActor.start(log, snaps, snapshot_every=10**9)
    queue = QueueActor.start(log, snaps, snapshot_every=10**9)
    stats = ask(queue, QueueStats(), timeout=300)
    listing = ask(registry, ListActive(), timeout=300)
    elapsed = time.perf_counter() - started
    replayed = queue.proxy().recovered_events.get() + registry.proxy().recovered_events.get()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # no clean stop: a clean stop would write a snapshot and change what the next run measures
    print(
        json.dumps(
            {
                "rebuild_s": round(elapsed, 3),
                "replayed": replayed,
                "rss_mb": round(rss_mb, 1),
                "pending": stats.pending,
                "active": len(listing.registry),
            }
        ),
        flush=True,
    )


def _run_child(data_dir: str, with_snapshots: bool) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", data_dir, *(["--snapshots"] if with_snapshots else [])],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--contracts", type=int, default=10_000)
    parser.add_argument("--keep", help="build the log in this directory (reused if it already holds one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--snapshots", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.snapshots)
        return
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    with tempfile.TemporaryDirectory(prefix="slotwise-bench-recovery-") as tmp:
        data_dir = args.keep or tmp
        built: dict[str, Any] = {}
        if not os.path.exists(os.path.join(data_dir, "events")):
            built = build(data_dir, args.events, args.contracts)
        full = _run_child(data_dir, with_snapshots=False)
        snap = _run_child(data_dir, with_snapshots=True)
    result = {
        "benchmark": "recovery",
        "events": built.get("events", full["replayed"]),
        "contracts": args.contracts,
        "replay_s": full["rebuild_s"],
        "replay_with_snapshot_s": snap["rebuild_s"],
        "replayed_with_snapshot": snap["replayed"],
        "peak_rss_mb": max(full["rss_mb"], snap["rss_mb"]),
        "pending_after_rebuild": full["pending"],
        "active_after_rebuild": full["active"],
        **{k: v for k, v in built.items() if k != "events"},
        "targets": {"replay_s": 5, "replay_with_snapshot_s": 0.5, "peak_rss_mb": 1000},
    }
    assert snap["pending"] == full["pending"], (snap, full)
    assert snap["active"] == full["active"], (snap, full)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {value}")


if __name__ == "__main__":
    main()
