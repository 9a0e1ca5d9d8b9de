"""Rebuilding registry and queue state from the log, as of now, a seq, or a time.

``replay`` and ``verify`` use the same pure state classes the live actors
use, so what an audit shows is what the runtime had. The newest snapshot of
each stream at or before the target seq is the starting point (any
snapshot is checked against the events by ``verify``); only later events of
that stream are applied.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pyarrow.compute as pc

from actors.queue_state import QueueState
from actors.registry import RegistryState
from storage.reader import max_seq, open_table, read_batches, read_events, table_exists, to_utc
from storage.snapshots import SnapshotStore
from storage.tables import table_uri

__all__ = ["ReplayError", "ReplayResult", "last_seq", "replay", "seq_at"]

STATE_TYPES: dict[str, Any] = {"registry": RegistryState, "queue": QueueState}


class ReplayError(ValueError):
    """The target cannot be replayed (e.g. past the end of the log)."""


class ReplayResult:
    """Registry and queue state after event ``seq`` (``ts_us``: that event's time, None for an empty log)."""

    def __init__(self, seq: int, states: dict[str, Any], ts_us: int | None) -> None:
        self.seq = seq
        self.states = states
        self.ts_us = ts_us

    @property
    def registry(self) -> RegistryState:
        return self.states["registry"]

    @property
    def queue(self) -> QueueState:
        return self.states["queue"]

    def to_json(self, items: bool = True) -> dict[str, Any]:
        """What ``replay --json`` prints: ``seq``, ``ts``, ``registry`` and ``queue`` (counts and items).

        Items carry, besides the queue's own summary, how often they failed
        and IB's error code, so "which items failed and why" needs no second
        command. PROCESSING items stay PROCESSING: that is what the log says
        at this seq (a restart, or an expired lease, would return them).
        """
        queue = self.queue.summary(items=items)
        for row in queue["items"]:
            item = self.queue.items[row["item_id"]]
            row["failures"] = item.failures
            row["code"] = item.code
        return {"seq": self.seq, "ts": _iso(self.ts_us), "registry": self.registry.to_json(), "queue": queue}


def _iso(ts_us: int | None) -> str | None:
    if ts_us is None:
        return None
    return datetime.fromtimestamp(ts_us / 1_000_000, tz=UTC).isoformat(timespec="microseconds")


def last_seq(data_dir: str, storage_options: dict[str, str] | None = None) -> int:
    uri = table_uri(data_dir, "events")
    if not table_exists(uri, storage_options):
        return 0
    return max_seq(open_table(uri, storage_options))


def seq_at(data_dir: str, as_of: datetime | str, storage_options: dict[str, str] | None = None) -> int:
    """The last seq whose ``ts`` is at or before ``as_of`` (0 if none)."""
    uri = table_uri(data_dir, "events")
    if not table_exists(uri, storage_options):
        return 0
    best = 0
    for batch in read_batches(uri, until=to_utc(as_of), columns=["seq"], storage_options=storage_options):
        if batch.num_rows:
            best = max(best, pc.max(batch.column("seq")).as_py())
    return best


def replay(
    data_dir: str,
    *,
    seq: int | None = None,
    as_of: datetime | str | None = None,
    use_snapshots: bool = True,
    storage_options: dict[str, str] | None = None,
) -> ReplayResult:
    """Registry and queue state after event ``seq`` (or the last event at or before ``as_of``, or now)."""
    end = last_seq(data_dir, storage_options)
    if seq is not None:
        if seq < 0:
            raise ReplayError("--seq must be >= 0")
        if seq > end:
            raise ReplayError(f"the log ends at seq {end}; cannot replay to seq {seq}")
        target = seq
    elif as_of is not None:
        target = seq_at(data_dir, as_of, storage_options)
    else:
        target = end
    states: dict[str, Any] = {name: cls() for name, cls in STATE_TYPES.items()}
    start_after = dict.fromkeys(STATE_TYPES, 0)
    if use_snapshots and target > 0:
        store = SnapshotStore(data_dir, storage_options)
        for name, cls in STATE_TYPES.items():
            snap = store.latest(name, at_or_before=target)
            if snap is not None:
                states[name] = cls.load(snap.state)
                start_after[name] = snap.seq
    ts_us = None
    uri = table_uri(data_dir, "events")
    if target > 0:
        first = min(start_after.values()) + 1
        if first <= target:
            for stored in read_events(
                uri, streams=list(STATE_TYPES), from_seq=first, to_seq=target, storage_options=storage_options
            ):
                if stored.seq > start_after[stored.stream]:
                    states[stored.stream].apply(stored.event)
        for batch in read_batches(
            uri, from_seq=target, to_seq=target, columns=["seq", "ts"], storage_options=storage_options
        ):
            if batch.num_rows:
                ts_us = batch.column("ts").cast("int64")[0].as_py()
    return ReplayResult(target, states, ts_us)
