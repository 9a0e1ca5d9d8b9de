"""SIGKILL a process appending from 4 threads at random moments; nothing acknowledged may be lost."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from storage.reader import read_events
from storage.verify import verify_log
from tests.faults.crash_probe import CrashProbe

CHILD = Path(__file__).with_name("log_crash_child.py")
ROUNDS = 10


def _run_and_kill(data_dir: Path, round_no: int, rng: random.Random) -> list[tuple[int, int, int]]:
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(data_dir), str(round_no)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    acked: list[tuple[int, int, int]] = []
    ready = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("ready"):
                ready.set()
            elif line.startswith("ack "):
                _, thread, n, seq = line.split()
                acked.append((int(thread), int(n), int(seq)))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    assert ready.wait(60), "child never opened the log"
    time.sleep(rng.uniform(0.05, 1.2))  # a random moment in the middle of appends and commits
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    t.join(10)
    proc.stdout.close()
    return acked


def test_sigkill_during_appends_loses_nothing_acknowledged(data_dir: Path) -> None:
    rng = random.Random(20261121)
    all_acked: list[tuple[int, int, int]] = []
    for round_no in range(1, ROUNDS + 1):
        all_acked.extend(_run_and_kill(data_dir, round_no, rng))
        uri = str(data_dir / "events")
        report = verify_log(uri)
        assert report.ok, f"round {round_no}: {report}"
        stored = {}
        seen = Counter()
        for e in read_events(uri):
            assert isinstance(e.event, CrashProbe)
            seen[(e.event.thread, e.event.n)] += 1
            stored[(e.event.thread, e.event.n)] = e.seq
        assert all(count == 1 for count in seen.values()), "an event was stored twice"
        for thread, n, seq in all_acked:
            assert stored.get((thread, n)) == seq, (
                f"round {round_no}: acknowledged ({thread}, {n}) at seq {seq} missing"
            )
    assert len(all_acked) > ROUNDS * 50, "the child acknowledged too little to prove anything"
