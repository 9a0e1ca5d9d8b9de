"""The whole runtime under process faults: SIGKILL at random moments, SIGTERM, a second runtime.

Each SIGKILL round starts ``python runtime.py --demo`` on the same data
directory (so every round after the first is a restart after a crash),
checks that the restarted registry equals the durable state the previous
kill left, changes the registry over the control socket while the demo
runs, and SIGKILLs the process at a random moment -- sometimes before it
even finished recovering. After each kill:

* ``verify`` passes: seqs 1..N without gap or duplicate, the hash chain
  intact, every payload decodes, every snapshot equals a replay;
* every registry change acknowledged over the socket before the kill is in
  the log (and nothing acknowledged as removed came back);
* replay with snapshots equals replay without them, and the queue's
  invariants hold;
* a restart of the registry and queue actors on the log gives the durable
  registry, the same queue items, and every PROCESSING item back to PENDING.

The normal suite runs 3 rounds; ``--soak`` runs 20.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pykka
import pytest

from actors.control import ControlUnavailable
from actors.queue import QueueActor
from actors.queue_state import PENDING, PROCESSING
from actors.registry import RegistryActor
from storage.event_log import EventLog
from storage.replay import replay
from storage.snapshots import SnapshotStore
from storage.verify import verify_data_dir
from tests.conftest import TEST_LOG_CONFIG
from tests.faults.runtime_proc import (
    RuntimeProcess,
    expected_queue_after_restart,
    queue_rows,
    registry_listing,
)

EXIT_OK, EXIT_FAILED = 0, 1


class RegistryChurn:
    """Adds and removes registry legs over the control socket until the process dies.

    ``acked`` maps (conid, strategy) to whether the leg must be present: only
    operations whose ``ok`` answer arrived are recorded; the one in flight at
    the kill is ``ambiguous`` and not checked.
    """

    def __init__(self, proc: RuntimeProcess, round_no: int, rng: random.Random) -> None:
        self.proc = proc
        self.strategy = f"kill-{round_no}"
        self.base = 7_000_000 + round_no * 100_000
        self.rng = random.Random(rng.random())
        self.acked: dict[int, bool] = {}
        self.ambiguous: set[int] = set()
        self._thread = threading.Thread(target=self._run, name="registry-churn", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join(30)
        assert not self._thread.is_alive()

    def _run(self) -> None:
        try:
            client = self.proc.client(timeout=30)
        except ControlUnavailable:
            return
        n = 0
        with client:
            while True:
                present = [c for c, on in self.acked.items() if on]
                if present and self.rng.random() < 0.2:
                    conid, kind, on = self.rng.choice(present), "registry.remove_active", False
                else:
                    n += 1
                    conid, kind, on = self.base + n, "registry.add_active", True
                self.ambiguous.add(conid)
                try:
                    answer = client.call({"type": kind, "conid": conid, "strategy": self.strategy})
                except (OSError, ValueError):
                    return  # killed mid-request: this one stays ambiguous
                assert answer["ok"], answer
                self.ambiguous.discard(conid)
                self.acked[conid] = on


def _check_after_kill(data_dir: Path, churn: RegistryChurn | None) -> dict[str, list[str]]:
    """Every check of one round; returns the durable registry for the next round to compare with."""
    report = verify_data_dir(str(data_dir))
    assert report.ok, report

    durable = replay(str(data_dir), use_snapshots=False)
    with_snapshots = replay(str(data_dir))
    assert with_snapshots.seq == durable.seq == report.last_seq
    assert with_snapshots.registry.to_json() == durable.registry.to_json()
    assert with_snapshots.queue.dump() == durable.queue.dump()
    durable.queue.check_invariants()

    registry = {k: sorted(v) for k, v in durable.registry.to_json().items()}
    if churn is not None:
        for conid, present in churn.acked.items():
            if conid in churn.ambiguous:
                continue
            has = churn.strategy in registry.get(str(conid), [])
            assert has == present, f"acknowledged {'add' if present else 'remove'} of {conid} lost"

    # restart the event-sourced actors on the log: the runtime's recovery path
    queue_dump = durable.queue.dump()
    in_flight = {it.item_id for it in durable.queue.items.values() if it.status == PROCESSING}
    log = EventLog.open(data_dir, config=TEST_LOG_CONFIG)
    snaps = SnapshotStore(str(data_dir))
    try:
        reg = RegistryActor.start(log, snaps).proxy()
        queue = QueueActor.start(log, snaps).proxy()
        assert {k: sorted(v) for k, v in reg.state.get(timeout=60).to_json().items()} == registry
        state = queue.state.get(timeout=60)
        state.check_invariants()
        assert state.processing_items() == []
        assert all(state.items[i].status == PENDING for i in in_flight if i in state.items)
        assert queue_rows(state) == queue_rows(expected_queue_after_restart(queue_dump))
    finally:
        pykka.ActorRegistry.stop_all(timeout=30)
        log.close()
    return registry


def _sigkill_rounds(data_dir: Path, rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    expected_registry: dict[str, list[str]] | None = None
    acked_total = 0
    for round_no in range(1, rounds + 1):
        proc = RuntimeProcess(data_dir, "--demo", "--duration", "300", name=f"round{round_no}")
        churn: RegistryChurn | None = None
        try:
            # a quarter of the rounds die while starting (opening, verifying, recovering)
            early = rng.random() < 0.25
            kill_at = time.monotonic() + (rng.uniform(0.2, 2.5) if early else 60)
            if not early:
                assert proc.wait_ready(60), proc.stderr()[-3000:]
                if expected_registry:
                    assert registry_listing(proc) == expected_registry, f"round {round_no}: registry after restart"
                churn = RegistryChurn(proc, round_no, rng)
                churn.start()
                kill_at = time.monotonic() + rng.uniform(0.1, 2.5)
            time.sleep(max(0.0, kill_at - time.monotonic()))
            assert proc.proc.poll() is None, f"round {round_no}: runtime exited by itself:\n{proc.stderr()[-3000:]}"
            proc.kill()
        finally:
            proc.cleanup()
        if churn is not None:
            churn.join()
            acked_total += len(churn.acked)
        expected_registry = _check_after_kill(data_dir, churn)
    assert acked_total >= rounds, "too few acknowledged changes to prove anything"


def test_sigkill_runtime_at_random_moments(data_dir: Path) -> None:
    _sigkill_rounds(data_dir, rounds=3, seed=7)


@pytest.mark.soak
@pytest.mark.timeout(1800)  # 20 rounds of start, churn, kill and full checks: far past the suite's 120 s
def test_sigkill_runtime_soak(data_dir: Path) -> None:
    _sigkill_rounds(data_dir, rounds=20, seed=20261121)


def test_second_runtime_refused_then_sigterm_stops_cleanly(data_dir: Path) -> None:
    first = RuntimeProcess(data_dir, "--demo", "--duration", "300", name="first")
    try:
        assert first.wait_ready(60), first.stderr()[-3000:]
        started = time.monotonic()
        second = RuntimeProcess(data_dir, "--demo", "--duration", "300", name="second")
        try:
            assert second.wait(30) == EXIT_FAILED
        finally:
            second.cleanup()
        assert time.monotonic() - started < 15, "the second runtime was not refused at once"
        message = second.stderr()
        assert "in use by another Slotwise process" in message, message
        assert f"pid {first.pid}" in message, message
        # the refused runtime touched nothing: the first still serves its socket
        assert first.call({"type": "status"})["ok"]

        assert first.terminate(60) == EXIT_OK, first.stderr()[-3000:]
    finally:
        first.cleanup()
    report = verify_data_dir(str(data_dir))
    assert report.ok, report
    assert report.snapshots_checked >= 1  # a clean stop snapshots registry and queue
    assert not (data_dir / "slotwise.sock").exists()
