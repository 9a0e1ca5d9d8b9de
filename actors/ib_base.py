"""What the real and the fake IB actor share: subscriber envelopes and the fan-out.

Subscribers are actor refs, which are not msgspec messages, so adding one
after start goes through a plain envelope instead of a Command. Both IB
actors keep their subscriber list in the actor's own thread and ``tell``
every subscriber each emitted message; a subscriber that has died is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pykka
from loguru import logger

from events.base import Message

__all__ = ["AddSubscriber", "Publisher", "RemoveSubscriber"]


class AddSubscriber:
    """Envelope: start telling ``ref`` every message the IB actor emits."""

    __slots__ = ("ref",)

    def __init__(self, ref: pykka.ActorRef[Any]) -> None:
        self.ref = ref

    def __repr__(self) -> str:
        return f"AddSubscriber({self.ref!r})"


class RemoveSubscriber:
    """Envelope: stop telling ``ref``."""

    __slots__ = ("ref",)

    def __init__(self, ref: pykka.ActorRef[Any]) -> None:
        self.ref = ref

    def __repr__(self) -> str:
        return f"RemoveSubscriber({self.ref!r})"


class Publisher:
    """The subscriber list of one IB actor; used only from that actor's thread."""

    def __init__(self, subscribers: Iterable[pykka.ActorRef[Any]] = ()) -> None:
        self._subscribers: list[pykka.ActorRef[Any]] = list(subscribers)

    def add(self, ref: pykka.ActorRef[Any]) -> None:
        if ref not in self._subscribers:
            self._subscribers.append(ref)

    def remove(self, ref: pykka.ActorRef[Any]) -> None:
        if ref in self._subscribers:
            self._subscribers.remove(ref)

    def handle(self, message: object) -> bool:
        """Apply an Add/RemoveSubscriber envelope; False if ``message`` is neither."""
        if isinstance(message, AddSubscriber):
            self.add(message.ref)
            return True
        if isinstance(message, RemoveSubscriber):
            self.remove(message.ref)
            return True
        return False

    def publish(self, message: Message) -> None:
        for ref in list(self._subscribers):
            try:
                ref.tell(message)
            except pykka.ActorDeadError:
                logger.debug("subscriber {} is dead; dropped", ref)
                self._subscribers.remove(ref)
