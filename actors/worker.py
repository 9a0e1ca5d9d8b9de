"""The QueueWorker: keeps as many snapshots open as the line ledger allows, stalest contracts first.

There is no poll timer and no batch size. The worker borrows snapshot lines
from the router's ledger (``AcquireLines``), claims exactly that many items
from the queue -- the queue hands out the contracts furthest past their
target age first -- and sends one snapshot per contract, so each line comes
back the moment its own snapshot is over, not when the slowest of a batch
is. Every answer is published to the handlers, acknowledged to the queue,
and reported to the router (``SnapshotDone``), which frees the line, learns
from a 101 and owes the contract its next refresh.

Snapshot requests are paced by a token bucket at
``max_snapshot_msgs_per_s`` (a share of IB's 50 messages/s); a 321
("snapshot requests limitation exceeded") halves that rate for a while.
The physical bound of a refresh cycle is therefore
``N / min(free_lines / snapshot_s, max_snapshot_msgs_per_s)``.

How a snapshot ended decides the acknowledgement:

* a quote -> Succeed;
* disconnect, reset, farm blip (DATA_INTERRUPTED), 101, 321 -> Release:
  not the contract's fault, no attempt counted (a competing session or a
  101 also pauses new snapshots, 0.5 s doubling to 8 s, and sends one at a
  time until a quote comes through or IB reports the connection back; 321
  halves the rate; while the socket is down nothing is claimed at all). A
  farm blip's item goes back *held*: not claimable for 2 s, doubling to
  60 s while its contract's snapshots keep being cut, so one farm down (its
  contracts silent or cut) does not put its contracts, still the stalest,
  back in front of every contract IB can serve. A farm blip does not pause
  the worker: the worker cannot tell one farm down from all, and a pause
  probes the stalest contract, one at a time -- always the down farm's,
  whose short holds have passed by its next probe -- so the others went
  unrefreshed for the whole outage. The holds and the message budget bound
  what a farm that stays down costs. IB's "farm OK" (2104, 2108) after an
  outage, or a connection restored, lifts every hold at once;
* no subscription even for delayed data, no such contract -> Fail(terminal):
  dead-lettered at once, never a retry storm;
* anything else (no data, timeout) -> Fail: retried with backoff.

The worker never blocks its own thread on IB, the queue or the router: each
step is an ``ask_async`` whose answer comes back as a message.

Handles: Wake (timer), ConnectionStateChanged and IbError 2104/2108 (a
farm back: holds are lifted) from IB, WorkerStatus (ask).
Emits: AcquireLines / ReleaseLines / SnapshotDone to the router; Claim /
Succeed / Fail / Release / LiftHolds to the queue; Snapshot to IB;
MarketUpdate(source="queue") to the handlers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import msgspec
import pykka
from loguru import logger

from actors.handlers import HandlerSet
from actors.messaging import ReplyFuture, Request, ask_async
from events.base import Command, Reply
from events.ib import (
    DATA_FLOWS,
    MARKET_DATA_FARM_BACK_CODES,
    TERMINAL_KINDS,
    ConnectionStateChanged,
    IbError,
    IbErrorKind,
    Snapshot,
    SnapshotFailed,
    SnapshotResult,
)
from events.queue import Claim, ClaimedItem, Fail, LiftHolds, Release, Succeed
from events.router import AcquireLines, LineGrant, ReleaseLines, SnapshotDone, SnapshotOutcome

__all__ = ["QueueWorker", "TokenBucket", "Wake", "WorkerSettings", "WorkerStatus", "WorkerStatusReply"]

#: Not the contract's fault: back to the queue without an attempt.
_RELEASE_KINDS: dict[IbErrorKind, SnapshotOutcome] = {
    IbErrorKind.DISCONNECTED: "interrupted",
    IbErrorKind.DATA_INTERRUPTED: "interrupted",
    IbErrorKind.CONNECTIVITY_LOST: "interrupted",
    IbErrorKind.RESTORED_DATA_LOST: "interrupted",
    IbErrorKind.COMPETING_SESSION: "interrupted",  # 10197: another login took the data, not this contract's fault
    IbErrorKind.MAX_TICKERS: "refused",
    IbErrorKind.SNAPSHOT_RATE_LIMITED: "rate_limited",
    IbErrorKind.PACING: "rate_limited",
}
#: Answers that say "not now" for every contract alike (a competing session, no free line at IB: other clients
#: of the account hold them): new snapshots pause with backoff instead of asking at full rate. Not a farm blip
#: (DATA_INTERRUPTED): it may be one farm's, and its items go back held instead (``interrupted_hold_s``).
_PAUSING_KINDS = frozenset({IbErrorKind.COMPETING_SESSION, IbErrorKind.MAX_TICKERS})


class WorkerSettings(msgspec.Struct, frozen=True, kw_only=True):
    #: Snapshot requests per second at most (IB paces all messages at 50/s).
    max_snapshot_msgs_per_s: float = 10.0
    lease_s: float = 60.0
    snapshot_timeout_s: float = 11.0
    #: With nothing to claim or no line free, look again after this long.
    idle_s: float = 0.2
    #: After a 321, the rate stays reduced at least this long.
    rate_limit_hold_s: float = 10.0
    #: Snapshots refused for every contract (10197, 101) pause new ones this long, doubling while it lasts...
    interrupted_pause_s: float = 0.5
    #: ...up to this; the first quote that comes through ends the pause.
    interrupted_pause_max_s: float = 8.0
    #: A snapshot cut by a farm blip, or silent while a farm is down, goes back to the queue held this long before
    #: it can be claimed again, doubling while its contract's snapshots keep coming back so: the contract's farm
    #: may be the one that is down, and its item, still the stalest, would otherwise be claimed again at once,
    #: ahead of every contract IB can serve...
    interrupted_hold_s: float = 2.0
    #: ...up to this (how late, at most, such a contract is asked again after its farm is back).
    interrupted_hold_max_s: float = 60.0
    #: Wait until this many snapshots can go out together (never more than the bucket holds: a second's worth).
    #: 1, the runtime's: each snapshot leaves the moment its token is there. The what-if replay may set more
    #: (``--step``): the same decisions a few at a time, each snapshot up to ``(batch - 1) / rate`` s later.
    batch: int = 1


class Wake(Command, tag="worker.wake", frozen=True, kw_only=True):
    """Look for work now (the worker's own timers send it; tests may too)."""

    #: The worker's own timer that sent it (0: anyone else). Only its newest timer counts: an older one that
    #: a sooner wake-up replaced is stale, and acting on it would start a timer of its own, without end.
    timer: int = 0


class WorkerStatus(Command, tag="worker.status", frozen=True, kw_only=True):
    pass


class WorkerStatusReply(Reply, tag="worker.status_reply", frozen=True, kw_only=True):
    connected: bool
    busy: bool
    cycles: int
    succeeded: int
    failed: int
    released: int
    updates_published: int
    snapshots_in_flight: int
    rate_per_s: float = 0.0
    mean_snapshot_s: float = 0.0


#: Token counts are floats: this much short of a whole token counts as the token.
_TOKEN_SLACK = 1e-6


class TokenBucket:
    """``rate`` tokens a second, at most ``rate`` (one second's worth) saved up; the clock is passed in."""

    def __init__(self, rate: float, now: float) -> None:
        self.configured = rate
        self.rate = rate
        self.tokens = min(1.0, rate)
        self._at = now
        self._slow_until = 0.0
        self._halved_at = float("-inf")

    def _refill(self, now: float) -> None:
        if now >= self._slow_until and self.rate < self.configured:
            self.rate = min(self.configured, self.rate * 1.25)  # climb back after the hold
            self._slow_until = now + 1.0
        elif now == self._at:
            # refilled at this instant already (a pump asks several times): no time to add tokens for, and the
            # tokens never exceed the cap, so the update below would change nothing
            return
        self.tokens = min(max(1.0, self.rate), self.tokens + (now - self._at) * self.rate)
        self._at = now

    def available(self, now: float) -> int:
        if now != self._at or self.rate < self.configured:  # else _refill would change nothing (a pump asks often)
            self._refill(now)
        # a token refilled in pieces can sum to 0.9999999999999998: counted as whole, or the wait for the
        # missing 2e-16 rounds away and a caller that sleeps wait_s() would wake at the same instant forever
        return int(self.tokens + _TOKEN_SLACK)

    def take(self, n: int, now: float) -> None:
        if now != self._at or self.rate < self.configured:
            self._refill(now)
        self.tokens -= n

    def wait_s(self, now: float, tokens: int = 1) -> float:
        """Seconds until ``tokens`` (at most what the bucket holds) are there."""
        if now != self._at or self.rate < self.configured:
            self._refill(now)
        if self.tokens + _TOKEN_SLACK >= tokens:
            return 0.0
        # at least a microsecond: a shorter wait may not move a float clock on (see available())
        return max(1e-6, (tokens - self.tokens) / self.rate)

    def slow_down(self, now: float, hold_s: float) -> None:
        """IB said too many snapshots: halve the rate, hold it at least ``hold_s``.

        Refusals within a second of the one that halved it are the same overload at IB (a burst of requests
        refused together): they extend the hold but do not halve again.
        """
        self._refill(now)
        if now - self._halved_at >= 1.0:
            self.rate = max(self.configured / 16, self.rate / 2)
            self._halved_at = now
        self.tokens = min(self.tokens, 0.0)
        self._slow_until = max(self._slow_until, now + hold_s)


class _Answer(msgspec.Struct, frozen=True):
    """Internal message: one of the worker's asks was answered (``future`` is settled); ``step`` goes on from it.

    The future's callback runs on the thread of the actor that answered, so it only tells the worker this
    message (``deliver``), and the answer is read on the worker's own thread. The rest says what the ask was
    for: the lines a claim is for, the item and line a snapshot is for and when it was sent. Made when the
    ask is sent (:meth:`QueueWorker._ask`), so an answer costs no closure and no message built in the
    answering thread. Frozen, as every message that crosses a thread; never encoded.
    """

    tell: Callable[[Any], None]
    step: Callable[[_Answer], None]
    future: ReplyFuture
    lines: list[LineGrant] | None = None
    item: ClaimedItem | None = None
    line: LineGrant | None = None
    started: float = 0.0

    def deliver(self, _: ReplyFuture) -> None:
        self.tell(self)


class QueueWorker(pykka.ThreadingActor):
    """See the module docstring."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        queue: pykka.ActorRef[Any],
        ib: pykka.ActorRef[Any],
        router: pykka.ActorRef[Any],
        handlers: HandlerSet,
        connected: bool = False,
        clock: Callable[[], float] = time.monotonic,
        call_later: Callable[[float, Callable[[], None]], None] | None = None,
    ) -> None:
        """``clock`` and ``call_later`` (run a function after a delay; default a daemon timer thread) are
        injected together by the what-if simulator, which drives this same code on simulated time."""
        super().__init__()
        self.settings = settings
        self.queue = queue
        self.ib = ib
        self.router = router
        self.handlers = handlers
        self.connected = connected
        self._clock = clock
        self._call_later = call_later or _timer_thread
        self.bucket = TokenBucket(settings.max_snapshot_msgs_per_s, clock())
        self._batch = settings.batch
        #: The last round got fewer lines, or items, than it asked for: the message budget is not what holds
        #: snapshots back now, so a batch would only delay them.
        self._short = False
        self._asked_lines = 0
        #: A borrow-and-claim round is under way (one at a time).
        self.acquiring = False
        self.open: dict[int, ClaimedItem] = {}  # item id -> item, snapshots sent and not answered
        self._wake_at: float | None = None
        #: The newest wake-up timer's number (Wake.timer); older ones still pending are stale.
        self._timer = 0
        #: While IB's data farm is away every snapshot comes back interrupted: no point asking at full rate.
        self._pause_s = 0.0
        self._paused_until = 0.0
        #: conid -> the hold its last interrupted snapshot went back with (s); forgotten at its next quote.
        self._holds: dict[int, float] = {}
        self.cycles = 0
        self.succeeded = 0
        self.failed = 0
        self.released = 0
        #: Seconds the succeeded snapshots took, together (their mean in ``status``).
        self._snapshot_s_total = 0.0
        # Nothing more here without need: past 30 attributes CPython 3.11 no longer shares an instance's keys, and
        # every attribute read of the worker (a few dozen a snapshot) gets slower.

    def on_start(self) -> None:
        self._pump()

    def on_stop(self) -> None:
        self._wake_at = None

    def on_receive(self, message: Any) -> Any:
        kind = type(message)
        if kind is _Answer:  # three a snapshot: before any other test
            message.step(message)
            return None
        if kind is Wake:  # the worker's own timer, about one a snapshot: before the Request test and the match
            if not message.timer or message.timer == self._timer:  # else a sooner wake-up replaced it, and has run or will
                self._wake_at = None
                self._pump()
            return None
        if isinstance(message, Request):
            if isinstance(message.command, WorkerStatus):
                message.reply.set(self.status())
            elif isinstance(message.command, Wake):
                self._pump()
                message.reply.set(self.status())
            else:
                message.reply.set_exception(TypeError(f"worker takes no command {type(message.command).__name__}"))
            return None
        match message:
            case ConnectionStateChanged(state=state):
                was = self.connected
                self.connected = state in DATA_FLOWS
                if was and not self.connected:
                    logger.warning("worker: IB disconnected ({}); open snapshots come back without an attempt", state)
                if self.connected:
                    self._pause_s = self._paused_until = 0.0  # IB says data flows again
                    self._lift_holds()
                    self._pump()
            case IbError(code=code) if code in MARKET_DATA_FARM_BACK_CODES:
                self._lift_holds()  # a farm is back, perhaps the one that cut them: no need to wait out the holds
                self._pump()
            case _:
                pass
        return None

    def status(self) -> WorkerStatusReply:
        return WorkerStatusReply(
            connected=self.connected,
            busy=bool(self.open) or self.acquiring,
            cycles=self.cycles,
            succeeded=self.succeeded,
            failed=self.failed,
            released=self.released,
            updates_published=self.succeeded,
            snapshots_in_flight=len(self.open),
            rate_per_s=round(self.bucket.rate, 3),
            mean_snapshot_s=round(self._snapshot_s_total / self.succeeded, 3) if self.succeeded else 0.0,
        )

    # ------------------------------------------------------------------ the loop

    def _pump(self) -> None:
        """Borrow lines for as many snapshots as the message budget allows now."""
        if self.acquiring or not self.connected:
            return
        now = self._clock()
        if now < self._paused_until:
            self._wake_in(self._paused_until - now, now)
            return
        n = self.bucket.available(now)
        # a batch waits for its tokens (never more than the bucket holds, a second's worth at its present rate,
        # or the wait would never end); not while lines or items are what is short (each line that comes back,
        # each item due, takes the next snapshot, as without a batch), nor after an interruption, when one at a
        # time tries whether data is back
        if self._batch == 1 or self._pause_s > 0 or self._short:
            need = 1
        else:
            need = max(1, min(self._batch, int(self.bucket.rate)))
        if n < need:
            self._wake_in(self.bucket.wait_s(now, need), now)
            return
        if self._pause_s > 0:
            if self.open:
                return
            n = 1
        self.acquiring = True
        self.cycles += 1
        self._asked_lines = n
        self._ask(self.router, AcquireLines(n=n), self._granted)

    def _granted(self, answer: _Answer) -> None:
        try:
            lines: list[LineGrant] = answer.future.get(timeout=0).lines
        except Exception as exc:  # noqa: BLE001 - any failure is an answer without lines
            logger.error("worker: the router did not lend lines: {}", repr(exc))
            lines = []
        self._short = len(lines) < self._asked_lines
        if not lines:
            self.acquiring = False
            self._wake_in(self.settings.idle_s)
            return
        if not self.connected:
            self._give_back(lines)
            self.acquiring = False
            return
        claim = Claim(n=len(lines), lease_s=self.settings.lease_s, worker="worker")
        self._ask(self.queue, claim, self._claimed, lines=lines)

    def _claimed(self, answer: _Answer) -> None:
        self.acquiring = False
        lines: list[LineGrant] = answer.lines  # type: ignore[assignment]  # always given with a claim
        try:
            items: list[ClaimedItem] = answer.future.get(timeout=0).items
        except Exception as exc:  # noqa: BLE001 - any failure is an answer without items
            logger.error("worker: claim failed: {}", repr(exc))
            items = []
        if len(items) < len(lines):
            self._give_back(lines[len(items) :])
            self._short = True
        if not self.connected:
            self._release(list(items), "disconnected")
            self._give_back(lines[: len(items)])
            return
        now = self._clock()
        self.bucket.take(len(items), now)
        timeout_s = self.settings.snapshot_timeout_s
        for item, line in zip(items, lines, strict=False):
            self.open[item.item_id] = item
            self._ask(self.ib, Snapshot(conids=[item.conid], timeout_s=timeout_s), self._snapshotted, item=item, line=line, started=now)
        if len(items) < len(lines):
            self._wake_in(self.settings.idle_s)  # nothing more is claimable now
        else:
            # also after a short borrow: an answer that came back while this round was under way could not pump
            # (acquiring), so its line is free now and only this pump finds it at once
            self._pump()

    def _snapshotted(self, answer: _Answer) -> None:
        item: ClaimedItem = answer.item  # type: ignore[assignment]  # always given with a snapshot
        line: LineGrant = answer.line  # type: ignore[assignment]
        try:
            result: SnapshotResult | None = answer.future.get(timeout=0)
            error = ""
        except Exception as exc:  # noqa: BLE001 - any failure is a snapshot without an answer
            result, error = None, repr(exc)
        self.open.pop(item.item_id, None)
        now = self._clock()
        if result is None:
            logger.error("worker: snapshot request for {} failed: {}", item.conid, error)
            self._release([item], "released")
            self._report(line, item.conid, "interrupted", error=error[:200])
        elif result.updates:
            update = result.updates[0]
            self._snapshot_s_total += now - answer.started
            self.handlers.publish(update)
            self.succeeded += 1  # also the updates published and the snapshots timed: one each
            self._tell(self.queue, Succeed(item_ids=[item.item_id], leases=[item.lease_until_us]))
            self._report(line, item.conid, "ok", update=update)
            self._pause_s = 0.0
            if self._holds:
                self._holds.pop(item.conid, None)
        else:
            failure = (
                result.failures[0]
                if result.failures
                else SnapshotFailed(conid=item.conid, kind=IbErrorKind.DISCONNECTED, message="no answer")
            )
            self._failed(item, line, failure, now)
        self._pump()

    def _failed(self, item: ClaimedItem, line: LineGrant, failure: SnapshotFailed, now: float) -> None:
        error = f"{failure.kind}: {failure.message}"[:200]
        outcome = _RELEASE_KINDS.get(failure.kind)
        if outcome is not None:
            if outcome == "rate_limited":
                self.bucket.slow_down(now, self.settings.rate_limit_hold_s)
                logger.warning("worker: IB limits snapshots ({}); rate now {:.1f}/s", failure.code, self.bucket.rate)
            elif failure.kind in _PAUSING_KINDS and now >= self._paused_until:
                # a competing session or no line at IB (the socket stays up, so no connection state stops the
                # claims): the first refusal, or the one probe after a pause, backs off further; the others
                # refused at the same moment say nothing new
                s = self.settings
                self._pause_s = min(s.interrupted_pause_max_s, max(s.interrupted_pause_s, 2 * self._pause_s))
                self._paused_until = now + self._pause_s
            hold_s = self._hold(item.conid) if failure.kind is IbErrorKind.DATA_INTERRUPTED else 0.0
            self._release([item], f"{outcome}: {failure.code}", hold_s)
            self._report(line, item.conid, outcome, error=error)
            return
        terminal = failure.kind in TERMINAL_KINDS
        self.failed += 1
        if self._holds:  # its own failure: the item's delay is a retry's backoff now, not a hold to lift
            self._holds.pop(item.conid, None)
        self._tell(
            self.queue,
            Fail(
                item_id=item.item_id,
                error=error,
                code=failure.code,
                lease_until_us=item.lease_until_us,
                terminal=terminal,
            ),
        )
        self._report(line, item.conid, "failed", error=error, terminal=terminal)

    # ------------------------------------------------------------------ plumbing

    def _report(self, line: LineGrant, conid: int, outcome: SnapshotOutcome, **fields: Any) -> None:
        self._tell(self.router, SnapshotDone(line_id=line.line_id, conid=conid, outcome=outcome, **fields))

    def _give_back(self, lines: list[LineGrant]) -> None:
        if lines:
            self._tell(self.router, ReleaseLines(line_ids=[line.line_id for line in lines]))

    def _lift_holds(self) -> None:
        """IB says data is back: the items held since a farm outage cut their snapshots may be claimed now, and a
        contract cut again starts over at the first hold. Which farm serves which contract IB does not say, so
        every hold is lifted; a contract whose farm is still down is cut and held again."""
        if self._holds:
            conids = sorted(self._holds)
            self._holds.clear()
            self._tell(self.queue, LiftHolds(conids=conids))

    def _hold(self, conid: int) -> float:
        """How long the item of ``conid``, cut by a farm outage, waits before it is claimable again (see
        ``WorkerSettings.interrupted_hold_s``): doubled since its last quote, so a contract whose farm stays
        down costs a line ever more rarely, and a contract cut once by a blip is asked again soon."""
        s = self.settings
        hold = self._holds[conid] = min(s.interrupted_hold_max_s, 2 * self._holds.get(conid, s.interrupted_hold_s / 2))
        return hold

    def _release(self, items: list[ClaimedItem], reason: str, hold_s: float = 0.0) -> None:
        if not items:
            return
        self.released += len(items)
        self._tell(
            self.queue,
            Release(
                item_ids=[i.item_id for i in items],
                reason=reason[:200],
                leases=[i.lease_until_us for i in items],
                hold_s=hold_s,
            ),
        )

    def _tell(self, ref: pykka.ActorRef[Any], message: Any) -> None:
        try:
            ref.tell(message)
        except pykka.ActorDeadError:  # only while shutting down: leases bring items back, the ledger reclaims lines
            logger.warning("worker: {} gone; {} not sent", type(message).__name__, type(message).__name__)

    def _wake_in(self, delay_s: float, now: float | None = None) -> None:
        """Wake after ``delay_s`` (from ``now``, the clock read just before, if given), unless a sooner wake-up is set."""
        due = (self._clock() if now is None else now) + delay_s
        if self._wake_at is not None and self._wake_at <= due:
            return
        self._wake_at = due
        self._timer += 1
        wake = Wake(timer=self._timer)
        self._call_later(max(0.0, delay_s), partial(self._tell_self, wake))

    def _tell_self(self, message: Any) -> None:
        try:
            self.actor_ref.tell(message)
        except pykka.ActorDeadError:
            pass

    def _ask(self, ref: pykka.ActorRef[Any], command: Any, step: Callable[[_Answer], None], **context: Any) -> None:
        """Ask ``ref``; when the answer comes, ``step`` runs on this actor's thread with it (see :class:`_Answer`).

        The what-if replay's worker (``actors.what_if_sim.ReplayWorker``) overrides this one method: its
        peers answer on the loop, without a thread, a future or a mailbox in between.
        """
        future = ask_async(ref, command)
        future.add_done_callback(_Answer(self._tell_self, step, future, **context).deliver)


def _timer_thread(delay_s: float, fn: Callable[[], None]) -> None:
    timer = threading.Timer(delay_s, fn)
    timer.daemon = True
    timer.start()
