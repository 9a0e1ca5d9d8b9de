"""Streaming tick path: fake IB -> StreamRouter -> HandlerSet -> PositionWriter (and a latency probe).

What it measures, in one process, with the runtime's own actors:

1. ``ticks_per_s`` -- the maximum: ``--streams`` contracts stream, then the
   fake IB pushes ``--ticks`` ticks (``PushTicks``) as fast as it can; the
   clock stops when the PositionWriter has received them all
   (``WriterStats.updates_received``). The writer commits its coalesced rows
   to Delta on its own timer meanwhile, as in production.
2. ``p99_latency_ms`` (and p50/max) -- at ``--offered`` ticks/s for
   ``--latency-s`` seconds: a pacer pushes one round of ticks at a time; a
   latency probe registered in the HandlerSet, next to the writer, records
   ``now - MarketUpdate.ts_us`` for each tick (the fake stamps ``ts_us``
   when it creates the tick), i.e. fake -> router -> handler. The probe is
   added only for this run, so the throughput run has exactly the
   production handlers (the writer).
3. ``peak_rss_mb`` -- the process's peak resident set size.
4. ``pykka_two_hop_ceiling_per_s`` -- context: messages/s through two hops of
   trivial pykka actors in the same process. The tick path has that shape,
   and profiling (py-spy) shows most of its time in the mailboxes' locks
   (``queue.Queue`` under the GIL), so this is what bounds ``ticks_per_s``
   on the machine at hand; compare the two, not just the absolute figure.

Targets: ticks_per_s >= 100000, p99_latency_ms <= 10.

Usage: python benchmarks/ticks.py [--json] [--streams N] [--ticks N] [--offered N] [--latency-s S]
"""

from __future__ import annotations

import sys
from pathlib import Path

# this folder holds queue.py: drop it from the path before anything imports the stdlib queue
sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent
]

import argparse
import json
import resource
import tempfile
import threading
import time
from typing import Any

import pykka
from loguru import logger

from actors.fake_ib import FakeIbActor, FakeIbSettings, PushTicks, demo_positions
from actors.handlers import HandlerSet
from actors.ib_base import AddSubscriber
from actors.messaging import ask
from actors.position_writer import PositionWriter
from actors.queue import QueueActor
from actors.router import RouterSettings, RouterStatus, StreamRouter
from events.ib import Connect, IbStats, MarketUpdate, MarketUpdates, PositionChanged
from events.positions import WriterStats
from events.registry import ContractActivated
from storage.event_log import EventLog
from storage.positions_table import PositionsConfig
from storage.tables import LogConfig


class LatencyProbe(pykka.ThreadingActor):
    """A handler that records how old each MarketUpdate is when it arrives (microseconds)."""

    def __init__(self) -> None:
        super().__init__()
        self.samples: list[int] = []
        self.recording = False

    def on_receive(self, message: Any) -> Any:
        if type(message) is MarketUpdates:
            if self.recording:
                now = time.time_ns() // 1000
                self.samples.extend(now - update.ts_us for update in message.updates)
            return None
        if type(message) is MarketUpdate:
            if self.recording:
                self.samples.append(time.time_ns() // 1000 - message.ts_us)
            return None
        if message == "start":
            self.samples = []
            self.recording = True
            return None
        if message == "stop":
            self.recording = False
            return list(self.samples)
        return None


class _Forward(pykka.ThreadingActor):
    """Ceiling probe: forwards every message, doing nothing else."""

    def __init__(self, to: pykka.ActorRef[Any] | None, n: int = 0, done: threading.Event | None = None) -> None:
        super().__init__()
        self.to, self.n, self.done, self.seen = to, n, done, 0

    def on_receive(self, message: Any) -> Any:
        if self.to is not None:
            self.to.tell(message)
            return None
        self.seen += 1
        if self.seen == self.n and self.done is not None:
            self.done.set()
        return None


def pykka_ceiling(n: int) -> float:
    """Messages/s through two pykka hops with trivial actors: what the mailboxes alone allow on this machine.

    The tick path has the same shape (fake IB -> router -> writer), so this is its upper bound here.
    """
    done = threading.Event()
    sink = _Forward.start(None, n, done)
    hop = _Forward.start(sink)
    start = time.perf_counter()
    for i in range(n):
        hop.tell(i)
    done.wait(120)
    rate = n / (time.perf_counter() - start)
    hop.stop()
    sink.stop()
    return rate


def _percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return float(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))])


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.005)


def run(streams: int, ticks: int, offered: int, latency_s: float) -> dict[str, Any]:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    positions = demo_positions(max(streams, 10), 0, seed=7)[:streams]
    with tempfile.TemporaryDirectory(prefix="slotwise-ticks-") as tmp:
        log = EventLog.open(tmp, config=LogConfig(maintenance=False))
        try:
            ib = FakeIbActor.start(FakeIbSettings(positions=positions, line_limit=streams + 10))
            queue = QueueActor.start(log)
            writer = PositionWriter.start(tmp, PositionsConfig(flush_interval_s=1.0))
            probe = LatencyProbe.start()
            handlers = HandlerSet()
            handlers.add(writer, accepts=(MarketUpdate, PositionChanged), batches=True)  # as runtime.py wires it
            settings = RouterSettings(max_lines=streams + 10, min_snapshot_lines=10, monitoring_s=3600)
            router = StreamRouter.start(log, settings, ib=ib, queue=queue, handlers=handlers, timer=False)
            ib.tell(AddSubscriber(router))
            ib.tell(Connect())
            for p in positions:
                router.tell(ContractActivated(conid=p.conid, strategy="bench"))
            _wait(lambda: ask(ib, IbStats()).streams == streams, 30, "every stream to open")
            _wait(lambda: ask(router, RouterStatus()).streams == streams, 30, "the router")

            # 1. maximum throughput
            rounds = max(1, ticks // streams)
            total = rounds * streams
            base = ask(writer, WriterStats()).updates_received
            start = time.perf_counter()
            ib.tell(PushTicks(n=rounds))
            _wait(lambda: ask(writer, WriterStats()).updates_received >= base + total, 300, "the writer")
            elapsed = time.perf_counter() - start
            ticks_per_s = total / elapsed

            # 2. latency at the offered rate: one round of `streams` ticks every streams/offered seconds;
            # the probe joins the handlers only now, so the throughput run is the production path alone
            handlers.add(probe, accepts=(MarketUpdate,), batches=True)
            period = streams / offered
            probe.tell("start")
            base = ask(writer, WriterStats()).updates_received
            sent = 0
            next_at = time.perf_counter()
            end = next_at + latency_s
            while next_at < end:
                ib.tell(PushTicks(n=1))
                sent += streams
                next_at += period
                pause = next_at - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
            _wait(lambda: ask(writer, WriterStats()).updates_received >= base + sent, 60, "the writer to catch up")
            samples = sorted(probe.ask("stop"))
            rows = ask(writer, WriterStats()).rows_written
        finally:
            pykka.ActorRegistry.stop_all(timeout=30)
            log.close()
    ceiling = pykka_ceiling(min(total, 200_000))
    return {
        "ticks_per_s": round(ticks_per_s),
        "pykka_two_hop_ceiling_per_s": round(ceiling),
        "ticks": total,
        "throughput_s": round(elapsed, 3),
        "streams": streams,
        "offered_ticks_per_s": offered,
        "latency_samples": len(samples),
        "p50_latency_ms": round(_percentile(samples, 0.50) / 1000, 3),
        "p99_latency_ms": round(_percentile(samples, 0.99) / 1000, 3),
        "max_latency_ms": round(samples[-1] / 1000, 3) if samples else None,
        "positions_rows_written": rows,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "targets": {"ticks_per_s": 100_000, "p99_latency_ms": 10},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--ticks", type=int, default=500_000)
    parser.add_argument("--offered", type=int, default=10_000, help="ticks/s offered in the latency run")
    parser.add_argument("--latency-s", type=float, default=5.0)
    args = parser.parse_args()
    result = run(args.streams, args.ticks, args.offered, args.latency_s)
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:24} {value}")


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
