"""The log codec: events to stored payloads and back, with schema upcasting.

A stored row keeps the event's tag (``type``), its schema version (``v``) and
its payload as msgspec JSON, so any Delta engine can read it. Decoding goes
through one tagged-union decoder built at import. A payload written under an
older version is first decoded to plain JSON, passed through the registered
upcasters one version at a time, then validated into today's type: old logs
stay readable without old classes lying around.

Validation (types, ranges, lengths) happens at decode time and the error
names the field, e.g. ``Expected `int` >= 1 - at `$.conid```.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import msgspec

from events import ib, log, queue, reconciliation, registry, router  # noqa: F401  (register events)
from events.base import Event, event_types

__all__ = [
    "EVENT_TYPES",
    "EventDecodeError",
    "Upcaster",
    "decode_event",
    "decode_events",
    "encode_event",
    "register_upcaster",
    "version_of",
]

EVENT_TYPES: dict[str, type[Event]] = {}
_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(Any)
#: The same union, for a JSON array of payloads: a whole batch in one call.
_batch_decoder: msgspec.json.Decoder[list[Any]] = msgspec.json.Decoder(list[Any])
_TAG_OF: dict[type, str] = {}


def _rebuild() -> None:
    """(Re)build the tagged-union decoder over every event class defined so far.

    Built once at import; rebuilt only if an event class is defined later (a
    plugin's or a test's) and a payload of it shows up.
    """
    global _decoder, _batch_decoder
    EVENT_TYPES.clear()
    EVENT_TYPES.update(event_types())
    _TAG_OF.clear()
    _TAG_OF.update({cls: tag for tag, cls in EVENT_TYPES.items()})
    union: Any = functools.reduce(operator.or_, EVENT_TYPES.values())
    _decoder = msgspec.json.Decoder(union)
    _batch_decoder = msgspec.json.Decoder(list[union])


_encoder = msgspec.json.Encoder()
_raw_decoder: msgspec.json.Decoder[dict[str, Any]] = msgspec.json.Decoder(dict[str, Any])

#: Turns the JSON object of version ``v`` into the JSON object of version ``v + 1``.
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
_UPCASTERS: dict[tuple[str, int], Upcaster] = {}


class EventDecodeError(ValueError):
    """A stored payload that cannot become an event; says which row and which field."""

    def __init__(self, message: str, *, tag: str, version: int, seq: int | None = None) -> None:
        where = f"seq {seq} " if seq is not None else ""
        super().__init__(f"{where}({tag} v{version}): {message}")
        self.tag = tag
        self.version = version
        self.seq = seq


def register_upcaster(tag: str, from_version: int, upcaster: Upcaster) -> None:
    """Register how a ``tag`` payload of ``from_version`` becomes ``from_version + 1``."""
    key = (tag, from_version)
    if key in _UPCASTERS and _UPCASTERS[key] is not upcaster:
        raise ValueError(f"an upcaster for {tag} v{from_version} is already registered")
    _UPCASTERS[key] = upcaster


def version_of(tag: str) -> int:
    """Today's schema version of events stored under ``tag``."""
    if tag not in EVENT_TYPES:
        _rebuild()
    return EVENT_TYPES[tag].version


def encode_event(event: Event) -> bytes:
    """The JSON payload stored for ``event`` (its tag included as ``type``)."""
    return _encoder.encode(event)


def decode_event(tag: str, version: int, payload: bytes | str, *, seq: int | None = None) -> Event:
    """Decode one stored payload into today's event type, upcasting older versions."""
    cls = EVENT_TYPES.get(tag)
    if cls is None and tag in event_types():
        _rebuild()
        cls = EVENT_TYPES.get(tag)
    if cls is None:
        raise EventDecodeError("unknown event type", tag=tag, version=version, seq=seq)
    try:
        if version == cls.version:
            event = _decoder.decode(payload)
        elif version < cls.version:
            event = msgspec.convert(_upcast(tag, version, cls.version, _raw_decoder.decode(payload)), cls)
        else:
            raise EventDecodeError(
                f"written by a newer schema (this code reads up to v{cls.version})", tag=tag, version=version, seq=seq
            )
    except msgspec.ValidationError as exc:
        raise EventDecodeError(str(exc), tag=tag, version=version, seq=seq) from exc
    except msgspec.DecodeError as exc:
        raise EventDecodeError(f"malformed payload: {exc}", tag=tag, version=version, seq=seq) from exc
    if type(event) is not cls:
        raise EventDecodeError(
            f"payload is a {type(event).__name__}, row says {tag}", tag=tag, version=version, seq=seq
        )
    return event


_rebuild()


def decode_events(types: list[str], vs: list[int], payloads: list[str], seqs: list[int]) -> list[Event]:
    """Decode a batch of stored rows (columns of equal length) into today's events.

    Replay is bound by per-row Python work, and one decode of ``[p1,p2,...]``
    costs about half of a :func:`decode_event` per row. That is the path when
    every row is of today's schema and each payload's tag matches its row;
    on any doubt (an older version, an unknown tag, a bad payload) the batch
    is decoded row by row, which upcasts and names the seq of an error.
    """
    if not payloads:
        return []
    current = all(tag in EVENT_TYPES and EVENT_TYPES[tag].version == v for tag, v in set(zip(types, vs, strict=True)))
    if current:
        try:
            events = _batch_decoder.decode("[" + ",".join(payloads) + "]")
        except (msgspec.ValidationError, msgspec.DecodeError):
            events = None
        if events is not None and [_TAG_OF[type(event)] for event in events] == types:
            return events
    return [
        decode_event(tag, v, payload, seq=seq) for tag, v, payload, seq in zip(types, vs, payloads, seqs, strict=True)
    ]


def _upcast(tag: str, version: int, target: int, data: dict[str, Any]) -> dict[str, Any]:
    for v in range(version, target):
        step = _UPCASTERS.get((tag, v))
        if step is None:
            raise EventDecodeError(f"no upcaster from v{v} to v{v + 1}", tag=tag, version=version)
        data = step(dict(data))
    data["type"] = tag
    return data


# ---------------------------------------------------------------------- upcasters of stored events
# One line per breaking change, oldest first; the function lives next to the event it upcasts.
register_upcaster("queue.item_retry_scheduled", 1, queue.failures_from_attempt)
register_upcaster("queue.item_dead_lettered", 1, queue.failures_from_attempt)
