"""A subscriber actor that records every message told to it, and lets a test wait for a predicate.

Tests subscribe a collector wherever an actor publishes, then wait for what
they expect with a timeout instead of sleeping:

    inbox = Inbox.start()                       # a Collector actor feeding this inbox
    ib = FakeIbActor.start(settings, [inbox.ref])
    update = inbox.wait_for(lambda m: isinstance(m, MarketUpdate), timeout=5)

The actor only appends under a condition variable and notifies; waiting
happens in the test thread, so a waiter never blocks the actor.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pykka

from events.ib import MarketUpdates

__all__ = ["Collector", "CollectorTimeout", "Inbox", "wait_until"]


class CollectorTimeout(AssertionError):
    """The awaited messages did not arrive in time; the message says what did."""


class Inbox:
    """What a Collector received, readable from any thread. ``ref`` is the actor to subscribe."""

    def __init__(self) -> None:
        self._messages: list[Any] = []
        self._cond = threading.Condition()
        self.ref: pykka.ActorRef[Any] | None = None

    @classmethod
    def start(cls) -> Inbox:
        """Start a Collector actor feeding a new inbox (stopped by ``pykka.ActorRegistry.stop_all()``)."""
        inbox = cls()
        inbox.ref = Collector.start(inbox)
        return inbox

    def append(self, message: Any) -> None:
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()

    def messages(self, of_type: type | tuple[type, ...] = object) -> list[Any]:
        """A copy of what arrived so far (optionally only instances of ``of_type``), in arrival order."""
        with self._cond:
            return [m for m in self._messages if isinstance(m, of_type)]

    def clear(self) -> None:
        with self._cond:
            self._messages.clear()

    def wait_for(self, predicate: Callable[[Any], bool], timeout: float = 5.0) -> Any:
        """Wait for the first message matching ``predicate`` and return it."""
        return self.wait_for_count(predicate, 1, timeout)[0]

    def wait_for_count(self, predicate: Callable[[Any], bool], count: int, timeout: float = 5.0) -> list[Any]:
        """Wait until ``count`` messages match ``predicate``; return the first ``count`` of them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self._messages if predicate(m)]
                if len(found) >= count:
                    return found[:count]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    kinds = sorted({type(m).__name__ for m in self._messages})
                    raise CollectorTimeout(
                        f"{len(found)}/{count} matching messages after {timeout} s; "
                        f"{len(self._messages)} arrived, of types {kinds}"
                    )
                self._cond.wait(remaining)


class Collector(pykka.ThreadingActor):
    """Appends every message it is told to its :class:`Inbox`."""

    use_daemon_thread = True

    def __init__(self, inbox: Inbox) -> None:
        super().__init__()
        self.inbox = inbox

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, MarketUpdates):  # tests look for single updates, however they travelled
            for update in message.updates:
                self.inbox.append(update)
            return None
        self.inbox.append(message)
        return None


def wait_until(
    condition: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01, what: str = "condition"
) -> Any:
    """Poll ``condition`` until it returns something truthy, and return that; raise after ``timeout``.

    For state only readable by asking (actor stats, a subprocess's socket, a
    Delta table): where there is an event or a future to wait on, wait on it.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise CollectorTimeout(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
