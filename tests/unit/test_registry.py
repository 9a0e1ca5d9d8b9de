"""The Registry actor: active contracts, validation, durable-then-tell subscribers, rebuild on restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pykka
import pytest
from loguru import logger

from actors.messaging import CommandRejected, ask
from actors.registry import RegistryActor, RegistryState
from events.commands import CommandError, decode_command
from events.queue import Enqueue, EnqueueMany
from events.registry import (
    AddActive,
    AddActiveMany,
    ContractActivated,
    ContractDeactivated,
    LegAdded,
    LegRemoved,
    ListActive,
    RegistryBatchChanged,
    RemoveActive,
    RemoveActiveMany,
)
from storage.event_log import EventLog
from storage.snapshots import SnapshotStore
from tests.conftest import TEST_LOG_CONFIG


def stored(log: EventLog) -> list[tuple[str, Any]]:
    log.flush()
    return [(s.type, s.event) for s in log.read(streams=["registry"])]


class Recorder(pykka.ThreadingActor):
    """Records every message with the log's durable seq at the moment it arrived."""

    def __init__(self, log: EventLog) -> None:
        super().__init__()
        self.log = log
        self.seen: list[tuple[Any, int]] = []

    def on_receive(self, message: Any) -> None:
        self.seen.append((message, self.log.durable_seq))

    def messages(self) -> list[tuple[Any, int]]:
        return list(self.seen)


def test_add_activates_and_is_queryable_through_the_proxy(event_log: EventLog) -> None:
    ref = RegistryActor.start(event_log)
    reply = ask(ref, AddActive(conid=265598, strategy="momentum", expected_quantity=100.0))
    assert (reply.changed, reply.active) == (True, True)
    proxy = ref.proxy()
    assert proxy.is_active(265598).get(timeout=5)
    assert not proxy.is_active(1).get(timeout=5)
    assert proxy.strategies_of(265598).get(timeout=5) == {"momentum"}
    assert proxy.expected_quantity(265598, "momentum").get(timeout=5) == 100.0
    assert proxy.all_active().get(timeout=5) == {265598}
    assert [t for t, _ in stored(event_log)] == ["registry.leg_added", "registry.contract_activated"]
    assert event_log.durable_seq >= 2  # the reply came after both events were durable


def test_same_pair_twice_logs_once_and_quantity_change_logs_an_update(event_log: EventLog) -> None:
    ref = RegistryActor.start(event_log)
    ask(ref, AddActive(conid=7, strategy="a", expected_quantity=1.0))
    again = ask(ref, AddActive(conid=7, strategy="a", expected_quantity=1.0))
    assert not again.changed
    assert again.detail == "already in strategy"
    assert len(stored(event_log)) == 2
    update = ask(ref, AddActive(conid=7, strategy="a", expected_quantity=5.0))
    assert update.changed
    assert update.detail == "expected_quantity updated"
    events = stored(event_log)
    assert [t for t, _ in events] == ["registry.leg_added", "registry.contract_activated", "registry.leg_added"]
    assert ref.proxy().expected_quantity(7, "a").get(timeout=5) == 5.0


def test_active_while_any_strategy_holds_it(event_log: EventLog) -> None:
    ref = RegistryActor.start(event_log)
    ask(ref, AddActive(conid=9, strategy="a"))
    ask(ref, AddActive(conid=9, strategy="b"))
    first = ask(ref, RemoveActive(conid=9, strategy="a"))
    assert (first.changed, first.active) == (True, True)
    last = ask(ref, RemoveActive(conid=9, strategy="b"))
    assert (last.changed, last.active) == (True, False)
    types = [t for t, _ in stored(event_log)]
    assert types == [
        "registry.leg_added",
        "registry.contract_activated",
        "registry.leg_added",
        "registry.leg_removed",
        "registry.leg_removed",
        "registry.contract_deactivated",
    ]


def test_removing_an_absent_pair_logs_nothing(event_log: EventLog) -> None:
    ref = RegistryActor.start(event_log)
    reply = ask(ref, RemoveActive(conid=11, strategy="a"))
    assert not reply.changed
    assert reply.detail == "not in strategy"
    assert event_log.last_seq == 0


@pytest.mark.parametrize(
    ("command", "field"),
    [
        (AddActive(conid=-5, strategy="a"), "conid"),
        (AddActive(conid=0, strategy="a"), "conid"),
        (AddActive(conid=True, strategy="a"), "conid"),
        (AddActive(conid=1, strategy=""), "strategy"),
        (AddActive(conid=1, strategy="x" * 65), "strategy"),
        (RemoveActive(conid=1, strategy=" lead"), "strategy"),
        (AddActiveMany(items=[AddActive(conid=1, strategy="a"), AddActive(conid=-1, strategy="a")]), "items[1].conid"),
    ],
)
def test_bad_input_is_refused_with_the_field_and_leaves_no_trace(event_log: EventLog, command: Any, field: str) -> None:
    ref = RegistryActor.start(event_log)
    ask(ref, ListActive())  # recovery's own log line is done before we listen
    lines: list[str] = []
    sink = logger.add(lines.append, level="TRACE")
    try:
        with pytest.raises(CommandRejected) as info:
            ask(ref, command)
    finally:
        logger.remove(sink)
    assert info.value.rejected.field == field
    assert info.value.rejected.code == "invalid"
    assert event_log.last_seq == 0
    assert lines == []


def test_decode_command_reads_control_lines_strictly() -> None:
    assert decode_command(b'{"type":"registry.add_active","conid":5,"strategy":"s"}') == AddActive(
        conid=5, strategy="s"
    )
    many = decode_command(b'{"type":"queue.enqueue_many","items":[{"conid":3}]}')
    assert many == EnqueueMany(items=[Enqueue(conid=3)])
    for raw, field in [
        (b'{"type":"registry.add_active","conid":5,"strategy":"s","bogus":1}', "bogus"),
        (b'{"type":"registry.add_active","conid":-5,"strategy":"s"}', "conid"),
        (b'{"type":"registry.remove_active","strategy":"s"}', "conid"),
        (b'{"type":"registry.nope"}', "type"),
        (b'{"type":"registry.add_active_many","items":[{"conid":1,"strategy":""}]}', "items[0].strategy"),
    ]:
        with pytest.raises(CommandError) as info:
            decode_command(raw)
        assert info.value.field == field, info.value
    with pytest.raises(CommandError):
        decode_command(b"{not json")


def test_subscribers_get_every_event_in_order_only_once_durable(event_log: EventLog) -> None:
    early = Recorder.start(event_log)
    ref = RegistryActor.start(event_log, subscribers=[early])
    ask(ref, AddActive(conid=1, strategy="a"))
    late = Recorder.start(event_log)
    ref.proxy().add_subscriber(late).get(timeout=5)
    ask(ref, AddActiveMany(items=[AddActive(conid=2, strategy="a"), AddActive(conid=1, strategy="b")]))
    ask(ref, RemoveActiveMany(items=[RemoveActive(conid=1, strategy="a"), RemoveActive(conid=1, strategy="b")]))
    log_events = stored(event_log)
    early_seen = early.proxy().messages().get(timeout=5)
    late_seen = late.proxy().messages().get(timeout=5)
    assert [m for m, _ in early_seen] == [e for _, e in log_events]
    assert [m for m, _ in late_seen] == [e for _, e in log_events][2:]  # only what came after it subscribed
    # every event arrived when the log had made at least that many events durable
    for position, (_, durable_at_receipt) in enumerate(early_seen, start=1):
        assert durable_at_receipt >= position
    kinds = [type(m) for m, _ in early_seen]
    assert kinds == [
        LegAdded,
        ContractActivated,
        LegAdded,
        ContractActivated,
        LegAdded,
        LegRemoved,
        LegRemoved,
        ContractDeactivated,
    ]


def test_batch_reply_has_one_result_per_item(event_log: EventLog) -> None:
    ref = RegistryActor.start(event_log)
    reply = ask(ref, AddActiveMany(items=[AddActive(conid=c, strategy="s") for c in (1, 2, 1)]))
    assert isinstance(reply, RegistryBatchChanged)
    assert [r.changed for r in reply.results] == [True, True, False]
    listing = ask(ref, ListActive())
    assert listing.registry == {"1": ["s"], "2": ["s"]}


def test_rebuilt_from_snapshot_and_replay_equals_state_before_stop(data_dir: Path) -> None:
    log = EventLog.open(data_dir, config=TEST_LOG_CONFIG)
    snaps = SnapshotStore(str(data_dir))
    ref = RegistryActor.start(log, snaps, snapshot_every=5)
    for conid in range(1, 30):
        ask(ref, AddActive(conid=conid, strategy=f"s{conid % 3}", expected_quantity=float(conid)))
    for conid in range(1, 30, 4):
        ask(ref, RemoveActive(conid=conid, strategy=f"s{conid % 3}"))
    before = ref.proxy().state.get(timeout=5).dump()
    pykka.ActorRegistry.stop_all(timeout=10)  # no clean-stop snapshot beyond the periodic ones is needed
    log.close()
    log = EventLog.open(data_dir, config=TEST_LOG_CONFIG)
    try:
        with_snap = RegistryActor.start(log, snaps).proxy()
        replay_only = RegistryActor.start(log).proxy()
        assert with_snap.state.get(timeout=10).dump() == before
        assert replay_only.state.get(timeout=10).dump() == before
        assert replay_only.recovered_events.get(timeout=5) == log.last_seq
        assert RegistryState.load(before).to_json() == with_snap.to_json().get(timeout=5)
    finally:
        pykka.ActorRegistry.stop_all(timeout=10)
        log.close()


def test_told_commands_are_applied_too(event_log: EventLog) -> None:
    ref = RegistryActor.start(event_log)
    ref.tell(AddActive(conid=3, strategy="cfg", source="config"))
    ref.tell(AddActive(conid=-3, strategy="cfg"))  # refused and logged: nobody to answer
    assert ask(ref, ListActive()).registry == {"3": ["cfg"]}
