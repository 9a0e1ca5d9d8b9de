"""Restart after a real SIGKILL: registry and queue rebuilt from snapshot + replay equal the durable state.

A child process (``tests/faults/sigkill_child.py``) builds a history with
claimed work in flight, writes its durable state dumps, and keeps writing
until this test kills it with SIGKILL. The test then checks, in-process:

* snapshot + replay up to the dumped seq gives byte-identical dumps;
* a normal restart (snapshot + replay of everything) keeps that state for
  phase-1 contracts, with every in-flight item back to PENDING, and keeps
  a contiguous prefix of what phase 2 was writing when it died;
* the log itself is intact: seqs 1..N without a gap.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pykka

from actors.queue import QueueActor, QueueState
from actors.queue_state import PENDING
from actors.registry import RegistryActor, RegistryState
from storage.event_log import EventLog
from storage.snapshots import SnapshotStore
from tests.conftest import TEST_LOG_CONFIG
from tests.faults.runtime_proc import expected_queue_after_restart

ROOT = Path(__file__).resolve().parents[2]
LATE = 1_000_000


def _lines(proc: subprocess.Popen[str]) -> tuple[queue.Queue[str], threading.Thread]:
    out: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.put(line.strip())
        out.put("EOF")

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return out, thread


def _wait_for(lines: queue.Queue[str], prefix: str, timeout: float = 60) -> str:
    while True:
        line = lines.get(timeout=timeout)
        assert line != "EOF", f"child exited before printing {prefix!r}"
        if line.startswith(prefix):
            return line


def _rebuild(log: EventLog, snaps: SnapshotStore, stream: str, state_type: Any, upto: int) -> Any:
    snap = snaps.latest(stream, at_or_before=upto)
    state = state_type.load(snap.state) if snap else state_type()
    for stored in log.read(streams=[stream], from_seq=(snap.seq + 1) if snap else 1, to_seq=upto):
        state.apply(stored.event)
    return state


def test_state_survives_sigkill_with_work_in_flight(data_dir: Path) -> None:
    dump_file = data_dir.parent / "dump.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.faults.sigkill_child", str(data_dir), str(dump_file)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines, pump = _lines(proc)
    try:
        ready_seq = int(_wait_for(lines, "READY").split()[1])
        _wait_for(lines, "PHASE2 3")  # phase 2 is writing: kill it in the middle of that
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pump.join(timeout=10)  # EOF once the child is gone
        assert proc.stdout is not None
        proc.stdout.close()
    dumps = json.loads(dump_file.read_text())
    assert dumps["seq"] == ready_seq
    registry_dump, queue_dump = dumps["registry"].encode(), dumps["queue"].encode()
    in_flight = {it.item_id for it in QueueState.load(queue_dump).processing_items()}
    assert len(in_flight) >= 20

    log = EventLog.open(data_dir, config=TEST_LOG_CONFIG)  # the kernel dropped the dead writer's lock
    snaps = SnapshotStore(str(data_dir))
    try:
        seqs = [s.seq for s in log.read()]
        assert seqs == list(range(1, log.last_seq + 1))  # no gap, nothing torn
        assert log.last_seq > ready_seq

        # 1. snapshot + replay up to the dumped seq: byte-identical
        assert _rebuild(log, snaps, "registry", RegistryState, ready_seq).dump() == registry_dump
        assert _rebuild(log, snaps, "queue", QueueState, ready_seq).dump() == queue_dump

        # 2. a normal restart: phase-1 state kept, in-flight work back to PENDING, phase 2 a clean prefix
        registry = RegistryActor.start(log, snaps).proxy()
        queue_proxy = QueueActor.start(log, snaps).proxy()
        reg_state: RegistryState = registry.state.get(timeout=30)
        q_state: QueueState = queue_proxy.state.get(timeout=30)
        q_state.check_invariants()

        reg_json = reg_state.to_json()
        assert {k: v for k, v in reg_json.items() if int(k) < LATE} == RegistryState.load(registry_dump).to_json()
        late = sorted(int(k) - LATE for k in reg_json if int(k) >= LATE)
        assert late == list(range(1, len(late) + 1))
        assert len(late) >= 3

        expected = expected_queue_after_restart(queue_dump)
        early_rows = [q_state.items[i].row() for i in sorted(q_state.items) if q_state.items[i].conid < LATE]
        assert early_rows == [expected.items[i].row() for i in sorted(expected.items)]
        assert q_state.processing_items() == []
        assert all(q_state.items[i].status == PENDING for i in in_flight if i in q_state.items)
        late_items = sorted(it.conid - LATE for it in q_state.items.values() if it.conid >= LATE)
        assert late_items == list(range(1, len(late_items) + 1))
    finally:
        pykka.ActorRegistry.stop_all(timeout=10)
        log.close()
