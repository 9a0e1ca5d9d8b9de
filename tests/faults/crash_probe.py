"""An event type for crash tests: which producer thread appended it, and its number there."""

from __future__ import annotations

from events.base import Event


class CrashProbe(Event, tag="test.crash_probe", frozen=True, kw_only=True):
    thread: int
    n: int
