"""Commands from outside the process: one tagged union, one strict decoder, one validator.

The control socket receives JSON lines of the same msgspec commands the
actors take. :func:`decode_command` turns one line into a command of the
registry or the queue, refusing unknown fields and bad values with a
:class:`CommandError` that names the field (``conid``, ``items[3].strategy``).

msgspec checks ``Meta`` constraints only when it *decodes*, not when Python
code constructs a Struct, so ``AddActive(conid=-5, strategy="x")`` is a
perfectly constructible object. Actors therefore run
:func:`validate_command` on every command they are asked, however it was made.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from events.queue import (
    Cancel,
    Claim,
    Enqueue,
    EnqueueMany,
    ExpireLeases,
    Fail,
    QueueStats,
    Release,
    Requeue,
    Succeed,
)
from events.registry import AddActive, AddActiveMany, ListActive, RemoveActive, RemoveActiveMany

__all__ = ["CONTROL_COMMANDS", "CommandError", "ControlCommand", "decode_command", "validate_command"]

#: Every command the control socket accepts, by its ``type`` tag.
ControlCommand = (
    AddActive
    | RemoveActive
    | AddActiveMany
    | RemoveActiveMany
    | ListActive
    | Enqueue
    | EnqueueMany
    | Claim
    | Succeed
    | Fail
    | Release
    | Cancel
    | Requeue
    | ExpireLeases
    | QueueStats
)
CONTROL_COMMANDS: tuple[type[msgspec.Struct], ...] = ControlCommand.__args__  # type: ignore[attr-defined]

C = TypeVar("C", bound=msgspec.Struct)
_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(ControlCommand)
_packer = msgspec.msgpack.Encoder()
#: One msgpack decoder a command type, made at its first validation.
_unpackers: dict[type, msgspec.msgpack.Decoder[Any]] = {}
_FIELD = re.compile(r"field `([^`]+)`")
_PATH = re.compile(r"at `\$\.?([^`]*)`$")


class CommandError(ValueError):
    """A command that cannot be accepted; ``field`` names the culprit when one is to blame."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def _field_of(message: str) -> str | None:
    """``items[0].conid`` from msgspec's "... field `conid` - at `$.items[0]`" wording."""
    path_match = _PATH.search(message)
    path = path_match.group(1) if path_match else ""
    field_match = _FIELD.search(message)
    if field_match:
        path = f"{path}.{field_match.group(1)}" if path else field_match.group(1)
    return path or None


def decode_command(raw: bytes | str) -> ControlCommand:
    """One JSON line of the control socket -> a registry or queue command (or CommandError)."""
    try:
        return _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise CommandError(str(exc), _field_of(str(exc))) from exc
    except msgspec.DecodeError as exc:
        raise CommandError(f"malformed JSON: {exc}") from exc


def validate_command(command: C) -> C:
    """``command`` checked against every constraint of its type, as decoding would (or CommandError).

    Returns the command as decoding would have built it (an ``int`` given for
    a ``float`` field becomes a float), so what is applied live and what a
    replay decodes are the same values.

    A valid command is decoded: encoded to msgpack and decoded by a decoder
    of its type (a third cheaper than ``to_builtins`` and ``convert``, and
    the queue validates a few commands a snapshot). One that is refused, or
    that msgpack cannot carry (an int past 64 bits, a value of a foreign
    type), goes through ``convert``, which says what is wrong in the words
    it always used.
    """
    kind = type(command)
    try:
        packed: bytes | None = _packer.encode(command)
    except (TypeError, ValueError, OverflowError):
        packed = None
    if packed is not None:
        decoder = _unpackers.get(kind)
        if decoder is None:
            decoder = _unpackers[kind] = msgspec.msgpack.Decoder(kind)
        try:
            return decoder.decode(packed)
        except msgspec.ValidationError:
            pass
    try:
        return msgspec.convert(msgspec.to_builtins(command), kind)
    except msgspec.ValidationError as exc:
        raise CommandError(str(exc), _field_of(str(exc))) from exc
