"""The event-sourced actor: recover, apply at once, let effects out only when durable.

Every stateful actor (registry, queue, router) is one of these. Its state
lives in a pure :class:`EventSourcedState` object whose ``apply(event)`` is
the only way state changes, used both live and in recovery, so replaying the
log can never disagree with what the actor did.

Persist before effect, without a commit wait per command:

* ``persist(event)`` applies the event to the in-memory state at once and
  appends it to the log (which returns immediately with a receipt);
* anything outside the actor that depends on it -- a reply, a message to
  another actor, an IB request -- is registered with ``after_durable`` and
  runs when the group commit holding the event is confirmed;
* the actor meanwhile goes on with its next message, so 10,000 commands in a
  row share a handful of commits instead of waiting for 10,000.

Validate before append: ``persist`` applies the event first and appends it
only if ``apply`` succeeded. An event ``apply`` refuses is never stored (a
stored one would stop every later recovery); the command is rejected and the
state is rebuilt from the log, so nothing changed.

Recovery (in ``on_start``, before the first message): load the newest
snapshot of the actor's stream, then replay only the later events of that
stream (the seq filter prunes files by their statistics). A snapshot past
the log's last durable seq (its events never landed) is ignored, reported and
discarded; an event recovery cannot apply stops it with the seq named.
Recovery only reads, so it runs while the runtime's start-up check reads
the same log; what an actor does after it (``on_recovered``, which may
append) waits for the check's verdict (``EventLog.wait_start_check``), and
an actor whose log the check refused stays inert. A clean stop writes a
snapshot if the stream changed, or at the log's end if the stream's newest
snapshot lags it by ``snapshot_every`` events, so the next start's replay
scans only the tail.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import pykka
from deltalake import DeltaTable
from loguru import logger

from actors.messaging import CommandRejected, Request, reject
from events.base import Event
from storage.event_log import CommitBatch, EventLog, LogFailedError
from storage.reader import read_seq_events
from storage.snapshots import SnapshotStore, StoredSnapshot
from storage.tables import table_uri

__all__ = [
    "Durable",
    "EventSourcedActor",
    "EventSourcedState",
    "RecoveryError",
    "StaleSnapshotsKept",
    "StartRefusedError",
    "state_at",
]


class RecoveryError(RuntimeError):
    """A stored event the actor's state cannot apply: recovery stops at that seq instead of skipping it."""

    def __init__(self, stream: str, seq: int, event: Event, cause: Exception) -> None:
        tag = type(event).__struct_config__.tag
        super().__init__(f"{stream} cannot recover: event seq {seq} ({tag}) does not apply: {cause}")
        self.stream = stream
        self.seq = seq


class StartRefusedError(RecoveryError):
    """The start-up check refused the log after this actor recovered: it stays inert and writes nothing."""

    def __init__(self, stream: str) -> None:
        RuntimeError.__init__(self, f"{stream} did not start: the start-up check refused the event log")
        self.stream = stream
        self.seq = 0


class StaleSnapshotsKept(RecoveryError):
    """Snapshots past the log's end could not be deleted: this actor must not append until they are.

    Once the log grew past their seq, a later start would take one for valid and skip the events at
    the seqs it claims; refusing the start now loses nothing (the next start tries the delete again).
    """

    def __init__(self, stream: str, seq: int, cause: Exception) -> None:
        RuntimeError.__init__(
            self,
            f"{stream} did not start: its snapshots past seq {seq} (the log's end) could not be discarded "
            f"({cause}); starting would let a later start load one and skip events: fix the snapshots "
            "table's storage and start again",
        )
        self.stream = stream
        self.seq = seq


class EventSourcedState(Protocol):
    """Pure state: no I/O, no clocks, no actors; changed only by ``apply``."""

    def apply(self, event: Event) -> None: ...

    def dump(self) -> bytes: ...

    @classmethod
    def load(cls, data: bytes) -> EventSourcedState: ...


S = TypeVar("S", bound=EventSourcedState)


class Durable:
    """Internal message: a commit this actor waits for has landed (or failed)."""

    __slots__ = ("batch",)

    def __init__(self, batch: CommitBatch) -> None:
        self.batch = batch


class EventSourcedActor(pykka.ThreadingActor, Generic[S]):
    """Base of every event-sourced actor.

    Subclasses set ``stream`` and ``state_type``, implement
    ``handle_command(command)`` (for asked commands; return the reply, raise
    ``CommandRejected`` to refuse) and ``handle_message(message)`` (for told
    messages), and call ``persist`` / ``after_durable``.
    """

    stream: ClassVar[str]
    state_type: ClassVar[type[Any]]
    #: Events of this stream between snapshots.
    snapshot_every: int = 50_000

    def __init__(
        self, log: EventLog, snapshots: SnapshotStore | None = None, *, snapshot_every: int | None = None
    ) -> None:
        super().__init__()
        self.log = log
        self.snapshots = snapshots
        if snapshot_every is not None:
            self.snapshot_every = snapshot_every
        self.state: S = self.state_type()
        self.recovered_from_seq = 0
        self.recovered_events = 0
        #: Why recovery stopped, if it did: the actor then holds no trustworthy state and changes nothing.
        self.recovery_error: RecoveryError | None = None
        #: Snapshots of this stream past this seq name events the log does not hold (see _usable_snapshot).
        self._stale_after: int | None = None
        self.last_seq = 0  # seq of the last event of this stream that was applied
        self._last_batch: CommitBatch | None = None
        self._waiting_batches: set[int] = set()
        self._effects: deque[tuple[CommitBatch | None, Callable[[], None], Request | None]] = deque()
        self._since_snapshot = 0

    # ------------------------------------------------------------------ lifecycle

    def on_start(self) -> None:
        try:
            self.recover(self.log.start_view())  # the start's shared view: nothing of this stream was appended since
        except RecoveryError as exc:
            # Not raised: pykka would print a traceback and the actor would vanish silently. The actor stays,
            # refuses every request with this error, writes nothing at stop; the runtime asks for it and stops.
            self.recovery_error = exc
            logger.error("{}", exc)
            return
        except Exception:
            # a damaged table can fail the read itself; if the start-up check refuses the log, it says why
            if not self.log.wait_start_check():
                self.recovery_error = StartRefusedError(self.stream)
                return
            raise
        # recovery only read; what follows may append, and must not build on a log the start-up check refuses
        if not self.log.wait_start_check():
            self.recovery_error = StartRefusedError(self.stream)
            return
        try:
            self._discard_stale_snapshots()
        except StaleSnapshotsKept as exc:
            self.recovery_error = exc
            logger.error("{}", exc)
            return
        self.on_recovered()

    def recover(self, source: DeltaTable | None = None, *, backed: int | None = None) -> None:
        """Rebuild the state from the newest usable snapshot and the later events of ``source`` (default: the table now).

        ``backed``: the log's durable end that snapshots must not pass (default: its end when it was opened).
        """
        self.state = self.state_type()
        self.last_seq = 0
        from_seq = 1
        snap = self._usable_snapshot(self.log.opened_seq if backed is None else backed)
        if snap is not None:
            self.state = self.state_type.load(snap.state)
            self.last_seq = snap.seq
            from_seq = snap.seq + 1
        self.recovered_from_seq = from_seq
        count = 0
        apply = self.state.apply
        seq = self.last_seq
        events = self.log.uri if source is None else source
        for seq, event in read_seq_events(
            events, storage_options=self.log.storage_options, streams=[self.stream], from_seq=from_seq
        ):
            try:
                apply(event)
            except Exception as exc:
                raise RecoveryError(self.stream, seq, event, exc) from exc
            count += 1
        self.last_seq = seq
        self.recovered_events = count
        logger.info("{} recovered: snapshot up to seq {}, {} events replayed", self.stream, from_seq - 1, count)

    def _usable_snapshot(self, backed: int) -> StoredSnapshot | None:
        """The newest snapshot the log backs: one past ``backed``, the log's durable end, is stale.

        Such a snapshot names events that never became durable (a commit that
        failed after the snapshot was taken); the seqs it claims are handed out
        again to new events, which loading it would skip. It is reported and
        discarded so that a later, longer log cannot make it look valid.
        """
        if self.snapshots is None:
            return None
        snap = self.snapshots.latest(self.stream)
        if snap is None or snap.seq <= backed:
            return snap
        logger.error(
            "{}: snapshot at seq {} is beyond the log's last durable seq {}: ignored and discarded, replaying instead",
            self.stream,
            snap.seq,
            backed,
        )
        self._stale_after = backed  # discarded once the start-up check accepted the log: recovery only reads
        return self.snapshots.latest(self.stream, at_or_before=backed)

    def _discard_stale_snapshots(self) -> None:
        """Delete the snapshots recovery found past the log's end (raises StaleSnapshotsKept if it cannot)."""
        stale_after, self._stale_after = self._stale_after, None
        if stale_after is not None and self.snapshots is not None:
            try:
                self.snapshots.discard_after(self.stream, stale_after)
            except Exception as exc:
                raise StaleSnapshotsKept(self.stream, stale_after, exc) from exc

    def on_recovered(self) -> None:
        """Hook: runs after recovery, before the first message (e.g. release leases of a crashed run)."""

    def on_stop(self) -> None:
        if self.recovery_error is not None:
            return  # a half-recovered state must not reach a snapshot
        try:
            self.log.flush()
        except LogFailedError:
            logger.error("{} stopped with the log failed: no snapshot written", self.stream)
            self._run_ready_effects()  # every batch is resolved now: askers of lost events get the error
            return
        self._run_ready_effects()
        lags = self.log.durable_seq - self.last_seq >= self.snapshot_every
        if self._since_snapshot or lags:
            self._write_snapshot_now(at_head=lags)

    # ------------------------------------------------------------------ messages

    def on_receive(self, message: Any) -> Any:
        if self.recovery_error is not None:
            if isinstance(message, Request):
                error = self.recovery_error
                message.reply.set_exception(exc_info=(type(error), error, error.__traceback__))
            return None
        if isinstance(message, Durable):
            self._run_ready_effects()
            return None
        if isinstance(message, Request):
            self._handle_request(message)
            return None
        return self.handle_message(message)

    def _handle_request(self, request: Request) -> None:
        try:
            reply = self.handle_command(request.command)
        except CommandRejected as exc:
            request.reply.set_exception(exc_info=(type(exc), exc, exc.__traceback__))
            return
        except LogFailedError as exc:
            request.reply.set_exception(exc_info=(type(exc), exc, exc.__traceback__))
            return
        if self._last_batch is None and not self._effects:  # after_durable's "at once", without a closure
            request.reply.set(reply)
        else:
            self.after_durable(lambda: request.reply.set(reply), request)

    def handle_command(self, command: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} takes no command {type(command).__name__}")

    def handle_message(self, message: Any) -> Any:
        logger.debug("{} ignored {!r}", type(self).__name__, message)
        return None

    # ------------------------------------------------------------------ persistence

    def persist(self, event: Event) -> None:
        """Apply ``event`` now and append it; effects that depend on it go through ``after_durable``.

        Applied first: an event ``apply`` refuses is not appended (stored, it
        would stop every later recovery). Raises :class:`CommandRejected` then,
        after rebuilding the state from the log, because a failed ``apply``
        may have changed part of it.
        """
        try:
            self.state.apply(event)
        except Exception as exc:
            self._restore_after_refused(event, exc)
            raise reject(type(event).__struct_config__.tag, "inapplicable", f"{exc}") from exc
        conid = getattr(event, "conid", None)  # the log key: the conid of an event about a contract, else the stream
        key = self.stream if conid is None else str(conid)
        # the receipt is a (seq, batch) tuple: unpacked, not read field by field (three appends a snapshot)
        self.last_seq, self._last_batch = self.log.append(event, stream=self.stream, key=key)
        since = self._since_snapshot = self._since_snapshot + 1
        if since >= self.snapshot_every:
            self._schedule_snapshot()

    def _restore_after_refused(self, event: Event, exc: Exception) -> None:
        """Put the state back as the log has it: every earlier event was appended, so flush and recover."""
        logger.error("{}: {} refused by apply ({}); not stored, state rebuilt from the log", self.stream, event, exc)
        since = self._since_snapshot
        self.log.flush()
        # everything appended so far is durable now: this run's snapshots are backed (the end at open would
        # call them stale and discard them)
        self.recover(backed=self.log.durable_seq)
        try:
            self._discard_stale_snapshots()  # none expected: the start discarded any, and this run's are backed
        except StaleSnapshotsKept as kept:
            self.recovery_error = kept  # inert from here on, as after a failed start: it must not append
            logger.error("{}", kept)
        self._since_snapshot = since

    def after_durable(self, effect: Callable[[], None], request: Request | None = None) -> None:
        """Run ``effect`` once every event persisted so far is durable (at once if it already is)."""
        batch = self._last_batch
        if batch is not None and batch.done and batch.error is None:
            batch = None
        if batch is None and not self._effects:
            effect()
            return
        if batch is not None and batch.error is not None:
            self._fail_effect(effect, request, batch.error)
            return
        self._effects.append((batch, effect, request))
        if batch is not None and id(batch) not in self._waiting_batches:
            self._waiting_batches.add(id(batch))
            batch.add_done_callback(self._notify_durable)

    def announce(self, level: str, message: str, *args: Any) -> None:
        """Log an operator-facing line about what was just persisted, once it is durable.

        A warning is an effect like any other: someone may act on it, so it
        must not report an event a crash could still lose.
        """
        self.after_durable(lambda: logger.log(level, message, *args))

    def _notify_durable(self, batch: CommitBatch) -> None:
        try:
            self.actor_ref.tell(Durable(batch))
        except pykka.ActorDeadError:
            pass

    def _run_ready_effects(self) -> None:
        while self._effects:
            batch, effect, request = self._effects[0]
            if batch is not None and not batch.done:
                return
            self._effects.popleft()
            if batch is not None:
                self._waiting_batches.discard(id(batch))
                if batch.error is not None:
                    self._fail_effect(effect, request, batch.error)
                    continue
            try:
                effect()
            except Exception:  # noqa: BLE001 - one effect failing must not block the others
                logger.exception("{}: effect failed", type(self).__name__)

    def _fail_effect(self, effect: Callable[[], None], request: Request | None, error: BaseException) -> None:
        if request is not None:
            request.reply.set_exception(exc_info=(type(error), error, error.__traceback__))
        else:
            logger.error("{}: effect dropped, its events never became durable: {}", type(self).__name__, error)

    # ------------------------------------------------------------------ snapshots

    def _schedule_snapshot(self) -> None:
        if self.snapshots is None:
            self._since_snapshot = 0  # nowhere to write one (the what-if replay): not asked again next event
            return
        state, seq = self.state.dump(), self.last_seq
        self._since_snapshot = 0
        store, stream = self.snapshots, self.stream

        def write() -> None:
            try:
                store.save(stream, seq, state, getattr(self.state_type, "snapshot_version", 1))
            except Exception:  # noqa: BLE001 - a missed snapshot only costs replay time
                logger.exception("snapshot of {} at seq {} failed", stream, seq)

        # written once seq is durable; off the actor's thread so messages keep flowing
        self.after_durable(lambda: _background(write))

    def _write_snapshot_now(self, *, at_head: bool = False) -> None:
        """Snapshot the state at this stream's last event, or (``at_head``) at the log's durable end.

        A stream quiet for a long time keeps a snapshot far behind the log's
        end, and every start scans all events since it to find the few of
        this stream (the registry of a busy account: 100,000 rows and a
        second of a start, growing). At a clean stop every event of this
        stream is applied and the log is flushed, so the state is also the
        stream's state after the durable end: a snapshot there (the seq
        names another stream's event, as verify allows) lets the next start
        begin at the end.
        """
        seq = self.log.durable_seq if at_head else self.last_seq
        if self.snapshots is None or seq == 0:
            return
        if seq > self.log.durable_seq:  # never a snapshot of events the log does not hold
            logger.error("{}: no snapshot at seq {}, the log is durable only to {}", self.stream, seq, self.log.durable_seq)
            return
        self.snapshots.save(self.stream, seq, self.state.dump(), getattr(self.state_type, "snapshot_version", 1))
        self._since_snapshot = 0


def _background(fn: Callable[[], None]) -> None:
    threading.Thread(target=fn, name="snapshot-writer", daemon=True).start()


def state_at(data_dir: str, stream: str, state_type: Any, *, seq: int, until_us: int | None = None) -> Any:
    """``stream``'s state after the log's event ``seq``, or with ``until_us`` every event logged before then.

    Built as recovery builds it, read-only, for audits of a past moment
    (``contracts --offline``, what-if's starting queue): the newest snapshot
    at or before ``seq`` whose layout is the state's current one, then the
    stream's later events. An empty state when ``seq`` is 0.
    """
    state = state_type()
    if seq <= 0:
        return state
    start = 0
    snap = SnapshotStore(data_dir).latest(stream, at_or_before=seq)
    if snap is not None and snap.v == getattr(state_type, "snapshot_version", 1):  # an older layout: from the start
        state = state_type.load(snap.state)
        start = snap.seq
    until = None if until_us is None else datetime.fromtimestamp((until_us - 1) / 1e6, tz=UTC)
    to_seq = seq if until is None else None
    events = read_seq_events(table_uri(data_dir, "events"), streams=[stream], from_seq=start + 1, to_seq=to_seq, until=until)
    for _, event in events:
        state.apply(event)
    return state
