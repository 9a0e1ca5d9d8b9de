"""Messages of the PositionWriter: forcing a flush and reading its counters.

Handles: Flush (told by its timer, or asked to force one), WriterStats.
Nothing here is stored: the positions table is data, not the event log.
"""

from __future__ import annotations

from events.base import Command, Reply

__all__ = ["Flush", "Flushed", "WriterStats", "WriterStatsReply"]


class Flush(Command, tag="positions.flush", frozen=True, kw_only=True):
    """Write the coalesced rows now, as one Delta commit. Asked: answered with Flushed."""


class Flushed(Reply, tag="positions.flushed", frozen=True, kw_only=True):
    """What a flush did. ``ok`` False: the commit failed after its retries, ``pending`` rows wait."""

    rows: int
    ok: bool = True
    pending: int = 0
    error: str = ""


class WriterStats(Command, tag="positions.stats", frozen=True, kw_only=True):
    """Ask the PositionWriter for its counters; answered with WriterStatsReply."""


class WriterStatsReply(Reply, tag="positions.stats_reply", frozen=True, kw_only=True):
    rows_written: int
    #: Delta commits written (a flush with nothing to write is not counted).
    flushes: int
    updates_received: int
    positions_received: int = 0
    #: Rows waiting for the next flush (at most one per contract).
    pending: int = 0
    #: Flushes that gave up after their retries (their rows were kept).
    failed_flushes: int = 0
    #: Individual failed commit attempts, retries included.
    write_errors: int = 0
    last_error: str = ""
