"""The queue across stops: a clean stop counts nothing, a crash counts the attempt in flight, leases expire alone.

A crash is what the log holds when the runtime died with work claimed: the
item's last event is its ``ItemClaimed``. The tests append exactly that (no
actor running), then start the queue on the log, as a restart would.
"""

from __future__ import annotations

from typing import Any

import pykka
import pytest

from actors.messaging import ask
from actors.queue import CRASHED_IN_FLIGHT, QueueActor
from actors.queue_state import FAILED, PENDING, PROCESSING, QueueState
from events.base import Event
from events.queue import Claim, Enqueue, ItemClaimed, ItemEnqueued, ItemReleased
from storage.event_log import EventLog
from tests.support import wait_until

CONID = 7
FAR = 10**16  # a lease that never runs out by itself in these tests


def _store(log: EventLog, *events: Event) -> None:
    for event in events:
        log.append(event, stream="queue", key=str(CONID))
    log.flush()


def _restart(log: EventLog, **kwargs: Any) -> QueueState:
    """Start the queue on the log (recovery runs), read its state, stop it cleanly."""
    ref = QueueActor.start(log, max_attempts=3, **kwargs)
    try:
        return ref.proxy().state.get(timeout=10)
    finally:
        ref.stop(timeout=10)


def test_a_clean_stop_gives_work_back_without_counting_an_attempt(event_log: EventLog) -> None:
    ref = QueueActor.start(event_log, max_attempts=3)
    ask(ref, Enqueue(conid=CONID))
    assert [c.conid for c in ask(ref, Claim(n=1, lease_s=3600)).items] == [CONID]
    ref.stop(timeout=10)
    released = [s.event for s in event_log.read(streams=["queue"]) if isinstance(s.event, ItemReleased)]
    assert [(e.reason, e.detail) for e in released] == [("restart", "clean stop")]
    item = next(iter(_restart(event_log).items.values()))
    assert (item.status, item.failures) == (PENDING, 0)


def test_a_contract_in_flight_at_every_crash_dead_letters_after_max_attempts(event_log: EventLog) -> None:
    _store(event_log, ItemEnqueued(item_id=1, conid=CONID, priority=2, enqueued_us=1))
    for attempt in (1, 2, 3):
        _store(event_log, ItemClaimed(item_id=1, conid=CONID, attempt=attempt, lease_until_us=FAR))
        state = _restart(event_log)
        item = state.items[1]
        assert item.failures == attempt
        assert item.last_error == CRASHED_IN_FLIGHT
        assert item.status == (FAILED if attempt == 3 else PENDING)
    assert state.processing_items() == []


def test_a_waiting_item_merges_into_the_crashed_one_so_the_count_is_kept(event_log: EventLog) -> None:
    _store(
        event_log,
        ItemEnqueued(item_id=1, conid=CONID, priority=2, enqueued_us=1),
        ItemClaimed(item_id=1, conid=CONID, attempt=2, lease_until_us=FAR),
        ItemEnqueued(item_id=2, conid=CONID, priority=1, enqueued_us=2),  # asked for while item 1 was in flight
    )
    state = _restart(event_log)
    assert list(state.items) == [1]
    assert (state.items[1].failures, state.items[1].priority) == (2, 1)


def test_leases_expire_on_their_own_timer(event_log: EventLog) -> None:
    ref = QueueActor.start(event_log, lease_check_s=0.05)
    ask(ref, Enqueue(conid=CONID))
    assert len(ask(ref, Claim(n=1, lease_s=0.2)).items) == 1
    proxy = ref.proxy()

    def returned() -> bool:
        items = proxy.state.get(timeout=5).items
        return [(i.status, i.failures) for i in items.values()] == [(PENDING, 0)]

    wait_until(returned, timeout=10, what="the expired lease to return the item without a Claim")  # no Claim sent


@pytest.mark.parametrize("clock_injected", [True, False])
def test_the_timer_is_on_with_the_wall_clock_and_off_when_a_test_drives_time(
    event_log: EventLog, clock_injected: bool
) -> None:
    kwargs: dict[str, Any] = {"clock": lambda: 1} if clock_injected else {}
    proxy = QueueActor.start(event_log, **kwargs).proxy()
    assert proxy.lease_check_s.get(timeout=5) == (0.0 if clock_injected else 1.0)
    pykka.ActorRegistry.stop_all(timeout=10)


def test_processing_is_what_a_crash_leaves(event_log: EventLog) -> None:
    """Guards the premise of the crash tests: appending ItemClaimed leaves the item PROCESSING in the log."""
    _store(
        event_log,
        ItemEnqueued(item_id=1, conid=CONID, priority=2, enqueued_us=1),
        ItemClaimed(item_id=1, conid=CONID, attempt=1, lease_until_us=FAR),
    )
    state = QueueState()
    for stored in event_log.read(streams=["queue"]):
        state.apply(stored.event)
    assert state.items[1].status == PROCESSING
