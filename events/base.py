"""The message base classes every actor shares, and the registry of stored events.

Every message that crosses an actor boundary is a frozen msgspec Struct, so
pykka can pass it by reference without anyone mutating it underneath another
thread. Events (things that happened and go into the log) carry an explicit,
stable ``tag`` and a schema ``version``; the tag, not the class name, is what is
stored, so renaming a class never orphans stored events.

Conventions for every subclass (kw_only is *not* inherited by msgspec):

    class ItemEnqueued(Event, tag="queue.item_enqueued", frozen=True, kw_only=True):
        version: ClassVar[int] = 1
        conid: Conid
        ...
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import msgspec

__all__ = [
    "Command",
    "Conid",
    "Event",
    "Message",
    "Reply",
    "StrategyName",
    "event_types",
    "tag_of",
]

#: An IB contract id: a positive 64-bit integer. Validated at decode time.
Conid = Annotated[int, msgspec.Meta(gt=0, le=2**63 - 1, description="IB contract id")]
#: A strategy name: 1-64 printable characters, no surrounding space.
StrategyName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-/ ]*$")]


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Anything sent between actors: immutable, keyword-only, tagged by ``type``."""


class Command(Message, frozen=True, kw_only=True):
    """A request to change state. Commands are validated and may be refused."""


class Reply(Message, frozen=True, kw_only=True):
    """An answer to a command."""


class Event(Message, frozen=True, kw_only=True):
    """Something that happened; appended to the event log before anyone depends on it.

    ``version`` is the schema version of the payload. When a change to an
    event is not additive, bump it and register an upcaster in
    :mod:`events.codec` that turns the older payload into today's.
    """

    version: ClassVar[int] = 1


def _concrete_subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_concrete_subclasses(sub))
    return found


def event_types() -> dict[str, type[Event]]:
    """Every event class by its stored tag (their modules must be imported first).

    msgspec sets a class's tag only after ``__init_subclass__`` has run, so the
    registry is read off the class tree instead of built at class creation.
    """
    types: dict[str, type[Event]] = {}
    for cls in _concrete_subclasses(Event):
        tag = cls.__struct_config__.tag
        if not isinstance(tag, str) or tag == cls.__name__:
            raise TypeError(f"event {cls.__name__} needs an explicit string tag=")
        if tag in types and types[tag] is not cls:
            raise TypeError(f"event tag {tag!r} used by {types[tag].__name__} and {cls.__name__}")
        types[tag] = cls
    return types


def tag_of(message: Message | type[Message]) -> str:
    """The stable tag a message is stored and sent under."""
    cls = message if isinstance(message, type) else type(message)
    tag = cls.__struct_config__.tag
    assert isinstance(tag, str)
    return tag
