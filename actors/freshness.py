"""Freshness figures and stream ranking: pure helpers of the StreamRouter.

Freshness is what users judge Slotwise by: the age of each contract's newest
quote, per path (stream, queue, overflow, portfolio), against the target of
that path. :func:`age_summary` is what ``status --json`` and the metrics
show; :class:`Rank` orders active contracts for the few lines there are.
"""

from __future__ import annotations

import bisect
import datetime as dt
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["AGE_BUCKETS_S", "NO_EXPIRY_DAYS", "Rank", "age_summary", "days_to_expiry", "outranks", "percentile"]

#: Upper bounds (s) of the age histogram the metrics export: around the default targets (5 s overflow, 60 s).
AGE_BUCKETS_S = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0)

#: A contract without an expiry (a stock) sorts after every dated one of the same priority.
NO_EXPIRY_DAYS = 1_000_000


def days_to_expiry(expiry: str, today: dt.date) -> int:
    """Days from ``today`` to IB's ``lastTradeDateOrContractMonth`` (YYYYMMDD or YYYYMM); no expiry -> NO_EXPIRY_DAYS."""
    text = expiry.strip()[:8]
    try:
        if len(text) == 8:
            day = dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
        elif len(text) == 6:
            day = dt.date(int(text[:4]), int(text[4:6]), 28)  # a month contract: late in that month
        else:
            return NO_EXPIRY_DAYS
    except ValueError:
        return NO_EXPIRY_DAYS
    return max(0, (day - today).days)


@dataclass(frozen=True, slots=True)
class Rank:
    """How much an active contract deserves a line: strategy priority, then nearest expiry, then risk.

    ``risk`` is |delta| x position x multiplier where delta is known (options),
    else |position| x multiplier: the size of the exposure a stale price hides.
    """

    priority: int
    days: int
    risk: float
    conid: int

    def key(self) -> tuple[int, int, float, int]:
        """Sort key, best first."""
        return (-self.priority, self.days, -self.risk, self.conid)


def outranks(challenger: Rank, holder: Rank, risk_factor: float) -> bool:
    """Does ``challenger`` deserve ``holder``'s line *materially* (hysteresis against flapping)?

    A higher strategy priority always does; at equal priority an earlier
    expiry day does; at equal priority and day, only a risk at least
    ``risk_factor`` times larger does. Small risk moves never swap lines.
    """
    if challenger.priority != holder.priority:
        return challenger.priority > holder.priority
    if challenger.days != holder.days:
        return challenger.days < holder.days
    return challenger.risk > max(holder.risk, 1e-12) * risk_factor


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return 0.0
    k = max(0, math.ceil(q / 100 * len(sorted_values)) - 1)
    return sorted_values[min(k, len(sorted_values) - 1)]


def age_summary(ages: Iterable[float | None]) -> dict[str, Any]:
    """Count, never-priced count, p50 / p99 / max age (s) of the newest quotes of a set of contracts,
    and ``le``: how many priced contracts are at most each of :data:`AGE_BUCKETS_S` old (cumulative)."""
    known: list[float] = []
    never = 0
    for age in ages:
        if age is None:
            never += 1
        else:
            known.append(age)
    known.sort()
    return {
        "count": len(known) + never,
        "never_priced": never,
        "p50_s": round(percentile(known, 50), 3),
        "p99_s": round(percentile(known, 99), 3),
        "max_s": round(known[-1], 3) if known else 0.0,
        "le": {f"{bound:g}": bisect.bisect_right(known, bound) for bound in AGE_BUCKETS_S},
    }
