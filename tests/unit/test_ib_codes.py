"""IB error codes -> the kinds the worker and the router act on (events.ib.classify_ib_code)."""

from __future__ import annotations

import pytest

from events.ib import IbErrorKind, classify_ib_code


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (10167, IbErrorKind.INFO),  # "displaying delayed market data": advisory, data follows
        (10182, IbErrorKind.DATA_INTERRUPTED),  # a farm blip killed the request
        (354, IbErrorKind.NOT_SUBSCRIBED),
        (10168, IbErrorKind.NOT_SUBSCRIBED),
        (10186, IbErrorKind.NOT_SUBSCRIBED),
        (101, IbErrorKind.MAX_TICKERS),
    ],
)
def test_market_data_codes(code: int, kind: IbErrorKind) -> None:
    assert classify_ib_code(code) == kind


def test_321_is_the_rate_limit_only_by_its_text() -> None:
    limit = "Error validating request.-'bW' : cause - Snapshot requests limitation exceeded:100 per 1 second(s)"
    assert classify_ib_code(321, limit) == IbErrorKind.SNAPSHOT_RATE_LIMITED
    # the same code for a request we built wrong is our bug, not a reason to slow down
    generic = "Error validating request.-'bW' : cause - Snapshot market data subscription is not applicable"
    assert classify_ib_code(321, generic) == IbErrorKind.UNKNOWN
    assert classify_ib_code(321) == IbErrorKind.UNKNOWN
