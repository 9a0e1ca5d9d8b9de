"""Messages of the StreamRouter: which path serves each contract, and why.

Emits (stored): StreamStarted, StreamStopped, OverflowQueued, StreamPromoted,
StreamDemoted. Each is keyed by conid, so the audit of one contract shows
every move between the stream and the queue with its reason.
"""

from __future__ import annotations

from typing import ClassVar

from events.base import Conid, Event

__all__ = ["OverflowQueued", "StreamDemoted", "StreamPromoted", "StreamStarted", "StreamStopped"]


class StreamStarted(Event, tag="router.stream_started", frozen=True, kw_only=True):
    version: ClassVar[int] = 1
    conid: Conid
    reason: str = "activated"
    lines_in_use: int = 0
    budget: int = 0


class StreamStopped(Event, tag="router.stream_stopped", frozen=True, kw_only=True):
    version: ClassVar[int] = 1
    conid: Conid
    reason: str = "deactivated"


class OverflowQueued(Event, tag="router.overflow_queued", frozen=True, kw_only=True):
    """Active, but no line is free: served by the queue at top priority meanwhile."""

    version: ClassVar[int] = 1
    conid: Conid
    lines_in_use: int = 0
    budget: int = 0


class StreamPromoted(Event, tag="router.stream_promoted", frozen=True, kw_only=True):
    """An overflowed active contract got a line."""

    version: ClassVar[int] = 1
    conid: Conid


class StreamDemoted(Event, tag="router.stream_demoted", frozen=True, kw_only=True):
    """IB refused the stream (e.g. 101 max tickers): served by the queue instead."""

    version: ClassVar[int] = 1
    conid: Conid
    code: int | None = None
    reason: str = ""
