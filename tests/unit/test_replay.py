"""Replay and verify over a real (small) Delta log: targets, snapshots, PROCESSING kept truthful.

The log is written by the production EventLog; the events are the ones the
registry and queue actors store. Nothing here starts an actor.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from actors.queue_state import QueueState
from actors.registry import RegistryState
from events.base import Event
from events.queue import ItemClaimed, ItemDeadLettered, ItemEnqueued, ItemRetryScheduled, ItemSucceeded
from events.registry import ContractActivated, LegAdded, LegRemoved
from storage.event_log import EventLog
from storage.reader import read_batches
from storage.replay import ReplayError, replay, seq_at
from storage.snapshots import SnapshotStore
from storage.tables import table_uri
from storage.verify import verify_data_dir
from tests.conftest import TEST_LOG_CONFIG

US = 1_800_000_000_000_000

#: (event, stream) in log order; seq = position + 1.
HISTORY: list[tuple[Event, str]] = [
    (LegAdded(conid=11, strategy="calendar-spy"), "registry"),  # 1
    (ContractActivated(conid=11, strategy="calendar-spy"), "registry"),  # 2
    (ItemEnqueued(item_id=1, conid=22, priority=2, reason="new position", enqueued_us=US), "queue"),  # 3
    (ItemEnqueued(item_id=2, conid=33, priority=2, reason="new position", enqueued_us=US), "queue"),  # 4
    (ItemClaimed(item_id=1, conid=22, attempt=1, lease_until_us=US + 60_000_000), "queue"),  # 5
    (ItemClaimed(item_id=2, conid=33, attempt=1, lease_until_us=US + 60_000_000), "queue"),  # 6
    (ItemSucceeded(item_id=1, conid=22), "queue"),  # 7
    (ItemRetryScheduled(item_id=2, conid=33, failures=1, not_before_us=US + 1, error="timeout"), "queue"),  # 8
    (ItemClaimed(item_id=2, conid=33, attempt=2, lease_until_us=US + 90_000_000), "queue"),  # 9
    (ItemDeadLettered(item_id=2, conid=33, failures=2, error="no security definition", code=200), "queue"),  # 10
    (LegAdded(conid=11, strategy="iron-condor-qqq"), "registry"),  # 11
    (LegRemoved(conid=11, strategy="calendar-spy"), "registry"),  # 12
]


def _write(data_dir: Path, history: list[tuple[Event, str]], *, pause_after: int | None = None) -> None:
    log = EventLog.open(data_dir, config=TEST_LOG_CONFIG)
    try:
        for n, (event, stream) in enumerate(history, start=1):
            log.append(event, stream=stream, key=str(event.conid))  # type: ignore[attr-defined]
            if n == pause_after:
                log.flush()
                time.sleep(0.05)  # a clear gap in ``ts`` for the --as-of tests
        log.flush()
    finally:
        log.close()


def _ts_of(data_dir: Path, seq: int) -> int:
    for batch in read_batches(table_uri(str(data_dir), "events"), from_seq=seq, to_seq=seq, columns=["ts"]):
        return batch.column("ts").cast("int64")[0].as_py()
    raise AssertionError(f"no seq {seq}")


@pytest.fixture
def logged(data_dir: Path) -> Path:
    _write(data_dir, HISTORY, pause_after=6)
    return data_dir


def test_replay_to_the_end(logged: Path) -> None:
    result = replay(str(logged)).to_json()
    assert result["seq"] == len(HISTORY)
    assert result["registry"] == {"11": ["iron-condor-qqq"]}
    queue = result["queue"]
    assert (queue["pending"], queue["processing"], queue["failed"]) == (0, 0, 1)
    [dead] = queue["items"]
    assert dead["status"] == "FAILED"
    assert (dead["conid"], dead["failures"], dead["code"], dead["last_error"]) == (33, 2, 200, "no security definition")


def test_replay_seq_is_the_state_after_that_event(logged: Path) -> None:
    at_6 = replay(str(logged), seq=6).to_json()
    assert at_6["seq"] == 6
    assert at_6["registry"] == {"11": ["calendar-spy"]}
    # claimed and not yet acknowledged at seq 6: the log says PROCESSING, and so does replay
    assert (at_6["queue"]["pending"], at_6["queue"]["processing"], at_6["queue"]["failed"]) == (0, 2, 0)
    assert {i["status"] for i in at_6["queue"]["items"]} == {"PROCESSING"}
    assert replay(str(logged), seq=0).to_json()["registry"] == {}


def test_replay_past_the_end_is_refused(logged: Path) -> None:
    with pytest.raises(ReplayError, match="ends at seq 12"):
        replay(str(logged), seq=13)
    with pytest.raises(ReplayError):
        replay(str(logged), seq=-1)


def test_as_of_is_the_last_event_at_or_before_that_time(logged: Path) -> None:
    ts6, ts7 = _ts_of(logged, 6), _ts_of(logged, 7)
    assert ts7 - ts6 >= 40_000  # the pause in the fixture
    between = (ts6 + ts7) // 2
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(between // 1_000_000)) + f".{between % 1_000_000:06d}+00:00"
    assert seq_at(str(logged), iso) == 6
    assert replay(str(logged), as_of=iso).seq == 6
    exact = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts6 // 1_000_000)) + f".{ts6 % 1_000_000:06d}Z"
    assert replay(str(logged), as_of=exact).seq == 6  # "at or before" includes the instant itself
    assert replay(str(logged), as_of="2000-01-01T00:00:00").seq == 0


def test_snapshots_change_nothing_but_the_work(logged: Path) -> None:
    store = SnapshotStore(str(logged))
    registry, queue = RegistryState(), QueueState()
    for event, stream in HISTORY[:9]:
        (registry if stream == "registry" else queue).apply(event)
    # both taken "at seq 9", a queue event: the registry snapshot names another stream's seq
    store.save("registry", 9, registry.dump())
    store.save("queue", 9, queue.dump())
    for seq in (5, 9, 10, 12):
        assert replay(str(logged), seq=seq).to_json() == replay(str(logged), seq=seq, use_snapshots=False).to_json()
    report = verify_data_dir(str(logged))
    assert report.ok, report.problem
    assert report.snapshots_checked == 2


def test_verify_names_a_snapshot_that_disagrees(logged: Path) -> None:
    wrong = RegistryState()
    wrong.apply(LegAdded(conid=99, strategy="never-there"))
    SnapshotStore(str(logged)).save("registry", 4, wrong.dump())
    report = verify_data_dir(str(logged))
    assert not report.ok
    assert report.first_bad_seq == 4
    assert "registry snapshot at seq 4 differs" in report.problem


def test_verify_names_a_snapshot_past_the_end(logged: Path) -> None:
    SnapshotStore(str(logged)).save("queue", 40, QueueState().dump())
    report = verify_data_dir(str(logged))
    assert not report.ok
    assert report.first_bad_seq == 40
    assert "past the end of the log" in report.problem
