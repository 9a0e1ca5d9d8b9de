"""Property: any interleaving of appends, snapshots, compactions and reopenings replays to the same state."""

from __future__ import annotations

import tempfile
from pathlib import Path

import msgspec
from deltalake import DeltaTable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events.base import Event
from storage.event_log import EventLog
from storage.maintenance import run_maintenance
from storage.snapshots import SnapshotStore
from storage.tables import LogConfig
from storage.verify import verify_log


class Deposit(Event, tag="test.deposit", frozen=True, kw_only=True):
    account: int
    amount: int


class Ledger(msgspec.Struct):
    """A small pure state: balances per account and the order they were touched."""

    balances: dict[int, int] = {}
    touched: list[int] = []

    def apply(self, event: Event) -> None:
        assert isinstance(event, Deposit)
        self.balances[event.account] = self.balances.get(event.account, 0) + event.amount
        self.touched.append(event.account)


CONFIG = LogConfig(flush_ms=0.5, maintenance=False, vacuum_retention_hours=0)

operation = st.one_of(
    st.tuples(st.just("append"), st.lists(st.tuples(st.integers(0, 4), st.integers(-50, 50)), min_size=1, max_size=30)),
    st.tuples(st.just("snapshot"), st.none()),
    st.tuples(st.just("compact"), st.none()),
    st.tuples(st.just("reopen"), st.none()),
)


def _recover(log: EventLog, snaps: SnapshotStore) -> Ledger:
    state = Ledger()
    from_seq = 1
    snap = snaps.latest("ledger")
    if snap is not None:
        state = msgspec.json.decode(snap.state, type=Ledger)
        from_seq = snap.seq + 1
    for stored in log.read(streams=["ledger"], from_seq=from_seq):
        state.apply(stored.event)
    return state


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operation, min_size=1, max_size=12))
def test_any_interleaving_replays_to_the_same_state(ops: list[tuple[str, object]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        snaps = SnapshotStore(str(data_dir))
        log = EventLog.open(data_dir, config=CONFIG)
        model = Ledger()
        try:
            for kind, arg in ops:
                if kind == "append":
                    assert isinstance(arg, list)
                    receipts = [log.append(Deposit(account=a, amount=m), stream="ledger", key=str(a)) for a, m in arg]
                    for (a, m), r in zip(arg, receipts, strict=True):
                        model.apply(Deposit(account=a, amount=m))
                        r.wait(10)
                elif kind == "snapshot":
                    # what the actor base does: snapshot the state of every durable event so far
                    seq = log.flush()
                    if seq:
                        snaps.save("ledger", seq, msgspec.json.encode(model))
                elif kind == "compact":
                    log.flush()
                    run_maintenance(DeltaTable(log.uri), CONFIG, log.writer_id, vacuum=True)
                else:
                    log.close()
                    log = EventLog.open(data_dir, config=CONFIG)
                    assert _recover(log, snaps) == model
            assert _recover(log, snaps) == model
            full = Ledger()
            for stored in log.read():
                full.apply(stored.event)
            assert full == model
            assert verify_log(log.uri).ok
        finally:
            log.close()
