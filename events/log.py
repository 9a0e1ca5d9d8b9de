"""Events about the runtime and the log itself, for the audit trail.

Emits (stored): RuntimeStarted, RuntimeStopped, SnapshotTaken.
"""

from __future__ import annotations

from typing import ClassVar

from events.base import Event

__all__ = ["RuntimeStarted", "RuntimeStopped"]


class RuntimeStarted(Event, tag="log.runtime_started", frozen=True, kw_only=True):
    version: ClassVar[int] = 1
    writer_id: str
    pid: int
    host: str
    mode: str = "run"
    max_lines: int = 0
    #: The run's ``[freshness]`` settings (name -> value), so ``what-if`` replays a day with what was running.
    #: Empty in runs before it was recorded.
    freshness: dict[str, float] = {}


class RuntimeStopped(Event, tag="log.runtime_stopped", frozen=True, kw_only=True):
    version: ClassVar[int] = 1
    reason: str = "stopped"
