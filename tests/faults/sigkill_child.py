"""Child process of the SIGKILL restart test: runs the registry and the queue against a real log.

    python -m tests.faults.sigkill_child DATA_DIR DUMP_FILE

Phase 1 builds a history (registry legs added and removed; queue items
enqueued, claimed, succeeded, failed, released, re-enqueued while in
flight) and waits for every reply, so everything it did is durable and
nothing else is in flight but the claimed work. It then writes the durable
state dumps to DUMP_FILE and prints ``READY <seq>``.

Phase 2 keeps writing (registry legs and queue items of contracts from
1,000,000 up, each waited for) and prints ``PHASE2 <n>`` after each, until
the test kills the process with SIGKILL -- mid-commit, as likely as not.
"""

from __future__ import annotations

import json
import os
import sys

from loguru import logger

from actors.messaging import ask
from actors.queue import QueueActor
from actors.registry import RegistryActor
from events.queue import Claim, Enqueue, EnqueueMany, Fail, Release, Succeed
from events.registry import AddActive, AddActiveMany, RemoveActive
from storage.event_log import EventLog
from storage.snapshots import SnapshotStore
from storage.tables import LogConfig

LATE = 1_000_000


def main(data_dir: str, dump_file: str) -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    log = EventLog.open(data_dir, config=LogConfig(flush_ms=2.0, maintenance=False))
    snaps = SnapshotStore(data_dir)
    registry = RegistryActor.start(log, snaps, snapshot_every=40)
    queue = QueueActor.start(log, snaps, snapshot_every=50)

    ask(
        registry,
        AddActiveMany(items=[AddActive(conid=c, strategy=f"s{c % 3}", expected_quantity=c) for c in range(1, 61)]),
    )
    for conid in range(1, 61, 5):
        ask(registry, AddActive(conid=conid, strategy="hedge"))
    for conid in range(1, 61, 7):
        ask(registry, RemoveActive(conid=conid, strategy=f"s{conid % 3}"))

    ask(queue, EnqueueMany(items=[Enqueue(conid=c, priority=1 + c % 2, reason="position") for c in range(100, 300)]))
    claimed = ask(queue, Claim(n=80, lease_s=600)).items
    ask(queue, Succeed(item_ids=[c.item_id for c in claimed[:30]]))
    for item in claimed[30:40]:
        ask(queue, Fail(item_id=item.item_id, error="no market data", code=354))
    ask(queue, Release(item_ids=[c.item_id for c in claimed[40:45]], reason="disconnected"))
    # contracts still in flight get a new waiting item beside the processing one
    ask(queue, EnqueueMany(items=[Enqueue(conid=c.conid, priority=1) for c in claimed[45:55]]))
    ask(queue, Claim(n=20, lease_s=600))  # more work in flight at the kill

    seq = log.durable_seq
    dumps = {
        "seq": seq,
        "registry": registry.proxy().state.get(timeout=10).dump().decode(),
        "queue": queue.proxy().state.get(timeout=10).dump().decode(),
    }
    tmp = dump_file + ".tmp"
    with open(tmp, "w") as out:
        json.dump(dumps, out)
    os.replace(tmp, dump_file)
    print(f"READY {seq}", flush=True)

    n = 0
    while True:
        n += 1
        ask(registry, AddActive(conid=LATE + n, strategy="late"))
        ask(queue, Enqueue(conid=LATE + n))
        print(f"PHASE2 {n}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
