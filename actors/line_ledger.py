"""The line ledger: the one place that counts IB market data lines, and what it knows of the true limit.

Every line in use is a stream (including one whose cancel has not left yet)
or an open snapshot. The StreamRouter owns the only ledger; the worker asks
it for snapshot lines and gives them back, so streams and snapshots are
counted together and can never add up past the limit behind each other's
back.

The limit. ``max_lines`` (config) is only a ceiling: the account's real
count depends on equity, commissions and booster packs, and TWS and other
API clients share it. The ledger learns it from IB's 101 ("max number of
tickers reached"): when a request is refused, the lines still held after
giving the refused one back are what IB accepted (stored as a
``LineLimitLearned`` event by the router, so a restart keeps it). Once
learned, the limit is re-probed upward one line per ``line_probe_s``
(``LineLimitProbed``); a probe that IB refuses costs one 101.

Before any 101 has taught a limit, snapshot lines are opened slowly above
the level already *proven* (lines that were held together and delivered
data, or stayed unrefused for ``proof_s``): at most ``ramp_step`` more, so
the first discovery costs a handful of 101s, not one per line configured
beyond the real count. Streams are not ramped: they are the active
contracts, and their number is bounded by the stream budget.

Streams never take the last ``min_snapshot_lines`` lines; every line not
streaming is free for snapshots.

This module is pure bookkeeping (no actors, no clock of its own): the router
passes times in and persists the events it decides on.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

__all__ = ["PEAK_SETTLE_S", "LineLedger", "SnapshotLine"]

#: A peak proven this soon before a 101 may count the refused request, still on its way to IB (the IB actor's
#: pacer holds a burst for seconds, and IB's answer takes a round trip): the 101 caps it at the lines still held.
#: Ten seconds cover a pacer queue of ~450 messages; capping a real peak only slows a later climb back.
PEAK_SETTLE_S = 10.0


@dataclass(slots=True)
class SnapshotLine:
    """One line lent to the worker for a snapshot."""

    line_id: int
    #: Lines held, this one included, when it was lent: the level it proves if it delivers data.
    level: int
    granted_at: float


class LineLedger:
    """Counts streams and snapshot lines; knows the configured ceiling, the learned limit and the proven level."""

    def __init__(
        self, *, max_lines: int, min_snapshot_lines: int, ramp_step: int = 2, peak_settle_s: float = PEAK_SETTLE_S
    ) -> None:
        if max_lines < 1 or min_snapshot_lines < 0 or min_snapshot_lines >= max_lines:
            raise ValueError("need max_lines >= 1 and 0 <= min_snapshot_lines < max_lines")
        #: The configured ceiling (fixed: ``limit`` is kept from it and ``learned``).
        self.max_lines = max_lines
        self.min_snapshot_lines = min_snapshot_lines
        self.ramp_step = max(1, ramp_step)
        self.peak_settle_s = peak_settle_s
        self.learned = None
        #: The most lines known to have been held at once without a refusal (lowered with a learned limit).
        self.proven = 0
        #: The most lines ever proven in this run: a limit learned below it means other clients of the
        #: account took lines for a while, and the probe may climb back faster.
        self.peak_proven = 0
        #: (when, the peak before) for each raise of ``peak_proven`` in the last ``peak_settle_s``: a 101 caps them.
        self._peak_raises: deque[tuple[float, int]] = deque()
        self.snapshots: dict[int, SnapshotLine] = {}
        #: Streams not yet proven accepted by IB (no tick yet, not ``proof_s`` old): conid -> the level they
        #: were started at (the router adds and removes them; a 101 caps them as it caps the snapshot lines).
        self.unproven: dict[int, int] = {}
        self._next_line_id = 1

    # ------------------------------------------------------------------ figures
    # ``streams`` is always the router's count of stream lines: streams plus cancels not yet out.

    @property
    def learned(self) -> int | None:
        """The limit taught by IB's 101s (and raised by probes); None until the first 101."""
        return self._learned

    @learned.setter
    def learned(self, value: int | None) -> None:
        self._learned = value
        # kept, not recomputed: every lend and every status reads the limit
        self._limit = self.max_lines if value is None else max(1, min(self.max_lines, value))

    @property
    def limit(self) -> int:
        """What the ledger will hold at most: the learned limit, never above ``max_lines``."""
        return self._limit

    def lines_held(self, streams: int) -> int:
        return streams + len(self.snapshots)

    def lines_free(self, streams: int) -> int:
        return max(0, self.limit - self.lines_held(streams))

    @property
    def stream_slots(self) -> int:
        """Lines streams may take: the limit less the lines kept for snapshots."""
        return max(0, self.limit - self.min_snapshot_lines)

    def snapshot_ceiling(self) -> int:
        """Lines held at most once snapshots are added: the limit, or the ramp above the proven level."""
        if self._learned is not None:
            return self._limit
        step = max(self.ramp_step, self.proven // 8)
        return min(self._limit, max(self.proven, self.min_snapshot_lines) + step)

    def snapshot_room(self, streams: int) -> int:
        return max(0, self.snapshot_ceiling() - streams - len(self.snapshots))

    def stream_room(self, streams: int) -> bool:
        """May one more stream start?"""
        return streams < self.stream_slots and self.lines_held(streams) < self.limit

    # ------------------------------------------------------------------ snapshot lines

    def lend(self, n: int, streams: int, now: float) -> list[SnapshotLine]:
        held = streams + len(self.snapshots)
        lent = []
        for _ in range(min(n, self.snapshot_ceiling() - held)):
            held += 1
            line = SnapshotLine(self._next_line_id, held, now)
            self._next_line_id += 1
            self.snapshots[line.line_id] = line
            lent.append(line)
        return lent

    def give_back(self, line_id: int) -> SnapshotLine | None:
        return self.snapshots.pop(line_id, None)

    def overdue(self, now: float, max_age_s: float) -> list[SnapshotLine]:
        """Lent lines never given back within ``max_age_s`` (a lost answer): the caller reclaims them."""
        return [line for line in self.snapshots.values() if now - line.granted_at > max_age_s]

    # ------------------------------------------------------------------ learning

    def prove(self, level: int, now: float) -> bool:
        """``level`` lines were held together and IB served them (seen at ``now``); True if that is news."""
        if level > self.peak_proven:
            self._recent_raises(now).append((now, self.peak_proven))
            self.peak_proven = level
        if level > self.proven:
            self.proven = level
            return True
        return False

    def limit_after_refusal(self, streams: int, now: float) -> int | None:
        """After IB refused a request at ``now`` (its line already given back): the limit to learn, or None if not lower.

        What is still held is what IB accepted. (A line that closed in the
        same instant makes this an underestimate; the upward probe repairs it.)

        A peak raised within ``peak_settle_s`` before is capped at it too
        (never below the peak that stood before those raises), as are the
        levels the open snapshot lines and the unproven streams will prove.
        In a burst (a start, a resubscribe, a probe) the router counts a
        request from the moment it hands it to the IB actor, and a snapshot,
        or a stream unrefused for ``proof_s``, can prove a level with the
        refused request in it before IB's 101 for it is back. Kept as the
        run's peak, such a level would make every later limit look like lines
        lent to other clients, and the probe would climb back towards it
        every tenth of ``line_probe_s``, for a 101 each time, all day. The
        cost: when lines closed between IB's refusal and this call, the cap
        (like the limit learned) is low, and a real peak in the window is
        lost with the false one.
        """
        accepted = max(1, self.lines_held(streams))
        raises = self._recent_raises(now)
        if raises:  # the peak was raised in this burst: no higher than what IB accepts, above what stood before it
            self.peak_proven = max(raises[0][1], min(self.peak_proven, accepted))
        for line in self.snapshots.values():  # lent counting the refused request: they prove no more either
            if line.level > accepted:
                line.level = accepted
        unproven = self.unproven
        for conid, level in unproven.items():  # streams started so: the same
            if level > accepted:
                unproven[conid] = accepted
        if self.learned is None or accepted < self.learned:
            return accepted
        return None

    def _recent_raises(self, now: float) -> deque[tuple[float, int]]:
        """The raises of the peak within ``peak_settle_s`` before ``now`` (older ones are forgotten)."""
        raises = self._peak_raises
        while raises and raises[0][0] < now - self.peak_settle_s:
            raises.popleft()
        return raises

    @property
    def below_peak(self) -> bool:
        """The learned limit is below what this run once held: lines were taken, and may be given back."""
        return self.learned is not None and self.learned < self.peak_proven

    def probe_target(self, step: int = 1) -> int | None:
        """The limit ``step`` lines higher (never past the peak once proven, nor past ``max_lines``), or None."""
        if self.learned is None or self.learned >= self.max_lines:
            return None
        target = self.learned + max(1, step)
        if self.below_peak:
            target = min(target, self.peak_proven)
        return min(target, self.max_lines)
