"""Integrity check of the event log: seq continuity, the hash chain, payloads that decode.

Shared by ``python runtime.py verify``, by ``run`` before it appends to an
existing log, and by the tests. It streams the table in seq order and stops
at the first problem, naming its seq (and the file, when a file cannot be
read at all).
"""

from __future__ import annotations

from collections.abc import Callable

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
