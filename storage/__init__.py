"""Storage adapters: the Delta event log, snapshots, the positions table, and reads of them."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EventLog": "storage.event_log",
    "Receipt": "storage.event_log",
    "LogError": "storage.event_log",
    "LogFailedError": "storage.event_log",
    "LogFencedError": "storage.event_log",
    "LogClosedError": "storage.event_log",
    "LogConfig": "storage.tables",
    "DataDirLocked": "storage.lock",
    "SnapshotStore": "storage.snapshots",
    "StoredEvent": "storage.reader",
    "read_batches": "storage.reader",
    "read_events": "storage.reader",
    "verify_log": "storage.verify",
    "verify_data_dir": "storage.verify",
    "replay": "storage.replay",
    "audit_events": "storage.audit",
}

__all__ = [
    "DataDirLocked",
    "EventLog",
    "LogClosedError",
    "LogConfig",
    "LogError",
    "LogFailedError",
    "LogFencedError",
    "Receipt",
    "SnapshotStore",
    "StoredEvent",
    "audit_events",
    "read_batches",
    "read_events",
    "replay",
    "verify_data_dir",
    "verify_log",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'storage' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
