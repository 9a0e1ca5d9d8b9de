"""Staleness figures of a period, one definition for the record and for every simulated configuration.

A contract's quote age at time t is t minus its newest stream or snapshot
quote at or before t (before its first quote: t minus when it appeared, so a
contract that waits for its first price counts as stale, not as absent).
Ages are sampled on one grid for every contract (``SAMPLES`` points across
the period), so percentiles are time-weighted: p99 is the age a contract's
newest price exceeds 1% of the time. The faithfulness check compares the
recorded figures with the as-run configuration's, computed the same way.

Portfolio marks (IB's updatePortfolio, no line) are not quotes here: they
price a position, they do not make its market data fresh.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from actors.what_if_sim import SimOutcome
from storage.recorded_day import RecordedDay

__all__ = ["AgeFigures", "Faithfulness", "Figures", "faithfulness", "figures_of_outcome", "figures_of_record"]

#: Sample points across the period, per contract.
SAMPLES = 10_000
#: The as-run configuration is trusted when its p99 ages are within this of the record's.
FAITHFUL_WITHIN = 0.20
#: Ages this small are a stream's tick apart: a 20% band is meaningless there, so they match within a second.
STREAM_SCALE_S = 1.0


@dataclass(frozen=True, slots=True)
class AgeFigures:
    contracts: int
    p50_s: float | None
    p99_s: float | None
    max_s: float | None


@dataclass(slots=True)
class Figures:
    """The staleness of one period under one configuration (or as recorded)."""

    label: str
    active: AgeFigures
    other: AgeFigures
    #: Share of active contract-time spent on a streaming line.
    streamed_share: float | None
    #: Contracts whose age passed their target at some point, and the contract-seconds spent past it.
    missed_contracts: int
    missed_s: float
    #: The contracts longest past their target: (conid, symbol, seconds past target, worst age).
    worst: list[tuple[int, str, float, float]]
    snapshot_msgs_per_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["worst"] = [{"conid": c, "symbol": s, "over_target_s": o, "max_age_s": m} for c, s, o, m in self.worst]
        return data


def _active_periods(day: RecordedDay) -> dict[int, list[tuple[int, int]]]:
    """When each contract was active, from the registry at the start and its changes after."""
    spans: dict[int, list[tuple[int, int]]] = {}
    since: dict[int, int] = {c: day.start_us for c in day.active_at_start}
    for change in day.active_changes:
        if change.kind == "activated":
            since.setdefault(change.conid, change.ts_us)
        elif change.kind == "deactivated" and change.conid in since:
            spans.setdefault(change.conid, []).append((since.pop(change.conid), change.ts_us))
    for conid, start in since.items():
        spans.setdefault(conid, []).append((start, day.end_us))
    return spans


def _inside(times: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    mask = np.zeros(len(times), dtype=bool)
    for a, b in spans:
        mask |= (times >= a) & (times < b)
    return mask


def _stream_ticks(spans: list[tuple[int, int]], tick_us: int) -> np.ndarray:
    parts = [np.append(np.arange(a, b, tick_us, dtype=np.int64), b) for a, b in spans if b > a]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def _summary(ages: list[np.ndarray], contracts: int) -> AgeFigures:
    if not ages or not sum(len(a) for a in ages):
        return AgeFigures(contracts=contracts, p50_s=None, p99_s=None, max_s=None)
    joined = np.concatenate(ages)
    p50, p99 = np.percentile(joined, [50, 99])
    return AgeFigures(contracts=contracts, p50_s=round(float(p50), 2), p99_s=round(float(p99), 2), max_s=round(float(joined.max()), 2))


def _figures(
    label: str,
    day: RecordedDay,
    quotes: dict[int, np.ndarray],
    streamed: dict[int, list[tuple[int, int]]],
    *,
    monitoring_s: float,
    overflow_s: float,
    snapshot_msgs_per_s: float,
) -> Figures:
    step_us = max(100_000, (day.end_us - day.start_us) // SAMPLES)
    grid = np.arange(day.start_us + step_us // 2, day.end_us, step_us, dtype=np.int64)
    active_spans = _active_periods(day)
    active_ages: list[np.ndarray] = []
    other_ages: list[np.ndarray] = []
    n_active = n_other = 0
    streamed_samples = active_samples = 0
    missed: list[tuple[int, str, float, float]] = []
    for contract in day.contracts:
        times = grid[grid >= contract.appeared_us]
        if not len(times):
            continue
        q = quotes.get(contract.conid)
        q = np.empty(0, dtype=np.int64) if q is None else np.sort(q)
        if len(q):
            idx = np.searchsorted(q, times, side="right") - 1
            last = np.where(idx >= 0, q[np.maximum(idx, 0)], contract.appeared_us)
        else:
            last = np.full(len(times), contract.appeared_us, dtype=np.int64)
        ages = (times - last) / 1e6
        active = _inside(times, active_spans.get(contract.conid, []))
        if active.any():
            n_active += 1
            active_ages.append(ages[active])
            active_samples += int(active.sum())
            streamed_samples += int((active & _inside(times, streamed.get(contract.conid, []))).sum())
        if (~active).any():
            n_other += 1
            other_ages.append(ages[~active])
        target = np.where(active, overflow_s, monitoring_s)
        over = float((ages > target).sum() * step_us / 1e6)
        if over > 0:
            missed.append((contract.conid, contract.symbol, round(over, 1), round(float(ages.max()), 1)))
    missed.sort(key=lambda m: (-m[2], m[0]))
    return Figures(
        label=label,
        active=_summary(active_ages, n_active),
        other=_summary(other_ages, n_other),
        streamed_share=round(streamed_samples / active_samples, 3) if active_samples else None,
        missed_contracts=len(missed),
        missed_s=round(sum(m[2] for m in missed), 1),
        worst=missed[:5],
        snapshot_msgs_per_s=round(snapshot_msgs_per_s, 2),
    )


def figures_of_record(day: RecordedDay, *, monitoring_s: float, overflow_s: float) -> Figures:
    """The staleness the positions table recorded (stream and snapshot rows), and the 101s the runtime met."""
    figures = _figures(
        "recorded",
        day,
        day.quotes,
        day.streamed,
        monitoring_s=monitoring_s,
        overflow_s=overflow_s,
        snapshot_msgs_per_s=day.snapshots_claimed / day.duration_s,
    )
    figures.extra = {"refusals_101": day.refusals_101}
    return figures


def step_words(step_s: float) -> str:
    """How a replay sent its snapshots (``what-if --step``), as the report, the table and the chart say it."""
    return f"snapshots sent in steps of {step_s:g} s" if step_s else "snapshots replayed exactly"


def figures_of_outcome(day: RecordedDay, outcome: SimOutcome) -> Figures:
    """The staleness one simulated configuration would have had, by the same definition as the record's."""
    tick_us = max(1, int(day.stream_tick_s * 1e6))
    quotes: dict[int, np.ndarray] = {}
    for contract in day.contracts:
        conid = contract.conid
        recorded = day.quotes.get(conid)
        before = recorded[recorded < day.start_us] if recorded is not None else np.empty(0, dtype=np.int64)
        parts = [before, outcome.quotes.get(conid, np.empty(0, dtype=np.int64))]
        parts.append(_stream_ticks(outcome.streamed.get(conid, []), tick_us))
        quotes[conid] = np.concatenate(parts)
    config = outcome.config
    figures = _figures(
        config.label,
        day,
        quotes,
        outcome.streamed,
        monitoring_s=config.freshness.monitoring_s,
        overflow_s=config.freshness.overflow_s,
        snapshot_msgs_per_s=outcome.snapshots_sent / day.duration_s,
    )
    figures.extra = {
        "max_lines": config.max_lines,
        "true_lines": config.true_lines,
        "monitoring_s": config.freshness.monitoring_s,
        "overflow_s": config.freshness.overflow_s,
        "max_snapshot_msgs_per_s": config.freshness.max_snapshot_msgs_per_s,
        "as_run": config.as_run,
        "step_s": config.step_s,
        "pacing_per_s": config.pacing_per_s,
        "refusals_101": outcome.refusals_101,
        "line_limit_at_end": outcome.final_limit,
        **outcome.extra,
    }
    return figures


@dataclass(frozen=True, slots=True)
class Faithfulness:
    """How far the as-run replay is from the record: the trust to put in the other rows."""

    recorded: Figures
    replayed: Figures
    #: path -> (recorded p99, replayed p99, within the band?)
    p99: dict[str, tuple[float | None, float | None, bool]]

    @property
    def faithful(self) -> bool:
        return all(ok for _, _, ok in self.p99.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "faithful": self.faithful,
            "within": FAITHFUL_WITHIN,
            "p99": {k: {"recorded_s": r, "replayed_s": s, "ok": ok} for k, (r, s, ok) in self.p99.items()},
            "recorded": self.recorded.to_json(),
        }


def _close(recorded: float | None, replayed: float | None) -> bool:
    if recorded is None or replayed is None:
        return recorded is None and replayed is None
    band = max(FAITHFUL_WITHIN * recorded, STREAM_SCALE_S)
    return abs(replayed - recorded) <= band


def faithfulness(recorded: Figures, replayed: Figures) -> Faithfulness:
    return Faithfulness(
        recorded=recorded,
        replayed=replayed,
        p99={
            "active": (recorded.active.p99_s, replayed.active.p99_s, _close(recorded.active.p99_s, replayed.active.p99_s)),
            "other": (recorded.other.p99_s, replayed.other.p99_s, _close(recorded.other.p99_s, replayed.other.p99_s)),
        },
    )
