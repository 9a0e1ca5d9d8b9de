"""The log codec: stable tags, validation that names the field, version-1 payloads, upcasting."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import msgspec
import pytest

from events import EVENT_TYPES, Event, EventDecodeError, decode_event, encode_event, register_upcaster
from events.queue import ItemEnqueued

FIXTURE = Path(__file__).parent.parent / "fixtures" / "events_v1.jsonl"


def _fixture_rows() -> list[dict[str, Any]]:
    return [msgspec.json.decode(line) for line in FIXTURE.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("row", _fixture_rows(), ids=lambda r: r["type"])
def test_stored_version_1_payloads_still_decode(row: dict[str, Any]) -> None:
    event = decode_event(row["type"], row["v"], msgspec.json.encode(row["payload"]))
    assert type(event) is EVENT_TYPES[row["type"]]
    assert msgspec.to_builtins(event)["type"] == row["type"]


def test_every_event_is_frozen_and_tagged_explicitly() -> None:
    for tag, cls in EVENT_TYPES.items():
        assert cls.__struct_config__.frozen, tag
        assert cls.__struct_config__.tag == tag != cls.__name__


def test_round_trip() -> None:
    event = ItemEnqueued(item_id=3, conid=42, priority=1, reason="overflow", enqueued_us=5)
    assert decode_event("queue.item_enqueued", 1, encode_event(event)) == event


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"conid": -1}, "$.conid"),
        ({"conid": "42"}, "$.conid"),
        ({"priority": 0}, "$.priority"),
        ({"item_id": None}, "$.item_id"),
    ],
)
def test_validation_errors_name_the_field(patch: dict[str, Any], field: str) -> None:
    payload = {"type": "queue.item_enqueued", "item_id": 1, "conid": 42, "priority": 2, "enqueued_us": 1, **patch}
    with pytest.raises(EventDecodeError) as info:
        decode_event("queue.item_enqueued", 1, msgspec.json.encode(payload), seq=9)
    assert field in str(info.value)
    assert "seq 9" in str(info.value)


def test_unknown_type_and_newer_version_are_refused() -> None:
    with pytest.raises(EventDecodeError, match="unknown event type"):
        decode_event("nope.never", 1, b"{}")
    with pytest.raises(EventDecodeError, match="newer schema"):
        decode_event("queue.item_succeeded", 99, b'{"type":"queue.item_succeeded","item_id":1,"conid":2}')


def test_malformed_payload_is_a_typed_error() -> None:
    with pytest.raises(EventDecodeError, match="malformed"):
        decode_event("queue.item_succeeded", 1, b'{"type":')


class PriceAlert(Event, tag="test.price_alert", frozen=True, kw_only=True):
    """Version 2 renamed ``px`` to ``price`` and added ``currency``."""

    version: ClassVar[int] = 2
    conid: int
    price: float
    currency: str = "USD"


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    data["price"] = data.pop("px")
    return data


register_upcaster("test.price_alert", 1, _v1_to_v2)


def test_older_payload_is_upcast_into_todays_type() -> None:
    old = b'{"type":"test.price_alert","conid":7,"px":101.5}'
    assert decode_event("test.price_alert", 1, old) == PriceAlert(conid=7, price=101.5)
    current = encode_event(PriceAlert(conid=7, price=1.0, currency="EUR"))
    assert decode_event("test.price_alert", 2, current).currency == "EUR"


def test_missing_upcaster_is_a_clear_error() -> None:
    class Later(Event, tag="test.later", frozen=True, kw_only=True):
        version: ClassVar[int] = 3
        x: int

    register_upcaster("test.later", 1, lambda d: d)
    with pytest.raises(EventDecodeError, match="no upcaster from v2 to v3"):
        decode_event("test.later", 1, b'{"type":"test.later","x":1}')
