"""Fan-out of market updates (or any message) to the handler actors that subscribed.

The router and the worker each publish every ``MarketUpdate`` to the same
handlers (PositionWriter, Reconciliation, user handlers), so a handler never
knows which path served a contract. Delivery is a pykka ``tell``: a handler
that is slow or failing cannot block the publisher, and one that has died is
dropped from the set with a warning while the others go on receiving.

The set is safe to share between publishers on different threads: it holds
refs only (no actor state) and publishes from an immutable copy of its list.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pykka
from loguru import logger

from events.ib import MarketUpdate, MarketUpdates

__all__ = ["HandlerSet"]


class HandlerSet:
    """ActorRefs that every published message is told to; ``add(ref)`` subscribes one.

    ``accepts`` restricts a handler to some message types (e.g. the
    reconciliation only wants ``PositionChanged``); by default it gets all.
    """

    def __init__(self, refs: tuple[pykka.ActorRef[Any], ...] | list[pykka.ActorRef[Any]] = ()) -> None:
        self._lock = threading.Lock()
        self._entries: tuple[tuple[pykka.ActorRef[Any], tuple[type, ...] | None, bool], ...] = tuple(
            (ref, None, False) for ref in refs
        )
        self.delivered = 0
        self.dropped = 0

    def add(self, ref: pykka.ActorRef[Any], accepts: tuple[type, ...] | None = None, *, batches: bool = False) -> None:
        """Subscribe ``ref`` (again: its filter is replaced, it is not added twice).

        ``batches``: the handler understands ``MarketUpdates`` and gets a burst
        of ticks as one message; otherwise it is told each ``MarketUpdate``.
        """
        with self._lock:
            others = tuple(entry for entry in self._entries if entry[0] is not ref)
            self._entries = (*others, (ref, accepts, batches))

    def remove(self, ref: pykka.ActorRef[Any]) -> bool:
        """Unsubscribe ``ref``; False if it was not subscribed."""
        with self._lock:
            before = len(self._entries)
            self._entries = tuple(entry for entry in self._entries if entry[0] is not ref)
            return len(self._entries) != before

    def publish(self, message: Any) -> int:
        """Tell ``message`` to every handler that accepts it; returns how many were told."""
        told = 0
        batch = type(message) is MarketUpdates
        for ref, accepts, batches in self._entries:  # an immutable snapshot: add/remove may run meanwhile
            if batch:
                if accepts is not None and MarketUpdate not in accepts and MarketUpdates not in accepts:
                    continue
                parts = [message] if batches else message.updates
            elif accepts is not None and not isinstance(message, accepts):
                continue
            else:
                parts = [message]
            for part in parts:
                if not self._tell(ref, part):
                    break
                told += 1
        with self._lock:
            self.delivered += told
        return told

    def _tell(self, ref: pykka.ActorRef[Any], message: Any) -> bool:
        try:
            ref.tell(message)
        except pykka.ActorDeadError:
            if self.remove(ref):
                with self._lock:
                    self.dropped += 1
                logger.warning("handler {} is dead: dropped from the handler set", ref)
            return False
        except Exception:  # noqa: BLE001 - one handler's failure must not stop the others
            logger.exception("telling handler {} failed", ref)
            return False
        return True

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[pykka.ActorRef[Any]]:
        return iter([ref for ref, _, _ in self._entries])

    def __contains__(self, ref: object) -> bool:
        return any(entry[0] is ref for entry in self._entries)
