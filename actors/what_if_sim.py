"""What-if replay: the real router, queue and worker, re-run on simulated time against a replaying IB.

The scheduler and the line ledger are not re-implemented here. The same
:class:`~actors.router.StreamRouter`, :class:`~actors.queue.QueueActor` and
:class:`~actors.worker.QueueWorker` the runtime starts are built as plain
objects (never started as pykka actors) and driven by a discrete-event loop:

* their clocks read the loop's simulated time (the constructors take a
  clock; the worker also takes ``call_later`` for its wake-ups);
* what IB and the record send them, and their own timers, go through
  :class:`SimRef`\\ s, whose ``tell`` puts the message on the loop at the
  current simulated instant, in order, to ``on_receive`` as in production;
  the worker's messages to the router and the queue, and the router's to
  the queue, are handled in the sender's turn (:class:`DirectRef`), and the
  worker is the runtime's with its ask replaced (:class:`ReplayWorker`):
  answers come back as plain values, without futures or a mailbox hop;
* the worker may send a step's worth of snapshots together
  (``SimConfig.step_s``, ``WorkerSettings.batch``; off by default): each up
  to a step later than the runtime would, for a replay about 1.5 times as
  fast;
* their log is a :class:`MemoryLog` that is durable at once, so
  ``after_durable`` effects run in order without a disk;
* IB is :class:`ReplayingIb`: the account's true line count (a request
  beyond it gets 101, as IB answers), each contract's recorded snapshot
  latencies and outcomes in order, recorded farm blips, and the time no
  runtime ran (a disconnect);
* on a day recorded against a real gateway, every request and cancel reaches
  IB when the IB actor's pacer would let it leave (:class:`PacedWire`, the
  rule of :class:`~actors.ib_pacing.Pacer`): a burst of subscribes (many
  contracts activated at once, a resubscribe after a reset) reaches IB over
  a second or more, behind the snapshot requests and cancels already in the
  pacer, while open snapshots end and free their lines. That decides which
  requests of a burst IB refuses with 101, and so how the router learns its
  limit: from several refusals, as the runtime did, not from the first. The
  demo's fake IB has no pacer, and a day it recorded is replayed without one.

Nothing sleeps: a recorded trading day runs as fast as the decisions can be
computed (``benchmarks/what_if.py``). IB's portfolio marks are replayed as the
positions table kept them (the router dates never-priced contracts by
them). What the loop cannot know is left out and said so in
docs/audit.md: portfolio marks the writer did not keep, the
contracts' expiries and multipliers (not in the positions table; ranking
falls back to priority and |delta| x position), and quotes of streams
between rows (a stream is modelled as one quote per ``stream_tick_s``).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from loguru import logger

from actors.config import FreshnessSettings
from actors.handlers import HandlerSet
from actors.messaging import CommandRejected, Request
from actors.queue import QueueActor
from actors.queue_state import QueueState
from actors.router import ActiveAtStart, RouterSettings, RouterTick, StreamRouter
from actors.worker import QueueWorker, WorkerSettings, _Answer
from events.base import Event
from events.ib import (
    TERMINAL_KINDS,
    ConnectionState,
    ConnectionStateChanged,
    IbError,
    IbErrorKind,
    MarketUpdate,
    MarketUpdates,
    PositionChanged,
    Snapshot,
    SnapshotFailed,
    SnapshotResult,
    StreamEnded,
    Subscribe,
    Unsubscribe,
    classify_ib_code,
)
from events.registry import ContractActivated, ContractDeactivated, LegAdded, LegRemoved
from storage.event_log import LogFailedError, Receipt
from storage.recorded_day import RecordedDay, SnapshotSample

__all__ = ["MemoryLog", "ReplayingIb", "SimConfig", "SimLoop", "SimOutcome", "SimRef", "SimulationStuck", "simulate"]

#: IB's snapshot latency when a contract has no recorded snapshot (IB documents "up to 11 s"; most take ~1-2 s).
DEFAULT_SNAPSHOT_S = 1.0
#: A farm blip recorded at t cuts the snapshots that end within this many seconds of t.
BLIP_WINDOW_S = 1.0
#: A recorded 321 (snapshot rate exceeded) refuses the first snapshot request reaching IB this soon after it.
RATE_LIMIT_WINDOW_S = 1.0
#: How often the replaying IB tells the router that its streams still tick (the router's view of their age).
STREAM_HEARTBEAT_S = 5.0
#: The IB actor's minimum stream age before a cancel leaves (events.ib.IbSettings.min_stream_age_s).
MIN_STREAM_AGE_S = 1.0
#: Messages at one simulated instant beyond which the loop reports a livelock instead of hanging.
MAX_STEPS_AT_ONE_INSTANT = 1_000_000
#: A new stream's first tick arrives this long after the request.
FIRST_TICK_S = 0.3


class SimulationStuck(RuntimeError):
    """The simulated actors kept exchanging messages without time moving on (a livelock in the code under test)."""


class SimLoop:
    """A discrete-event loop on simulated time: a heap of (time, order, action).

    ``now`` counts seconds from the period's start, not from the epoch: at
    epoch scale a double resolves only ~0.2 µs, and a token bucket's tiny
    waits would then never move time on. ``clock_us`` gives the epoch time
    the log and the quotes use.
    """

    def __init__(self, start_us: int) -> None:
        self.start_us = start_us
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[Any], Any], Any]] = []
        #: Messages for the current instant, in the order they were sent (most of the traffic: no heap needed).
        self._ready: deque[tuple[Callable[[Any], Any], Any]] = deque()
        self._order = itertools.count()
        self.steps = 0

    def at(self, t: float, fn: Callable[[Any], Any], arg: Any = None) -> None:
        if t <= self.now:
            self._ready.append((fn, arg))
        else:
            heapq.heappush(self._heap, (t, next(self._order), fn, arg))

    def soon(self, fn: Callable[[Any], Any], arg: Any = None) -> None:
        self._ready.append((fn, arg))

    def clock_s(self) -> float:
        return self.now

    def clock_us(self) -> int:
        return self.start_us + int(self.now * 1_000_000)

    def at_us(self, ts_us: int, fn: Callable[[Any], Any], arg: Any = None) -> None:
        """Schedule at an epoch time in µs (recorded times)."""
        self.at((ts_us - self.start_us) / 1e6, fn, arg)

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> None:
        self.at(self.now + delay_s, _call, fn)

    def run_until(self, end_s: float) -> None:
        """Run every action due up to ``end_s``; the instant's messages first, then the next due time."""
        heap, ready, pop, popleft = self._heap, self._ready, heapq.heappop, self._ready.popleft
        most = MAX_STEPS_AT_ONE_INSTANT
        steps = 0
        while True:
            at_once = 0
            while ready:
                fn, arg = popleft()
                fn(arg)
                at_once += 1
                if at_once > most:
                    raise SimulationStuck(f"more than {most} steps at t={self.now:.6f} s: time does not move on")
            steps += at_once
            if not heap or heap[0][0] > end_s:
                break
            t, _, fn, arg = pop(heap)
            self.now = t
            fn(arg)
            steps += 1
        self.steps += steps
        self.now = end_s


def _call(fn: Callable[[], None]) -> None:
    """A ``call_later`` function, run on the loop (no closure made a wake-up)."""
    fn()


class SimRef:
    """Stands in for a pykka ActorRef: ``tell`` delivers to ``on_receive`` on the loop, in order."""

    def __init__(self, loop: SimLoop, target: Any) -> None:
        self._receive = target.on_receive
        self._enqueue = loop._ready.append  # SimLoop.soon without the call: a replayed day tells millions

    def tell(self, message: Any) -> None:
        self._enqueue((self._receive, message))


class DirectRef:
    """A ref whose ``tell`` has the target handle the message at once, in the sender's turn.

    For the worker's messages to the router and the queue, and the router's to the queue: the sender
    reaches its peer before it does anything else, which is one order the threads of the runtime may
    take (each sender's messages stay in the order sent, and the target handles one message at a time:
    none of these targets tells its sender anything synchronously). Asks come only from the worker,
    through :meth:`ask_then`. What the base class's ``on_receive`` checks first cannot happen here (a
    failed recovery, a commit confirmed later: the memory log is durable at once), so a told message
    goes straight to ``handle_message``.
    """

    def __init__(self, target: Any) -> None:
        self.tell = target.handle_message
        self._command = target.handle_command

    def ask_then(self, command: Any, reply: Settled, answer: _Answer) -> None:
        """:meth:`ReplayWorker._ask`: the target answers now, and the worker's step goes on with it at once.

        The reply or refusal ``_handle_request`` would give: the memory log is durable at once, so nothing
        waits for a commit, and a command the target refuses is the worker's error to read, as through a
        future.
        """
        try:
            reply.value = self._command(command)
        except (CommandRejected, LogFailedError) as exc:
            reply.error = exc
        answer.step(answer)


class Settled:
    """A reply already given, read as a ReplyFuture is (``get``), without its lock, waiter or callbacks."""

    __slots__ = ("error", "value")

    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None

    def get(self, *, timeout: float | None = None) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class ReplayWorker(QueueWorker):
    """The runtime's QueueWorker with one method replaced: how an ask reaches its peer and its answer comes back.

    Every decision is QueueWorker's own (``_pump``, ``_granted``, ``_claimed``, ``_snapshotted``, the token
    bucket). The peers are the loop's objects, not threads: the router and the queue answer at once
    (:class:`DirectRef`), the replaying IB when the snapshot's recorded latency has passed, and the step
    runs then, with a :class:`Settled` reply where the runtime reads a future.
    """

    def _ask(self, ref: Any, command: Any, step: Callable[[_Answer], None], **context: Any) -> None:
        reply = Settled()
        ref.ask_then(command, reply, _Answer(self._tell_self, step, reply, **context))  # type: ignore[arg-type]

    def _tell_self(self, message: Any) -> None:
        """Its wake-ups, to its :class:`SimRef` (never stopped: no ``ActorDeadError`` to catch, no property to read)."""
        self._actor_ref.tell(message)


class MemoryLog:
    """The event log of a simulation: every append is durable at once; keeps nothing but the count."""

    uri = "memory://what-if"
    storage_options = None
    opened_seq = 0

    def __init__(self) -> None:
        self.durable_seq = 0

    def append(self, event: Event, *, stream: str, key: str) -> Receipt:
        self.durable_seq += 1
        # no batch: durable already. Built as Receipt._make does, without its Python-level __new__ (three a snapshot)
        return _new_tuple(Receipt, (self.durable_seq, None))

    def flush(self) -> None:
        return None


_new_tuple = tuple.__new__


class _Recorder:
    """The handlers of a simulation: keeps the time of every snapshot quote per contract."""

    def __init__(self) -> None:
        self.quotes: dict[int, list[int]] = defaultdict(list)

    def publish(self, message: Any) -> int:
        if type(message) is MarketUpdate and message.source == "queue":
            self.quotes[message.conid].append(message.ts_us)
        return 1


@dataclass(frozen=True, slots=True)
class SimConfig:
    """One configuration to replay: the account's lines and the settings the runtime would run with."""

    label: str
    #: [runtime] max_lines.
    max_lines: int
    #: The account's true line count at IB.
    true_lines: int
    #: What the router knows of the limit at the start (a restart keeps the learned limit).
    learned_at_start: int | None
    #: [freshness]: the targets, the snapshot budget and the ranking, as the runtime reads them.
    freshness: FreshnessSettings = field(default_factory=FreshnessSettings)
    max_attempts: int = 5
    retry_backoff_s: float = 1.0
    retry_backoff_cap_s: float = 300.0
    dead_letter_retry_s: float = 900.0
    lease_s: float = 60.0
    snapshot_timeout_s: float = 11.0
    as_run: bool = False
    #: The replayed worker's step (s): it sends the snapshots a step's worth of the message budget allows
    #: together (WorkerSettings.batch), each up to a step later than the runtime, which sends each the
    #: moment its token is there (0, the default: replay exactly so; docs/audit.md, "What-if"). The bucket
    #: holds a second's worth, so a step past 1 s sends no more together than 1 s does.
    step_s: float = 0.0
    #: The IB actor's pacer (``[ib] pacing_per_s``), None for a day the demo's fake IB recorded (no pacer).
    pacing_per_s: float | None = None
    #: Its window: 1 s plus ``[ib] pacing_guard_s``.
    pacing_window_s: float = 1.1
    #: How long a stream is kept before its cancel is sent (``[ib] min_stream_age_s``; the demo's fake IB: 0).
    min_stream_age_s: float = MIN_STREAM_AGE_S

    @property
    def batch(self) -> int:
        """Snapshots sent together: a step's worth of ``max_snapshot_msgs_per_s``, at least 1."""
        return max(1, int(self.step_s * self.freshness.max_snapshot_msgs_per_s + 1e-9))


@dataclass(slots=True)
class SimOutcome:
    """What a simulated period produced: quote times per contract and what the scheduler spent."""

    config: SimConfig
    #: conid -> sorted quote times (µs): snapshot answers and stream ticks.
    quotes: dict[int, np.ndarray]
    #: conid -> [(start_us, end_us)] while a stream of it was ticking.
    streamed: dict[int, list[tuple[int, int]]]
    refusals_101: int
    loop_steps: int
    final_limit: int
    #: conid -> snapshot requests that reached IB.
    asked: dict[int, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def snapshots_sent(self) -> int:
        return sum(self.asked.values())


class PacedWire:
    """When a message handed to the IB actor's pacer leaves for IB: :class:`~actors.ib_pacing.Pacer`'s rule.

    The pacer sends in the order it was given, at most ``limit`` messages in
    any ``window_s``, and never drops one: a message leaves at the latest of
    now, the message before it, and the moment the ``limit``-th send before
    it leaves the window. Worked out when the message is handed over (O(1))
    instead of by a timer. Nothing is withdrawn once queued except by a
    disconnect (:meth:`clear`): a snapshot request still queued at its
    deadline, which the IB actor withdraws, keeps its place here (it matters
    only with the pacer a whole snapshot timeout behind). A unit test holds
    the two to the same departure times.
    """

    def __init__(self, rate: float, window_s: float) -> None:
        self.limit = max(1, int(rate))  # as Pacer: a fraction of a message is no message
        self.window_s = window_s
        #: Departure times still inside a window that ends now or later, in order (the latest may be queued).
        self._sent: deque[float] = deque()
        self._last = -math.inf

    def depart(self, now: float) -> float:
        """Hand one message over at ``now``; the time it leaves."""
        sent, window = self._sent, self.window_s
        while sent and sent[0] + window <= now:  # out of every window from now on (Pacer drops them so too)
            sent.popleft()
        at = now if now > self._last else self._last
        if len(sent) >= self.limit:
            free = sent[-self.limit] + window
            if free > at:
                at = free
        sent.append(at)
        self._last = at
        return at

    def clear(self, now: float) -> None:
        """The socket went down: what was still queued never leaves (Pacer.clear); what left still counts."""
        sent = self._sent
        while sent and sent[-1] > now:
            sent.pop()
        self._last = sent[-1] if sent else -math.inf


class ReplayingIb:
    """IB as the record says it behaved: a true line count, recorded snapshot latencies, blips and outages."""

    def __init__(
        self,
        loop: SimLoop,
        day: RecordedDay,
        true_lines: int,
        snapshot_timeout_s: float,
        wire: PacedWire | None = None,
        min_stream_age_s: float = MIN_STREAM_AGE_S,
    ) -> None:
        self.loop = loop
        self.true_lines = true_lines
        self.timeout_s = snapshot_timeout_s
        #: The IB actor's minimum stream age before it sends a cancel (``[ib] min_stream_age_s``).
        self.min_stream_age_s = min_stream_age_s
        #: The IB actor's pacer between the runtime and IB (None: the demo's fake IB, which answers at once).
        self.wire = wire
        self.router: SimRef | None = None
        self.connected = True
        self.streams: dict[int, float] = {}  # conid -> subscribed at
        #: Subscribes still in the pacer: conid -> an Unsubscribe came meanwhile (cancelled once IB has it).
        self._subscribing: dict[int, bool] = {}
        #: Streams whose cancel is pending (waiting for the minimum age, or in the pacer).
        self._cancel_pending: set[int] = set()
        #: Subscribed again while their cancel was pending: a new request follows the cancel (the IB actor's
        #: ``MdRequest.resubscribe``; it never revives a stream whose StreamEnded it has promised).
        self._resubscribe: set[int] = set()
        self.ticking: dict[int, float] = {}  # conid -> first tick at
        #: Snapshots IB has not answered yet: the worker's answer -> conid (a disconnect answers them all).
        self.open_snapshots: dict[_Answer, int] = {}
        #: Snapshot requests still in the pacer: the worker's answer -> conid (no line yet; a disconnect drops them).
        self.queued_snapshots: dict[_Answer, int] = {}
        #: conid -> snapshot requests that reached IB.
        self.asked: Counter[int] = Counter()
        self.refusals_101 = 0
        #: Snapshot requests that came while the connection was down (each answered "disconnected").
        self.asked_while_down = 0
        self.streamed: dict[int, list[tuple[int, int]]] = defaultdict(list)
        self._samples = {c: itertools.cycle(s) for c, s in day.snapshots.items() if s}
        everyone = [s for samples in day.snapshots.values() for s in samples if s.outcome == "ok"]
        self._fallback = itertools.cycle(everyone or [SnapshotSample(DEFAULT_SNAPSHOT_S, "ok")])
        self._blips = [(ts_us - day.start_us) / 1e6 for ts_us in sorted(day.interruptions_us)]
        self._blip_i = 0  # the first blip not yet more than BLIP_WINDOW_S in the past (the loop's time only grows)
        #: When IB refused a snapshot for the request rate (321): each refuses the first snapshot request that
        #: reaches IB within RATE_LIMIT_WINDOW_S after it (none comes that soon: IB saw no burst to refuse).
        self._rate_limited = deque((ts_us - day.start_us) / 1e6 for ts_us in sorted(day.rate_limited_us))
        #: Snapshots answered 321 from the record.
        self.refusals_321 = 0
        #: Contracts whose every stream IB refused for good (no subscription, no such contract): conid -> code.
        self._refused_for_good: dict[int, int] = {}
        #: conid -> [(s, code)] refusals that passed (a competing session, 10197): each refuses one subscribe near it.
        self._refused_at: dict[int, list[tuple[float, int]]] = {}
        for conid, refusals in day.stream_refusals.items():
            for ts_us, code in refusals:
                if classify_ib_code(code) in TERMINAL_KINDS:
                    self._refused_for_good[conid] = code
                else:
                    self._refused_at.setdefault(conid, []).append(((ts_us - day.start_us) / 1e6, code))
            if conid in self._refused_for_good and not day.snapshots.get(conid):
                # never snapshotted in the record: IB would have refused a snapshot the same way
                self._samples[conid] = itertools.cycle([SnapshotSample(0.0, "terminal", self._refused_for_good[conid])])
        #: conid -> [(from s, to s, latency s, code)]: its data away in a farm outage (RecordedDay.outages).
        self._outages = {
            c: [((w.start_us - day.start_us) / 1e6, (w.end_us - day.start_us) / 1e6, w.latency_s, w.code) for w in ws]
            for c, ws in day.outages.items()
        }
        self._deltas = {c.conid: c.delta for c in day.contracts}
        self._epoch = 0  # bumped at every disconnect: answers of an older connection are void

    # ------------------------------------------------------------------ lines

    def lines_used(self) -> int:
        return len(self.streams) + len(self.open_snapshots)

    def _send(self, arrive: Callable[[Any], None], arg: Any) -> bool:
        """A request or cancel reaches IB (``arrive``) when the pacer lets it leave: now, or later on the loop
        (then True: it waits in the pacer)."""
        wire, now = self.wire, self.loop.now
        at = now if wire is None else wire.depart(now)
        if at <= now:
            arrive(arg)
            return False
        self.loop.at(at, self._arrives, (self._epoch, arrive, arg))
        return True

    def _arrives(self, sent: tuple[int, Callable[[Any], None], Any]) -> None:
        epoch, arrive, arg = sent
        if epoch == self._epoch:  # else it was still in the pacer when the socket went down: it never left
            arrive(arg)

    def _cancel_snapshot(self) -> None:
        """The IB actor cancels an answered snapshot at IB: the cancel takes its place in the pacer.

        Its line is counted free from the answer on, as before the pacer was modelled: IB publishes no rule
        on when an answered snapshot stops holding one, and the TWS simulator's ends with its
        tickSnapshotEnd, just after the quote, without waiting for the cancel.
        """
        if self.wire is not None:
            self.wire.depart(self.loop.now)

    def on_receive(self, message: Any) -> None:
        if isinstance(message, Request):  # snapshots come through ask_then (ReplayWorker)
            message.reply.set_exception(TypeError(f"what-if IB takes no {type(message.command).__name__} request"))
            return
        match message:
            case Subscribe(conid=conid):
                self._subscribe_sent(conid)
            case Unsubscribe(conid=conid):
                self._unsubscribe(conid)
            case _:
                pass

    def _subscribe_sent(self, conid: int) -> None:
        """The IB actor hands a subscribe to its pacer (none while the socket is down: the router resubmits)."""
        if not self.connected:
            return
        if conid in self.streams or conid in self._subscribing:  # the IB actor sends nothing for a stream it has
            if conid in self._cancel_pending or self._subscribing.get(conid):
                self._resubscribe.add(conid)
            return
        if self._send(self._subscribe_arrives, conid):
            self._subscribing[conid] = False  # waits in the pacer; an Unsubscribe meanwhile sets it

    def _subscribe_arrives(self, conid: int) -> None:
        cancel = self._subscribing.pop(conid, False)
        self._subscribe(conid)
        if cancel and conid in self.streams:  # unsubscribed while it waited: cancelled once it is old enough
            self._unsubscribe(conid)

    def _subscribe(self, conid: int) -> None:
        if not self.connected or conid in self.streams:
            return  # down: the router resubmits on reconnect; already streaming: IB ignores the duplicate
        code = self._refusal(conid)
        if code is not None:
            self._tell_router(StreamEnded(conid=conid, reason="refused", code=code, ts_us=self.loop.clock_us()))
            return
        if self.lines_used() >= self.true_lines:
            self.refusals_101 += 1
            self._tell_router(StreamEnded(conid=conid, reason="refused", code=101, ts_us=self.loop.clock_us()))
            return
        now = self.loop.now
        self.streams[conid] = now
        self.loop.at(now + FIRST_TICK_S, self._first_tick, (conid, now))

    def _refusal(self, conid: int) -> int | None:
        """The code IB refused this contract's stream with in the record, if it would refuse it now."""
        code = self._refused_for_good.get(conid)
        if code is not None or conid not in self._refused_at:
            return code
        now, refusals = self.loop.now, self._refused_at[conid]
        for i, (at, code) in enumerate(refusals):
            if abs(at - now) <= BLIP_WINDOW_S:
                del refusals[i]  # each recorded refusal refuses one request
                return code
        return None

    def _first_tick(self, arg: tuple[int, float]) -> None:
        conid, since = arg
        if self.streams.get(conid) != since:
            return  # cancelled, or lost with the connection, before it ticked
        self.ticking[conid] = self.loop.now
        self._tell_router(MarketUpdate(conid=conid, source="stream", ts_us=self.loop.clock_us(), delta=self._deltas.get(conid)))

    def _unsubscribe(self, conid: int) -> None:
        since = self.streams.get(conid)
        if since is None:
            if conid in self._subscribing:  # its subscribe is still in the pacer: the IB actor's cancel_pending
                self._subscribing[conid] = True
                return
            self._tell_router(StreamEnded(conid=conid, reason="cancelled", ts_us=self.loop.clock_us()))
            return
        self._cancel_pending.add(conid)
        leaves = max(self.loop.now, since + self.min_stream_age_s)
        self.loop.at(leaves, self._cancel_leaves, (conid, since))

    def _cancel_leaves(self, arg: tuple[int, float]) -> None:
        """The stream is old enough: the IB actor hands its cancel to the pacer, and IB ends it when it comes."""
        conid, since = arg
        if self.streams.get(conid) == since:
            self._send(self._cancel_arrives, arg)

    def _cancel_arrives(self, arg: tuple[int, float]) -> None:
        conid, since = arg
        if self.streams.get(conid) != since:
            return
        self._end_stream(conid)
        self._cancel_pending.discard(conid)
        self._tell_router(StreamEnded(conid=conid, reason="cancelled", ts_us=self.loop.clock_us()))
        if conid in self._resubscribe:  # subscribed again meanwhile: the new request follows the cancel
            self._resubscribe.discard(conid)
            self._subscribe_sent(conid)

    def _end_stream(self, conid: int) -> None:
        self.streams.pop(conid, None)
        first = self.ticking.pop(conid, None)
        if first is not None:
            self.streamed[conid].append((self.loop.start_us + int(first * 1e6), self.loop.clock_us()))

    def heartbeat(self, _: Any = None) -> None:
        if self.ticking and self.router is not None:
            ts = self.loop.clock_us()
            self._tell_router(MarketUpdates(updates=[MarketUpdate(conid=c, source="stream", ts_us=ts) for c in self.ticking]))
        self.loop.at(self.loop.now + STREAM_HEARTBEAT_S, self.heartbeat)

    # ------------------------------------------------------------------ snapshots

    def ask_then(self, command: Snapshot, reply: Settled, answer: _Answer) -> None:
        """A snapshot request of :class:`ReplayWorker`: answered after the contract's next recorded latency."""
        conid = command.conids[0]
        if not self.connected:
            self.asked_while_down += 1
            self._answer_later(reply, answer, conid, IbErrorKind.DISCONNECTED, None)
            return
        now = self.loop.now
        deadline = now + self.timeout_s  # the IB actor's, counted from before the request entered the pacer
        at = now if self.wire is None else self.wire.depart(now)
        if at <= now:
            self._snapshot_arrives(conid, reply, answer, now, deadline)
            return
        self.queued_snapshots[answer] = conid
        if at > deadline:  # still in the pacer at its deadline: the IB actor withdraws it (never sent) and times out
            self.loop.at(deadline, self._snapshot_withdrawn, (conid, reply, answer))
        else:
            self.loop.at(at, self._snapshot_leaves, (conid, reply, answer, now, deadline))

    def _snapshot_withdrawn(self, arg: tuple[int, Settled, _Answer]) -> None:
        conid, reply, answer = arg
        if self.queued_snapshots.pop(answer, None) is not None:  # else a disconnect answered it first
            self._answer(reply, answer, conid, IbErrorKind.TIMEOUT, None)

    def _refused_for_rate(self) -> bool:
        """A recorded 321 is due: this request takes it, unless it came too long after (then it is dropped)."""
        due, now = self._rate_limited, self.loop.now
        while due and due[0] <= now:
            if now - due.popleft() <= RATE_LIMIT_WINDOW_S:
                self.refusals_321 += 1
                return True
        return False

    def _snapshot_leaves(self, arg: tuple[int, Settled, _Answer, float, float]) -> None:
        conid, reply, answer, asked_at, deadline = arg
        if self.queued_snapshots.pop(answer, None) is not None:  # else a disconnect dropped it from the pacer
            self._snapshot_arrives(conid, reply, answer, asked_at, deadline)

    def _snapshot_arrives(self, conid: int, reply: Settled, answer: _Answer, asked_at: float, deadline: float) -> None:
        self.asked[conid] += 1
        if self._rate_limited and self._rate_limited[0] <= self.loop.now and self._refused_for_rate():
            self._answer_later(reply, answer, conid, IbErrorKind.SNAPSHOT_RATE_LIMITED, 321)
            return
        if len(self.streams) + len(self.open_snapshots) >= self.true_lines:  # lines_used(), one call less a snapshot
            self.refusals_101 += 1
            self._answer_later(reply, answer, conid, IbErrorKind.MAX_TICKERS, 101)
            return
        now = self.loop.now
        if self._outages and conid in self._outages and self._outage_now(conid, now, reply, answer, asked_at, deadline):
            return
        sample = next(self._samples.get(conid, self._fallback))
        self.open_snapshots[answer] = conid
        # a recorded latency runs from the claim, through the recorded run's own pacer: it counts from the ask here
        # too (from the arrival it would count a burst's wait twice), and never ends before the request reached IB
        ends = asked_at + sample.latency_s
        if ends < now:
            ends = now
        if ends > deadline:  # the IB actor gives up then: no quote, an attempt counted
            ends, sample = deadline, SnapshotSample(deadline - asked_at, "failed", None)
        self.loop.at(ends, self._snapshot_ends, (conid, reply, answer, sample, self._epoch))

    def _outage_now(self, conid: int, now: float, reply: Settled, answer: _Answer, asked_at: float, deadline: float) -> bool:
        """Inside one of the contract's outage windows: answered as the runtime's was then (no price, after the
        window's latency, at the deadline at most: excused, DATA_INTERRUPTED), holding its line meanwhile."""
        for start, end, latency, code in self._outages[conid]:
            if start <= now <= end:
                self.open_snapshots[answer] = conid
                ends = min(max(now, asked_at + latency), deadline)
                outcome = "silent" if ends >= deadline else "no price"  # timed out (cancelled at IB) or ended by IB
                sample = SnapshotSample(ends - asked_at, outcome, code)
                self.loop.at(ends, self._snapshot_ends, (conid, reply, answer, sample, self._epoch))
                return True
        return False

    def _snapshot_ends(self, arg: tuple[int, Settled, _Answer, SnapshotSample, int]) -> None:
        conid, reply, answer, sample, epoch = arg
        if epoch != self._epoch:
            return  # the connection it was sent on is gone, and the disconnect answered it
        del self.open_snapshots[answer]
        if self._in_blip(self.loop.now):
            self._answer(reply, answer, conid, IbErrorKind.DATA_INTERRUPTED, 10182)
        elif sample.outcome == "ok":
            if self.wire is not None:  # answered at its first quote and cancelled at IB then (_cancel_snapshot)
                self.wire.depart(self.loop.now)
            update = MarketUpdate(conid=conid, source="queue", ts_us=self.loop.clock_us(), delta=self._deltas.get(conid))
            reply.value = SnapshotResult(updates=[update])
            answer.step(answer)
        elif sample.outcome in ("silent", "no price"):  # a farm outage's (_outage_now)
            if sample.outcome == "silent":
                self._cancel_snapshot()  # timed out: the IB actor cancels it at IB
            self._answer(reply, answer, conid, IbErrorKind.DATA_INTERRUPTED, sample.code)
        elif sample.outcome == "failed" and sample.code is None:
            self._cancel_snapshot()  # timed out: the IB actor cancels it at IB
            self._answer(reply, answer, conid, IbErrorKind.TIMEOUT, None)
        else:
            kind = classify_ib_code(sample.code) if sample.code is not None else IbErrorKind.TIMEOUT
            self._answer(reply, answer, conid, kind, sample.code)

    def _in_blip(self, now_s: float) -> bool:
        """A recorded blip within BLIP_WINDOW_S of now, on either side (``now_s`` never goes back)."""
        blips, i = self._blips, self._blip_i
        while i < len(blips) and now_s - blips[i] > BLIP_WINDOW_S:
            i += 1
        self._blip_i = i
        return i < len(blips) and blips[i] - now_s <= BLIP_WINDOW_S

    @staticmethod
    def _answer(reply: Settled, answer: _Answer, conid: int, kind: IbErrorKind, code: int | None) -> None:
        reply.value = SnapshotResult(failures=[SnapshotFailed(conid=conid, kind=kind, code=code, message="what-if")])
        answer.step(answer)

    def _answer_later(self, reply: Settled, answer: _Answer, conid: int, kind: IbErrorKind, code: int | None) -> None:
        """An answer given at the instant of the request, or cut by a disconnect: the worker reads it as its next
        message, as the runtime's does, and not inside the step that asked (which would ask again before it
        heard of the disconnect: a burst of refused requests, one nested call deeper each)."""
        self.loop.soon(_answered, (reply, answer, conid, kind, code))

    # ------------------------------------------------------------------ the connection

    def disconnect(self, peers: Iterable[SimRef]) -> None:
        if not self.connected:
            return
        self.connected = False
        self._epoch += 1
        self._subscribing.clear()  # dropped with the pacer's queue: the router resubmits after the reconnect
        self._cancel_pending.clear()
        self._resubscribe.clear()
        if self.wire is not None:
            self.wire.clear(self.loop.now)
        for conid in list(self.streams):
            self._end_stream(conid)
        # told first: the worker knows IB is gone before it reads the answers the disconnect cut, and asks nothing more
        for peer in peers:
            peer.tell(ConnectionStateChanged(state=ConnectionState.DISCONNECTED, detail="what-if: runtime down"))
        # as the IB actor does: every open snapshot fails "disconnected" (its item goes back without an attempt)
        cut, self.open_snapshots = self.open_snapshots | self.queued_snapshots, {}
        self.queued_snapshots = {}
        for answer, conid in cut.items():
            self._answer_later(answer.future, answer, conid, IbErrorKind.DISCONNECTED, None)  # type: ignore[arg-type]

    def reconnect(self, peers: Iterable[SimRef]) -> None:
        if self.connected:
            return
        self.connected = True
        for peer in peers:
            peer.tell(ConnectionStateChanged(state=ConnectionState.CONNECTED, resubscribe=True))

    def finish(self) -> None:
        for conid in list(self.ticking):
            self._end_stream(conid)

    def _tell_router(self, message: Any) -> None:
        if self.router is not None:
            self.router.tell(message)


def _answered(arg: tuple[Settled, _Answer, int, IbErrorKind, int | None]) -> None:
    """ReplayingIb._answer_later's answer, on the loop."""
    ReplayingIb._answer(*arg)


def simulate(day: RecordedDay, config: SimConfig) -> SimOutcome:
    """Re-run ``day`` with ``config`` through the real router, queue and worker; nothing sleeps.

    The ``actors`` modules' log lines are off while it runs (in this process: ``what-if`` has its own):
    their operator lines (a limit learned, a stream demoted) describe a day that is not happening.
    """
    logger.disable("actors")
    try:
        return _simulate(day, config)
    finally:
        logger.enable("actors")


def _simulate(day: RecordedDay, config: SimConfig) -> SimOutcome:
    loop = SimLoop(day.start_us)
    log = MemoryLog()
    recorder = _Recorder()
    handlers: HandlerSet = recorder  # type: ignore[assignment]  # publish() is all the actors use
    wire = None if config.pacing_per_s is None else PacedWire(config.pacing_per_s, config.pacing_window_s)
    ib = ReplayingIb(loop, day, config.true_lines, config.snapshot_timeout_s, wire, config.min_stream_age_s)
    ib_ref = SimRef(loop, ib)

    queue = QueueActor(
        log,  # type: ignore[arg-type]
        clock=loop.clock_us,
        max_attempts=config.max_attempts,
        backoff_base_s=config.retry_backoff_s,
        backoff_cap_s=max(config.retry_backoff_cap_s, config.retry_backoff_s),
        lease_check_s=0.0,
        dead_letter_retry_s=config.dead_letter_retry_s,
    )
    _bind(loop, queue)  # its own timers and effects come back on the loop
    router = StreamRouter(
        log,  # type: ignore[arg-type]
        RouterSettings.from_config(
            config.freshness, max_lines=config.max_lines, snapshot_timeout_s=config.snapshot_timeout_s
        ),
        ib=ib_ref,  # type: ignore[arg-type]
        queue=DirectRef(queue),  # type: ignore[arg-type]
        handlers=handlers,
        timer=False,
        clock=loop.clock_s,
    )
    router_ref = _bind(loop, router)
    ib.router = router_ref
    worker = ReplayWorker(
        WorkerSettings(
            max_snapshot_msgs_per_s=config.freshness.max_snapshot_msgs_per_s,
            lease_s=config.lease_s,
            snapshot_timeout_s=config.snapshot_timeout_s,
            batch=config.batch,
        ),
        queue=DirectRef(queue),  # type: ignore[arg-type]
        ib=ib,  # type: ignore[arg-type]  # its snapshots: ask_then, answered on the loop
        router=DirectRef(router),  # type: ignore[arg-type]
        handlers=handlers,
        clock=loop.clock_s,
        call_later=loop.call_later,
    )
    worker_ref = _bind(loop, worker)

    # start as a restart does: what the router learned of the limit, no streams, an empty queue; and the
    # newest quote of each contract before the period, so that what was fresh is not owed a refresh at once
    router.state.learned_limit = config.learned_at_start
    router.on_recovered()
    for conid, times in day.quotes.items():
        before = times[times < day.start_us]
        if len(before):
            router.latest[conid] = MarketUpdate(conid=conid, source="queue", ts_us=int(before.max()))
    if day.queue_at_start is not None:  # what was waiting when the period began (a restart's recovered queue)
        queue.state = QueueState.load(day.queue_at_start)
    queue.on_recovered()
    # a period that starts mid-run: the contracts the record was streaming then take the stream lines first
    # (the same ones, not whichever rank first among equals)
    for conid in sorted(day.active_at_start):
        if any(a <= day.start_us < b for a, b in day.streamed.get(conid, ())):
            router_ref.tell(ContractActivated(conid=conid, strategy=next(iter(day.active_at_start[conid]))))
    router_ref.tell(
        ActiveAtStart(conids=sorted(day.active_at_start), priorities={c: dict(p) for c, p in day.active_at_start.items()})
    )
    for contract in day.contracts:
        loop.at_us(contract.appeared_us, router.on_receive, _position(contract))
    for conid, marks in day.portfolio.items():
        for ts_us in marks[marks >= day.start_us].tolist():
            loop.at_us(ts_us, router.on_receive, MarketUpdate(conid=conid, source="portfolio", ts_us=ts_us))
    for change in day.active_changes:
        for message in _registry_messages(change):
            loop.at_us(change.ts_us, router.on_receive, message)
            if isinstance(message, ContractActivated):
                loop.at_us(change.ts_us, queue.on_receive, message)
    peers = (router_ref, worker_ref)
    for down_us, up_us in day.down:
        loop.at_us(down_us, lambda _: ib.disconnect(peers))
        loop.at_us(up_us, lambda _: ib.reconnect(peers))
    for peer in peers:
        peer.tell(ConnectionStateChanged(state=ConnectionState.CONNECTED))
    # IB's "farm OK" after a recorded outage: the runtime's worker lifted its holds then (the log keeps no 2104; the
    # claim that got the contract's next quote marks it), else they would run out by themselves, up to a minute late
    farm_back = IbError(code=2104, kind=IbErrorKind.INFO, message="what-if: market data farm connection is OK")
    for back_us in sorted({w.back_us for ws in day.outages.values() for w in ws if w.back_us >= day.start_us}):
        loop.at_us(back_us, lambda _: worker_ref.tell(farm_back))
    tick_s = router.settings.tick_s

    def tick(_: Any) -> None:
        router.on_receive(RouterTick())
        loop.at(loop.now + tick_s, tick)

    loop.at(loop.now + tick_s, tick)
    loop.at(loop.now + STREAM_HEARTBEAT_S, ib.heartbeat)
    loop.run_until((day.end_us - day.start_us) / 1e6)
    ib.finish()

    quotes = {c: np.asarray(t, dtype=np.int64) for c, t in recorder.quotes.items()}
    return SimOutcome(
        config=config,
        quotes=quotes,
        streamed=dict(ib.streamed),
        refusals_101=ib.refusals_101,
        loop_steps=loop.steps,
        final_limit=router.ledger.limit,
        asked=dict(ib.asked),
        extra={"asked_while_down": ib.asked_while_down, "refusals_321": ib.refusals_321},
    )


def _bind(loop: SimLoop, actor: Any) -> SimRef:
    """A SimRef to ``actor``, which also becomes the actor's own ref (what it tells itself comes back on the loop).

    pykka keeps an actor's ref in ``_actor_ref`` behind a read-only property; an actor that is never started
    has no thread to receive on, so the loop takes its place.
    """
    ref = SimRef(loop, actor)
    actor._actor_ref = ref
    return ref


def _position(contract: Any) -> PositionChanged:
    return PositionChanged(
        account="what-if",
        conid=contract.conid,
        symbol=contract.symbol,
        sec_type=contract.sec_type,
        position=contract.position or 1.0,  # held in the period: a zero at its last row still needed prices
        avg_cost=0.0,
        ts_us=contract.appeared_us,
    )


def _registry_messages(change: Any) -> list[Event]:
    match change.kind:
        case "leg_added":
            return [LegAdded(conid=change.conid, strategy=change.strategy, priority=change.priority)]
        case "leg_removed":
            return [LegRemoved(conid=change.conid, strategy=change.strategy)]
        case "activated":
            return [ContractActivated(conid=change.conid, strategy=change.strategy)]
        case "deactivated":
            return [ContractDeactivated(conid=change.conid, strategy=change.strategy)]
    return []
