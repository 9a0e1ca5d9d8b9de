"""A recorded period, read back from the event log and the positions table, for what-if replay.

``what-if`` re-runs a period through the real scheduler and line ledger
(:mod:`actors.what_if_sim`). What it needs from the record, and where each
part comes from:

* **the configuration that was running**: ``RuntimeStarted`` (``max_lines``
  and the ``[freshness]`` settings; runs recorded before those were stored
  get the defaults, and the report says so);
* **the account's true line count**: the newest ``LineLimitLearned`` (IB's
  101 taught it, or every configured line was held without one); none
  learned means the run never met the limit, so ``max_lines`` is a floor;
* **which contracts were held, and when each first appeared**: the
  positions table (every row of a contract, from any path);
* **which contracts were active, with their priorities, and when that
  changed**: the registry's ``LegAdded``/``ContractActivated``/
  ``ContractDeactivated`` events;
* **how long IB took to answer each snapshot, and how it ended**: the
  queue's ``ItemClaimed`` to ``ItemSucceeded``/``ItemRetryScheduled``/
  ``ItemDeadLettered`` of the same item (the log's own timestamps), per
  contract, in order;
* **farm blips and resets**: snapshots given back as ``interrupted`` (not
  those the connection cut: those are the outages below), at that moment for
  every contract; except a snapshot the IB actor excused because a farm or
  the data server was down (``interrupted: 2103``/``2110``): that says only
  its own contract's data was away, from its first such snapshot to its
  last, until it is answered again (:class:`OutageWindow`);
* **time no market data flowed**: ``RuntimeStopped`` to the next
  ``RuntimeStarted`` (a run killed without a stop: its last event to the
  next start), and IB's own outages while a runtime ran (the socket
  dropped, or 1100): the router logs ``ib.connection_state`` when data
  stops and when it flows again;
* **what freshness was actually had**: the times of every stream and
  snapshot row of the positions table (one row per contract per flush),
  for the faithfulness check.

Nothing here writes: the data directory is only read.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from events.base import Event
from events.ib import DATA_FLOWS, TERMINAL_KINDS, ConnectionStateChanged, IbErrorKind, classify_ib_code
from events.log import RuntimeStarted, RuntimeStopped
from events.queue import ItemClaimed, ItemDeadLettered, ItemReleased, ItemRetryScheduled, ItemSucceeded
from events.registry import ContractActivated, ContractDeactivated, LegAdded, LegRemoved
from events.router import (
    LineLimitLearned,
    RouterRestarted,
    StreamDemoted,
    StreamPromoted,
    StreamStarted,
    StreamStopped,
)
from storage.reader import open_table, read_events, table_exists, to_utc
from storage.tables import table_uri

__all__ = [
    "ActiveChange",
    "NoRecordError",
    "OutageWindow",
    "RecordedContract",
    "RecordedDay",
    "SnapshotSample",
    "UnreadableTableError",
    "read_recorded_day",
    "reading",
]

_TYPES = [
    "log.runtime_started",
    "log.runtime_stopped",
    "registry.leg_added",
    "registry.leg_removed",
    "registry.contract_activated",
    "registry.contract_deactivated",
    "router.line_limit_learned",
    "router.stream_started",
    "router.stream_promoted",
    "router.stream_demoted",
    "router.stream_stopped",
    "router.restarted",
    "ib.connection_state",
    "queue.item_claimed",
    "queue.item_succeeded",
    "queue.item_retry_scheduled",
    "queue.item_dead_lettered",
    "queue.item_released",
]

#: How far before the period the positions table is read: a contract held then has rows in it (the writer
#: keeps a portfolio mark at least every [positions] portfolio_floor_s), and its newest quote before the
#: period is what its age starts from.
LOOKBACK_S = 86_400.0


class NoRecordError(ValueError):
    """The data directory holds no period that can be replayed (one line for the user)."""


class UnreadableTableError(Exception):
    """A table is there but cannot be read: a file deleted, cut short or not readable. The cause is chained."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} cannot be read")
        #: Which table ("the events table"), for the one line the user gets.
        self.what = what


@contextmanager
def reading(what: str) -> Iterator[None]:
    """Name ``what`` was being read in whatever a damaged file raises: Arrow, OS and delta-rs errors alike."""
    try:
        yield
    except NoRecordError:
        raise
    except Exception as exc:
        raise UnreadableTableError(what) from exc


@dataclass(frozen=True, slots=True)
class SnapshotSample:
    """One recorded snapshot: how long IB took, and how it ended (``ok``, ``failed`` or ``terminal``)."""

    latency_s: float
    outcome: str
    code: int | None = None


@dataclass(frozen=True, slots=True)
class OutageWindow:
    """A contract's data away: from the claim of its first excused snapshot to the end of its last, with no
    answer of its own, stream, restart or reconnect between them; its excused snapshots took ``latency_s`` (the
    median)."""

    start_us: int
    end_us: int
    latency_s: float
    code: int
    #: When its farm was back: the claim of the snapshot that got its next quote (the runtime lifted its hold at
    #: IB's "farm OK", which the log does not keep); 0 if the window ended otherwise (a stream, a restart, the end).
    back_us: int = 0


@dataclass(frozen=True, slots=True)
class RecordedContract:
    conid: int
    symbol: str
    sec_type: str
    position: float
    #: The newest known delta (options), for the router's ranking; None when never recorded.
    delta: float | None
    #: When the contract was first seen in the period (its first positions row, or the period start).
    appeared_us: int


@dataclass(frozen=True, slots=True)
class ActiveChange:
    ts_us: int
    conid: int
    strategy: str
    #: "leg_added", "leg_removed", "activated" or "deactivated"
    kind: str
    priority: int = 0


@dataclass(slots=True)
class RecordedDay:
    start_us: int
    end_us: int
    max_lines: int
    #: The run's [freshness] settings; empty when the log predates their recording.
    settings: dict[str, float]
    #: The account's line count as IB taught it (None: never learned, the run never met the limit).
    true_lines: int | None
    #: What the router knew of the limit when the period began (a restart keeps it).
    learned_at_start: int | None
    contracts: list[RecordedContract]
    #: conid -> {strategy: priority}: the registry when the period began.
    active_at_start: dict[int, dict[str, int]]
    active_changes: list[ActiveChange]
    snapshots: dict[int, list[SnapshotSample]]
    interruptions_us: list[int]
    #: Periods (start_us, end_us) without market data: no runtime ran, or IB was away; sorted, not overlapping.
    down: list[tuple[int, int]]
    #: conid -> sorted times (µs) of stream and snapshot rows in the positions table.
    quotes: dict[int, np.ndarray] = field(default_factory=dict)
    #: conid -> times (µs) of IB's portfolio marks the positions table kept (the router dates never-priced
    #: contracts by them; the writer keeps one only when the contract had no fresher quote).
    portfolio: dict[int, np.ndarray] = field(default_factory=dict)
    #: The usual gap between a stream's rows (one row per contract per positions flush).
    stream_tick_s: float = 1.0
    #: When IB refused a snapshot for the rate of requests (321 "Snapshot requests limitation exceeded", or
    #: the pacing error 100; released "rate_limited"): the worker halved its rate then, and the replay's does too.
    rate_limited_us: list[int] = field(default_factory=list)
    #: conid -> [(ts_us, code)]: IB refused its stream for a reason other than the line count (no market data
    #: subscription 354/10089/10168, a competing live session 10197, ...; ``StreamDemoted.code``).
    stream_refusals: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    #: 101s the runtime met in the period: streams demoted and snapshots released for IB's line count.
    refusals_101: int = 0
    #: The run talked to a gateway through the IB actor's pacer (``runtime.py run``); False for the demo,
    #: whose fake IB answers at once (``RuntimeStarted.mode`` "demo").
    paced: bool = True
    #: conid -> [(start_us, end_us)] while the router held a stream for it (its decisions, as recorded).
    streamed: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    #: Snapshots the worker claimed in the period (one request each).
    snapshots_claimed: int = 0
    #: The seq of the last event read before the period began (0: none): the queue's state then is the
    #: replay's starting queue (``actors.what_if_cli`` rebuilds it into ``queue_at_start``).
    seq_before_start: int = 0
    #: The queue's state when the period began (``QueueState.dump()``), or None for an empty queue.
    queue_at_start: bytes | None = None
    #: conid -> [OutageWindow]: while a farm was down, its snapshots got no price and were excused (released
    #: "interrupted: 2103" or "2110" by the IB actor's outage rule), one contract at a time, not all at once as
    #: a blip (``interruptions_us``) cuts them: the replayed IB answers that contract's snapshots so inside them.
    outages: dict[int, list[OutageWindow]] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return (self.end_us - self.start_us) / 1e6

    @property
    def snapshots_recorded(self) -> int:
        return sum(len(v) for v in self.snapshots.values())


def _us(value: datetime | str | None) -> int | None:
    if value is None:
        return None
    return int(to_utc(value).timestamp() * 1_000_000)


def read_recorded_day(
    data_dir: str,
    *,
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    storage_options: dict[str, str] | None = None,
) -> RecordedDay:
    """Read the period [since, until] (default: everything recorded) of ``data_dir``."""
    events_uri = table_uri(data_dir, "events")
    positions_uri = table_uri(data_dir, "positions")
    with reading("the events table"):
        if not table_exists(events_uri, storage_options):
            raise NoRecordError(f"no event log in {data_dir}")
    with reading("the positions table"):
        if not table_exists(positions_uri, storage_options):
            raise NoRecordError(f"no positions table in {data_dir}: nothing was priced, nothing to compare with")
    since_us, until_us = _us(since), _us(until)
    if since_us is not None and until_us is not None and until_us <= since_us:
        raise NoRecordError("--until must be after --since")
    reader = _LogReader(since_us)
    seq_before_start = 0
    with reading("the events table"):
        for stored in read_events(events_uri, types=_TYPES, until=until, storage_options=storage_options):
            if (reader.first_start_us is None) if since_us is None else (stored.ts_us < since_us):
                seq_before_start = stored.seq  # before the period: up to the first RuntimeStarted, or --since
            reader.take(stored.ts_us, stored.event)
    reader.close_outages()
    if reader.first_start_us is None:
        if until_us is not None and not reader.last_us:  # not one event read: all came after --until
            raise NoRecordError(f"nothing recorded before --until {until}: the log starts after it")
        if since_us is not None:
            if until_us is not None:
                raise NoRecordError(f"nothing recorded from --since {since} to --until {until}")
            raise NoRecordError(f"nothing recorded after --since {since}: the log ends before it")
        if until_us is not None:
            raise NoRecordError(f"no run started before --until {until}")
        raise NoRecordError(f"no run recorded in {data_dir} (no RuntimeStarted event)")
    start_us = reader.first_start_us
    if since_us is not None and not reader.running_at_start:
        if reader.first_run_us is None:
            raise NoRecordError(f"no run recorded after --since {since}")
        start_us = reader.first_run_us  # nothing ran between --since and the next start: nothing to replay there
        reader.down = [(a, b) for a, b in reader.down if a >= start_us]
    last_us = reader.last_us
    with reading("the positions table"):
        quotes, stream_tick_s, portfolio, contracts, positions_last = _read_positions(positions_uri, start_us, until_us, storage_options)
    recorded_until = max(last_us, positions_last)
    # past the last thing recorded there is nothing to compare with: the period ends there
    end_us = recorded_until if until_us is None else min(until_us, recorded_until)
    if end_us <= start_us:
        raise NoRecordError("the period holds no time after the first run started")
    if not contracts:
        raise NoRecordError("no position was priced in the period")
    down = reader.down_periods(start_us, end_us)
    return RecordedDay(
        start_us=start_us,
        end_us=end_us,
        max_lines=reader.max_lines,
        settings=reader.settings,
        true_lines=reader.learned,
        learned_at_start=reader.learned_at_start,
        contracts=contracts,
        active_at_start={c: dict(legs) for c, legs in reader.legs_at_start.items() if legs},
        active_changes=reader.changes,
        snapshots=dict(reader.samples),
        interruptions_us=reader.interruptions,
        down=down,
        quotes=quotes,
        portfolio=portfolio,
        stream_tick_s=stream_tick_s,
        paced=reader.paced,
        rate_limited_us=reader.rate_limited,
        stream_refusals=dict(reader.stream_refusals),
        refusals_101=reader.refusals_101,
        streamed=_without(reader.stream_periods(end_us), down),
        snapshots_claimed=reader.claimed,
        seq_before_start=seq_before_start,
        outages=dict(reader.outages),
    )


class _LogReader:
    """One pass over the log's events: the state when the period starts, and the changes after it.

    The period starts at ``since``, or else at the first ``RuntimeStarted``.
    """

    def __init__(self, since_us: int | None) -> None:
        self.since_us = since_us
        self.first_start_us: int | None = None  # the period's start, once reached
        self.last_us = 0
        self.max_lines = 0
        self.settings: dict[str, float] = {}
        self.paced = True
        self._config_fixed = False
        self.learned: int | None = None
        self.learned_at_start: int | None = None
        self.legs: dict[int, dict[str, int]] = defaultdict(dict)
        self.legs_at_start: dict[int, dict[str, int]] = {}
        self.changes: list[ActiveChange] = []
        self.claims: dict[int, tuple[int, int]] = {}  # item id -> (claimed at, conid)
        self.samples: dict[int, list[SnapshotSample]] = defaultdict(list)
        self.interruptions: list[int] = []
        #: conid -> [(claimed at, released at, code)] of its excused snapshots since its window opened.
        self._excused: dict[int, list[tuple[int, int, int]]] = {}
        self.outages: dict[int, list[OutageWindow]] = defaultdict(list)
        self.rate_limited: list[int] = []
        self.refusals_101 = 0
        #: (learned?, conid) -> times of 101s seen from one side only so far (see _saw_101).
        self._unpaired_101: dict[tuple[bool, str], list[int]] = defaultdict(list)
        self.stream_refusals: dict[int, list[tuple[int, int]]] = defaultdict(list)
        self.down: list[tuple[int, int]] = []
        #: IB outages while a runtime ran (closed periods), and the start of the one under way.
        self.ib_down: list[tuple[int, int]] = []
        self._ib_down_since: int | None = None
        self._stopped_at: int | None = None
        self._ran = False
        #: A runtime was running when the period began (else the period really begins at the next start).
        self.running_at_start = False
        self.first_run_us: int | None = None
        self.streaming: dict[int, int] = {}
        self.streamed: dict[int, list[tuple[int, int]]] = defaultdict(list)
        self.claimed = 0

    def take(self, ts_us: int, event: Event) -> None:
        previous_us, self.last_us = self.last_us, max(self.last_us, ts_us)
        started = self.first_start_us is not None
        if not started and (ts_us >= self.since_us if self.since_us is not None else isinstance(event, RuntimeStarted)):
            started = True
            self.first_start_us = self.since_us if self.since_us is not None else ts_us
            self.legs_at_start = {c: dict(legs) for c, legs in self.legs.items() if legs}
            self.learned_at_start = self.learned
            self.running_at_start = self._ran and self._stopped_at is None
            # a run in effect when the period begins (--since mid-run) is "as run"; a restart inside it is not
            self._config_fixed = self._config_fixed or self.running_at_start
            if self._stopped_at is not None:  # the period starts while no runtime ran
                self.down.append((self.first_start_us, self.first_start_us))
        match event:
            case RuntimeStarted():
                self.close_outages()  # a run killed without a stop: its outages ended with it
                if started and self.first_run_us is None:
                    self.first_run_us = ts_us
                if not self._config_fixed:  # the run in effect at the start (or the first after it) is "as run"
                    self.max_lines = event.max_lines
                    self.paced = event.mode != "demo"
                    self.settings = dict(event.freshness)
                    self._config_fixed = started
                if started and self.down and self.down[-1][0] == self.down[-1][1]:
                    self.down[-1] = (self.down[-1][0], ts_us)
                elif started and self._ran and self._stopped_at is None and previous_us < ts_us:
                    # the run before ended without RuntimeStopped (killed): nothing ran from its last event on
                    self.down.append((previous_us, ts_us))
                self._stopped_at = None
                self._ran = True
            case ConnectionStateChanged(state=state):
                if state not in DATA_FLOWS:
                    if self._ib_down_since is None:
                        self._ib_down_since = ts_us
                elif self._ib_down_since is not None:
                    self._end_ib_outage(ts_us)
                    self.close_outages()  # a new session, or IB's servers back (1101/1102): farms reported afresh
            case RuntimeStopped():
                self.close_outages()  # the next run's IB session knows of no outage until IB reports one again
                self._end_ib_outage(ts_us)  # from here on the runtime's own gap covers it
                self._end_streams(ts_us)
                self._stopped_at = ts_us
                if started:
                    self.down.append((ts_us, ts_us))
            case LineLimitLearned(limit=limit, reason=reason):
                self.learned = limit
                if started and reason.startswith("101 on"):  # "101 on stream C" / "101 on a snapshot of C"
                    self._saw_101(ts_us, reason.rsplit(" ", 1)[-1], learned=True)
            case LegAdded(conid=c, strategy=s, priority=p):
                self.legs[c][s] = p
                self._change(started, ActiveChange(ts_us, c, s, "leg_added", p))
            case LegRemoved(conid=c, strategy=s):
                self.legs[c].pop(s, None)
                self._change(started, ActiveChange(ts_us, c, s, "leg_removed"))
            case ContractActivated(conid=c, strategy=s):
                self._change(started, ActiveChange(ts_us, c, s, "activated"))
            case ContractDeactivated(conid=c, strategy=s):
                self._change(started, ActiveChange(ts_us, c, s, "deactivated"))
            case StreamStarted(conid=c) | StreamPromoted(conid=c):
                self.streaming.setdefault(c, ts_us)
                if c in self._excused:  # it left the queue: its silence says nothing of the time it streamed
                    self._close_outage(c)
            case StreamDemoted(conid=c) | StreamStopped(conid=c):
                # IB refused the stream: replayed as it refused it (101 aside); also from before the period, as a
                # contract without a subscription is refused for good
                code = getattr(event, "code", None)
                if code is not None and classify_ib_code(code) is not IbErrorKind.MAX_TICKERS:
                    self.stream_refusals[c].append((ts_us, code))
                elif code is not None and started:
                    self._saw_101(ts_us, str(c), learned=False)
                begun = self.streaming.pop(c, None)
                if begun is not None:
                    self.streamed[c].append((begun, ts_us))
            case RouterRestarted():
                self._end_streams(ts_us)
            case ItemClaimed(item_id=i, conid=c):
                if started:
                    self.claims[i] = (ts_us, c)
                    self.claimed += 1
            case ItemSucceeded(item_id=i):
                self._sample(i, ts_us, "ok", None)
            case ItemRetryScheduled(item_id=i, code=code):
                self._sample(i, ts_us, "failed", code)
            case ItemDeadLettered(item_id=i, code=code):
                # the simulated IB answers every snapshot of such a contract the same way
                terminal = code is not None and classify_ib_code(code) in TERMINAL_KINDS
                self._sample(i, ts_us, "terminal" if terminal else "failed", code)
            case ItemReleased(item_id=i, conid=c, detail=detail):
                claimed = self.claims.pop(i, None)
                if started and detail.startswith("interrupted") and not _connection_lost(detail):
                    code = _code_of(detail)
                    if code in _OUTAGE_CODES:  # this contract's silence in an outage, never a blip for all
                        if claimed is not None:  # (claimed before --since: its window is not known)
                            self._excused.setdefault(c, []).append((claimed[0], ts_us, code))
                    else:
                        self.interruptions.append(ts_us)
                elif started and detail.startswith("rate_limited"):
                    self.rate_limited.append(ts_us)
                elif started and detail.startswith("refused"):  # the worker's word for a 101 (MAX_TICKERS)
                    self._saw_101(ts_us, str(c), learned=False)
            case _:
                pass

    def _saw_101(self, ts_us: int, conid: str, *, learned: bool) -> None:
        """Count one 101, seen from either side: the stream demoted or snapshot released for it, or the limit
        the router learned from it. Most show both, in either order (the queue and the router log apart, within
        milliseconds); a 101 on a stream already being shed shows only the limit, and one that taught nothing
        new only the demotion or release, so a side left unpaired for a second is a 101 of its own."""
        other = self._unpaired_101[(not learned, conid)]
        while other and ts_us - other[0] > _SAME_101_US:
            other.pop(0)  # too old to be this 101's other side
        if other:
            other.pop(0)  # the same 101, seen from the other side
            return
        self._unpaired_101[(learned, conid)].append(ts_us)
        self.refusals_101 += 1

    def _end_ib_outage(self, ts_us: int) -> None:
        if self._ib_down_since is not None:
            self.ib_down.append((self._ib_down_since, ts_us))
            self._ib_down_since = None

    def down_periods(self, start_us: int, end_us: int) -> list[tuple[int, int]]:
        """Every period without data within [start_us, end_us), merged and sorted.

        Stopped-to-started gaps and IB's outages; one still open (or a stop
        never followed by a start) runs to ``end_us``.
        """
        periods = [(a, end_us if a == b else b) for a, b in self.down]
        periods += self.ib_down
        if self._ib_down_since is not None:
            periods.append((self._ib_down_since, end_us))
        merged: list[tuple[int, int]] = []
        for a, b in sorted((max(a, start_us), min(b, end_us)) for a, b in periods):
            if b <= a:
                continue
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        return merged

    def _end_streams(self, ts_us: int) -> None:
        for conid, begun in self.streaming.items():
            self.streamed[conid].append((begun, ts_us))
        self.streaming.clear()

    def stream_periods(self, end_us: int) -> dict[int, list[tuple[int, int]]]:
        """Stream periods that overlap the period (a stream still held at the end runs to ``end_us``)."""
        self._end_streams(end_us)
        start = self.first_start_us or 0
        return {
            c: [(max(a, start), min(b, end_us)) for a, b in spans if b > start and a < end_us]
            for c, spans in self.streamed.items()
        }

    def _change(self, started: bool, change: ActiveChange) -> None:
        if started:
            self.changes.append(change)

    def _sample(self, item_id: int, ts_us: int, outcome: str, code: int | None) -> None:
        claimed = self.claims.pop(item_id, None)
        if claimed is not None:
            self.samples[claimed[1]].append(SnapshotSample(max(0.0, (ts_us - claimed[0]) / 1e6), outcome, code))
            if claimed[1] in self._excused:  # answered on its own again: its farm was back
                self._close_outage(claimed[1], claimed[0] if outcome == "ok" else 0)

    def _close_outage(self, conid: int, back_us: int = 0) -> None:
        excused = self._excused.pop(conid)
        latencies = sorted((end - start) / 1e6 for start, end, _ in excused)
        self.outages[conid].append(
            OutageWindow(excused[0][0], excused[-1][1], latencies[len(latencies) // 2], excused[-1][2], back_us)
        )

    def close_outages(self) -> None:
        """A session ended or began, or the period is over: every contract still excused had its data away until
        its last excused snapshot, and an outage after this is a new one."""
        for conid in list(self._excused):
            self._close_outage(conid)


#: The two sides of one 101 in the log (see _LogReader._saw_101) are this close.
_SAME_101_US = 1_000_000

#: Snapshots these end were cut by the connection, which the log records as an outage (ib.connection_state).
_CONNECTION_KINDS = frozenset({IbErrorKind.DISCONNECTED, IbErrorKind.CONNECTIVITY_LOST, IbErrorKind.RESTORED_DATA_LOST})


#: The codes the IB actor gives a snapshot that got no price while a market data farm (2103) or TWS's link to
#: IB's data server (2110) was down: that contract's data was away, which says nothing of the others'.
_OUTAGE_CODES = frozenset({2103, 2110})


def _code_of(detail: str) -> int | None:
    """The code of a release's detail ("interrupted: 2103"), if it names one."""
    code = detail.partition(":")[2].strip()
    return int(code) if code.lstrip("-").isdigit() else None


def _connection_lost(detail: str) -> bool:
    """Whether a release ("interrupted: <code>") came from the connection, not from a farm blip.

    Those are replayed as the outage itself; counted as blips too, they would
    also cut the snapshots that ended in the second before the drop.
    """
    code = _code_of(detail)
    return code is None or classify_ib_code(code) in _CONNECTION_KINDS


def _without(
    streamed: dict[int, list[tuple[int, int]]], down: list[tuple[int, int]]
) -> dict[int, list[tuple[int, int]]]:
    """Stream periods less the outages: the router keeps a stream through a disconnect, but nothing ticks then."""
    if not down:
        return streamed
    out: dict[int, list[tuple[int, int]]] = {}
    for conid, spans in streamed.items():
        kept = []
        for a, b in spans:
            for d0, d1 in down:  # sorted, not overlapping
                if d1 <= a or d0 >= b:
                    continue
                if d0 > a:
                    kept.append((a, d0))
                a = max(a, d1)
            if a < b:
                kept.append((a, b))
        out[conid] = kept
    return out


def _read_positions(
    uri: str, start_us: int, until_us: int | None, storage_options: dict[str, str] | None
) -> tuple[dict[int, np.ndarray], float, dict[int, np.ndarray], list[RecordedContract], int]:
    """Quote times per contract (stream and snapshot rows), the usual gap of a stream's rows, portfolio mark
    times per contract, every contract held, and the last row's time.

    Only rows from ``LOOKBACK_S`` before the period on are read (the file statistics on ``ts`` prune the
    rest): enough for each contract's newest quote before the period, without the table's whole history.
    """
    ts_type = pa.timestamp("us", tz="UTC")
    expr = pc.field("ts") >= pa.scalar(start_us - int(LOOKBACK_S * 1e6), ts_type)
    if until_us is not None:
        expr = expr & (pc.field("ts") <= pa.scalar(until_us, ts_type))
    table = (
        open_table(uri, storage_options)
        .to_pyarrow_dataset()
        .to_table(columns=["conid", "symbol", "sec_type", "position", "delta", "source", "ts"], filter=expr)
    )
    if table.num_rows == 0:
        return {}, 1.0, {}, [], 0
    table = table.sort_by([("conid", "ascending"), ("ts", "ascending")])
    conids = table.column("conid").to_numpy()
    ts = table.column("ts").cast(pa.int64()).to_numpy()
    sources = table.column("source").to_pylist()
    symbols = table.column("symbol").to_pylist()
    sec_types = table.column("sec_type").to_pylist()
    positions = table.column("position").to_pylist()
    deltas = table.column("delta").to_pylist()
    is_quote = np.array([s in ("stream", "queue") for s in sources])
    is_stream = np.array([s == "stream" for s in sources])
    is_portfolio = np.array([s == "portfolio" for s in sources])
    quotes: dict[int, np.ndarray] = {}
    stream_quotes: dict[int, np.ndarray] = {}
    portfolio: dict[int, np.ndarray] = {}
    contracts = []
    bounds = np.flatnonzero(np.diff(conids)) + 1
    for lo, hi in zip(np.concatenate(([0], bounds)), np.concatenate((bounds, [len(conids)])), strict=True):
        conid = int(conids[lo])
        window = slice(lo, hi)
        quotes[conid] = ts[window][is_quote[window]]
        stream_quotes[conid] = ts[window][is_stream[window]]
        portfolio[conid] = ts[window][is_portfolio[window]]
        held = [p for p in positions[lo:hi] if p is not None]
        known_deltas = [d for d in deltas[lo:hi] if d is not None]
        if held and held[-1] == 0 and all(p == 0 for p in held):
            continue  # never held in the record: nothing to price
        contracts.append(
            RecordedContract(
                conid=conid,
                symbol=symbols[hi - 1] or "",
                sec_type=sec_types[hi - 1] or "",
                position=float(held[-1]) if held else 0.0,
                delta=known_deltas[-1] if known_deltas else None,
                appeared_us=max(start_us, int(ts[lo])),
            )
        )
    return quotes, _usual_gap_s(stream_quotes), portfolio, contracts, int(ts.max())


def _usual_gap_s(stream_quotes: dict[int, np.ndarray]) -> float:
    """The median gap between consecutive stream rows of a contract (1 s: one positions flush, if none)."""
    gaps = [np.diff(t) for t in stream_quotes.values() if len(t) > 1]
    if not gaps:
        return 1.0
    joined = np.concatenate(gaps)
    joined = joined[joined > 0]
    return float(np.median(joined)) / 1e6 if len(joined) else 1.0
