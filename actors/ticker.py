"""A periodic tell: a small thread that sends an actor a message every interval.

pykka has no scheduler, and an actor must never sleep on its own thread (its
mailbox would stall), so periodic work (flush the positions table, reconcile)
is a message the actor receives like any other, sent by this ticker. The
ticker stops by itself when its actor is gone.
"""

from __future__ import annotations

import threading
from typing import Any

import pykka

__all__ = ["Ticker"]


class Ticker:
    """Tells ``message`` to ``ref`` every ``interval_s`` seconds until stopped."""

    def __init__(self, ref: pykka.ActorRef[Any], message: Any, interval_s: float, *, name: str = "ticker") -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self._ref = ref
        self._message = message
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Ticker:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop ticking; safe from any thread, including the actor's own, and twice."""
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        # Event.wait is the timer: it returns early (True) only when stop() is called.
        while not self._stopped.wait(self._interval_s):
            try:
                self._ref.tell(self._message)
            except pykka.ActorDeadError:
                return
