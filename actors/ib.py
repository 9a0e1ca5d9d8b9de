"""The IB connection actor: the only actor that talks to Interactive Brokers.

The pykka side is thin on purpose. ib_insync needs an asyncio loop, so the
actor owns one in a thread it starts in ``on_start`` and stops in
``on_stop``; every IB-facing state (streams, snapshots, the contract cache,
the pacer, the reconnect loop) lives in :class:`actors.ib_session.IbSession`
inside that loop, so it is touched by one thread only. This actor forwards
commands into the loop (``call_soon_threadsafe``), never blocks it, and fans
the loop's messages out to its subscribers from its own thread.

Handles:
    Connect, Disconnect, Subscribe, Unsubscribe, RequestPositions (told);
    Request(Snapshot) -> SnapshotResult; Request(IbStats) -> IbStatsReply
    (asked with actors.messaging.ask / ask_async);
    AddSubscriber / RemoveSubscriber envelopes (actors.ib_base).
Emits (told to every subscriber):
    PositionChanged, PositionsComplete (IB's positionEnd: at every
    (re)connect, before CONNECTED, after RequestPositions, and after an
    1101, which drops the account subscriptions: IbSession resubmits them),
    MarketUpdate(source="stream"), MarketUpdate(source="portfolio") (IB's
    portfolio marks, no line), StreamEnded (a stream's line is free at
    IB; see events.ib.StreamEnded), ConnectionStateChanged, IbError.
    Snapshot answers (MarketUpdate(source="queue") and SnapshotFailed) come
    back in the SnapshotResult reply.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Sequence
from typing import Any

import pykka
from loguru import logger

from actors.ib_base import AddSubscriber, Publisher, RemoveSubscriber
from actors.ib_session import IbSession
from actors.messaging import Request, reject
from events.base import Message
from events.ib import (
    Connect,
    Disconnect,
    IbSettings,
    IbStats,
    RequestPositions,
    Snapshot,
    Subscribe,
    Unsubscribe,
)

__all__ = ["AddSubscriber", "IbActor", "IbSettings", "RemoveSubscriber"]

_STOP_TIMEOUT_S = 5.0


class _Published:
    """Envelope from the loop thread: fan ``message`` out to the subscribers."""

    __slots__ = ("message",)

    def __init__(self, message: Message) -> None:
        self.message = message


class IbActor(pykka.ThreadingActor):
    """Streams, snapshots and positions from IB through ib_insync; see the module docstring."""

    def __init__(self, settings: IbSettings, subscribers: Sequence[pykka.ActorRef[Any]] = ()) -> None:
        super().__init__()
        self.settings = settings
        self._publisher = Publisher(subscribers)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._session: IbSession | None = None

    # ------------------------------------------------------------- lifecycle
    def on_start(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=self._run_loop, args=(loop,), name="ib-loop", daemon=True)
        self._thread.start()
        ref = self.actor_ref

        def publish(message: Message) -> None:
            try:
                ref.tell(_Published(message))
            except pykka.ActorDeadError:
                logger.debug("IB actor stopped; dropped {}", type(message).__name__)

        async def make() -> IbSession:
            return IbSession(self.settings, publish)

        self._session = asyncio.run_coroutine_threadsafe(make(), loop).result(timeout=_STOP_TIMEOUT_S)

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def on_stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            assert self._session is not None
            asyncio.run_coroutine_threadsafe(self._session.close(), loop).result(timeout=_STOP_TIMEOUT_S)
        except (concurrent.futures.TimeoutError, RuntimeError) as exc:
            logger.warning("IB session did not close cleanly: {!r}", exc)

        async def cancel_tasks() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(cancel_tasks(), loop).result(timeout=_STOP_TIMEOUT_S)
        except (concurrent.futures.TimeoutError, RuntimeError) as exc:
            logger.warning("IB loop tasks did not finish: {!r}", exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=_STOP_TIMEOUT_S)
        self._loop = None

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        self.on_stop()

    # -------------------------------------------------------------- messages
    def _in_loop(self, fn: Any, *args: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(fn, *args)

    def on_receive(self, message: Any) -> Any:
        session = self._session
        match message:
            case _Published(message=msg):
                self._publisher.publish(msg)
            case AddSubscriber() | RemoveSubscriber():
                self._publisher.handle(message)
            case Subscribe(conid=conid):
                self._in_loop(session.subscribe, conid)
            case Unsubscribe(conid=conid):
                self._in_loop(session.unsubscribe, conid)
            case Connect():
                self._in_loop(session.connect)
            case Disconnect():
                assert self._loop is not None
                asyncio.run_coroutine_threadsafe(session.disconnect(), self._loop)
            case RequestPositions():
                self._in_loop(session.request_positions)
            case Request(command=Snapshot(conids=conids, timeout_s=timeout_s), reply=reply):
                self._in_loop(session.snapshot, list(conids), timeout_s, reply)
            case Request(command=IbStats(), reply=reply):
                assert self._loop is not None
                future = asyncio.run_coroutine_threadsafe(_call(session.stats), self._loop)
                future.add_done_callback(lambda f: _settle(reply, f))
            case Request(command=command, reply=reply):
                self.on_receive(command)
                if isinstance(command, Connect | Disconnect | Subscribe | Unsubscribe | RequestPositions):
                    reply.set(None)
                else:
                    reply.set_exception(reject(str(type(command).__name__), "unsupported", "not an IB command"))
            case _:
                logger.warning("IbActor ignored {!r}", message)
        return None


async def _call(fn: Any) -> Any:
    return fn()


def _settle(reply: pykka.Future[Any], done: concurrent.futures.Future[Any]) -> None:
    try:
        reply.set(done.result())
    except Exception as exc:  # noqa: BLE001  (handed to the asker)
        reply.set_exception(exc)
