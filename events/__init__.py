"""Message types of every actor, and the codec that stores events in the log.

One module a message family (registry, queue, router, ib, reconciliation,
log); this package re-exports what other packages use.
"""

from events.base import Command, Conid, Event, Message, Reply, StrategyName, event_types, tag_of
from events.codec import EVENT_TYPES, EventDecodeError, decode_event, encode_event, register_upcaster, version_of
from events.commands import CommandError, decode_command, validate_command

__all__ = [
    "EVENT_TYPES",
    "Command",
    "CommandError",
    "Conid",
    "Event",
    "EventDecodeError",
    "Message",
    "Reply",
    "StrategyName",
    "decode_command",
    "decode_event",
    "encode_event",
    "event_types",
    "register_upcaster",
    "tag_of",
    "validate_command",
    "version_of",
]
