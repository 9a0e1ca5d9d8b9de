"""Integrity check of the event log: seq continuity, the hash chain, payloads that decode.

Shared by ``python runtime.py verify``, by ``run`` before it appends to an
existing log, and by the tests. It streams the table in seq order and stops
at the first problem, naming its seq (and the file, when a file cannot be
read at all).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
from deltalake import DeltaTable

from events.codec import EventDecodeError, decode_event
from storage.hashing import GENESIS_HASH, row_hash
from storage.reader import read_batches, table_exists

__all__ = ["VerifyReport", "verify_log"]


class VerifyReport(msgspec.Struct, kw_only=True):
    ok: bool
    events: int = 0
    last_seq: int = 0
    last_hash: str = GENESIS_HASH
    first_bad_seq: int | None = None
    problem: str = ""


def verify_log(
    uri: str,
    storage_options: dict[str, str] | None = None,
    *,
    on_event: Callable[[int, str, object], None] | None = None,
) -> VerifyReport:
    """Check every row; ``on_event(seq, stream, event)`` sees each decoded event (e.g. to check snapshots)."""
    report = VerifyReport(ok=True)
    if not table_exists(uri, storage_options):
        return report
    try:
        dt = DeltaTable(uri, storage_options=storage_options)
        batches = read_batches(dt)
        expected = 1
        prev = GENESIS_HASH
        for batch in batches:
            cols = {
                name: batch.column(name).to_pylist()
                for name in ("seq", "type", "stream", "key", "payload", "v", "hash")
            }
            tss = batch.column("ts").cast("int64").to_pylist()
            for i, seq in enumerate(cols["seq"]):
                if seq != expected:
                    what = "duplicate" if seq < expected else "gap"
                    return _bad(
                        report, expected if seq > expected else seq, f"{what}: expected seq {expected}, found {seq}"
                    )
                payload = cols["payload"][i]
                digest = row_hash(
                    prev,
                    seq,
                    tss[i],
                    cols["type"][i],
                    cols["stream"][i],
                    cols["key"][i],
                    cols["v"][i],
                    payload.encode(),
                )
                if digest != cols["hash"][i]:
                    return _bad(report, seq, "hash chain broken: the row or one before it was changed")
                try:
                    event = decode_event(cols["type"][i], cols["v"][i], payload, seq=seq)
                except EventDecodeError as exc:
                    return _bad(report, seq, f"payload does not decode: {exc}")
                if on_event is not None:
                    on_event(seq, cols["stream"][i], event)
                prev = digest
                expected = seq + 1
                report.events += 1
                report.last_seq = seq
                report.last_hash = digest
    except OSError as exc:
        return _bad(report, report.last_seq + 1, f"a file of the events table cannot be read: {exc}")
    except Exception as exc:  # noqa: BLE001 - a corrupt file shows up as many error types; all mean "bad"
        return _bad(report, report.last_seq + 1, f"the events table cannot be read past seq {report.last_seq}: {exc}")
    return report


def _bad(report: VerifyReport, seq: int, problem: str) -> VerifyReport:
    report.ok = False
    report.first_bad_seq = seq
    report.problem = problem
    return report


class DataDirReport(VerifyReport, kw_only=True):
    detail: str = ""
    snapshots_checked: int = 0


def verify_data_dir(data_dir: str, storage_options: dict[str, str] | None = None) -> DataDirReport:
    """Verify the events table, then that every snapshot equals a replay of the events it summarises.

    A snapshot is compared right after the event it was taken at (its seq)
    has been applied to a fresh replay of its stream.
    """
    from actors.queue_state import QueueState
    from actors.reconciliation import ReconciliationState
    from actors.registry import RegistryState
    from storage.snapshots import SnapshotStore
    from storage.tables import table_uri

    state_types: dict[str, Any] = {"registry": RegistryState, "queue": QueueState, "reconciliation": ReconciliationState}
    pending: dict[str, dict[int, Any]] = {}
    for snap in SnapshotStore(data_dir, storage_options).all():
        pending.setdefault(snap.stream, {})[snap.seq] = snap
    states = {name: cls() for name, cls in state_types.items() if name in pending}
    problem: list[tuple[int, str]] = []
    checked = 0

    def on_event(seq: int, stream: str, event: object) -> None:
        nonlocal checked
        state = states.get(stream)
        if state is None:
            return
        state.apply(event)
        snap = pending[stream].pop(seq, None)
        if snap is not None:
            checked += 1
            if not problem and msgspec.json.decode(snap.state) != msgspec.json.decode(state.dump()):
                problem.append((seq, f"the {stream} snapshot at seq {seq} differs from a replay of its events"))

    report = verify_log(table_uri(data_dir, "events"), storage_options, on_event=on_event)
    out = DataDirReport(**msgspec.structs.asdict(report))
    out.snapshots_checked = checked
    if not out.ok:
        return out
    if problem:
        out.ok, out.first_bad_seq, out.problem = False, problem[0][0], problem[0][1]
        return out
    for stream, left in pending.items():
        if left and stream in states:
            seq = min(left)
            out.ok, out.first_bad_seq = False, seq
            out.problem = f"a {stream} snapshot claims seq {seq}, which is not one of that stream's events in the log"
            return out
    out.detail = f"; {checked} snapshots agree with the events" if checked else ""
    return out
