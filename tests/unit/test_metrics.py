"""The Prometheus endpoint: exposition format, every promised metric, loopback by default, clean stop."""

from __future__ import annotations

import re
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from actors.config import MetricsSettings
from actors.freshness import age_summary
from actors.metrics import CONTENT_TYPE, MetricsServer, render

STATUS: dict[str, Any] = {
    "uptime_s": 12.5,
    "mode": "demo",
    "max_lines": 100,
    "min_snapshot_lines": 2,
    "ib": {"connected": True, "state": "connected", "requests_sent": 40},
    "lines_in_use": 93,
    "snapshots_in_flight": 3,
    "streams": 90,
    "overflow": 21,
    "stream_budget": 90,
    "queue": {"pending": 143, "processing": 40, "failed": 2},
    "dead_letters": 2,
    "positions_rows_written": 1450,
    "last_seq": 928,
    "durable_seq": 927,
    "events_per_s": 10.0,
    "log": {"commits": 30, "commit_ms_p50": 6.5, "commit_ms_max": 58.0, "failed": None},
    "line_limit": 80,
    "learned_line_limit": 80,
    "lines_free": 3,
    "freshness": {
        "monitoring_s": 60.0,
        "overflow_s": 5.0,
        "ages": {
            "queue": age_summary([0.5, 12.0, 40.0, 70.0, None]),
            "stream": age_summary([0.1, 0.2]),
        },
    },
}

#: A sample line of the text format 0.0.4: name, optional labels, a float value.
SAMPLE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*\})? (-?[0-9.e+-]+|NaN|[+-]Inf)$'
)


def _samples(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_every_line_is_valid_exposition_and_every_family_has_help_and_type() -> None:
    text = render(STATUS)
    assert text.endswith("\n")
    typed: dict[str, str] = {}
    helped: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("gauge", "counter")
            assert name not in typed, f"{name} typed twice"
            typed[name] = kind
        else:
            assert SAMPLE.match(line), line
            family = re.split(r"[{ ]", line, maxsplit=1)[0]
            assert family in typed, f"{family} has a sample before its TYPE"
    assert helped == set(typed)
    assert all(name.endswith("_total") for name, kind in typed.items() if kind == "counter")


def test_the_promised_numbers() -> None:
    s = _samples(render(STATUS))
    assert s["slotwise_lines_in_use"] == 93
    assert s["slotwise_lines_budget"] == 100
    assert s["slotwise_stream_budget"] == 90
    assert s["slotwise_streams"] == 90
    assert s['slotwise_queue_items{status="pending"}'] == 143
    assert s['slotwise_queue_items{status="processing"}'] == 40
    assert s['slotwise_queue_items{status="failed"}'] == 2
    assert s["slotwise_dead_letters"] == 2
    assert s["slotwise_events_appended_total"] == 928
    assert s["slotwise_event_log_commit_p50_seconds"] == pytest.approx(0.0065)
    assert s["slotwise_event_log_commit_max_seconds"] == pytest.approx(0.058)
    assert s["slotwise_ib_connected"] == 1
    assert s['slotwise_ib_connection_state{state="connected"}'] == 1
    assert s["slotwise_positions_rows_total"] == 1450
    assert s["slotwise_uptime_seconds"] == 12.5


def test_a_part_that_did_not_answer_is_missing_not_zero() -> None:
    status = {k: v for k, v in STATUS.items() if k not in ("streams", "overflow", "stream_budget")}
    status["router_error"] = "Timeout('router')"
    status["ib"] = {"connected": False, "state": 'unknown (Timeout("ib"))'}
    s = _samples(render(status))
    assert "slotwise_streams" not in s
    assert s['slotwise_status_unanswered{part="router"}'] == 1
    assert s["slotwise_ib_connected"] == 0
    assert s['slotwise_ib_connection_state{state="unknown (Timeout(\\"ib\\"))"}'] == 1


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    calls: list[int] = []

    def snapshot() -> dict[str, Any]:
        calls.append(1)
        return {**STATUS, "last_seq": 928 + len(calls)}

    srv = MetricsServer("127.0.0.1", 0, snapshot).start()
    yield srv
    srv.stop()


def test_http_get_serves_the_text_format(server: MetricsServer) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == CONTENT_TYPE
        assert "version=0.0.4" in response.headers["Content-Type"]
        first = _samples(response.read().decode())
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
        second = _samples(response.read().decode())
    # nothing cached: each scrape asks the runtime again
    assert second["slotwise_events_appended_total"] == first["slotwise_events_appended_total"] + 1


def test_other_paths_are_404(server: MetricsServer) -> None:
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=5)
    assert info.value.code == 404
    info.value.close()


def test_a_failing_status_is_a_500_and_the_server_goes_on() -> None:
    answers: list[Any] = [RuntimeError("queue actor is gone"), STATUS]

    def snapshot() -> dict[str, Any]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    srv = MetricsServer("127.0.0.1", 0, snapshot).start()
    try:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/metrics", timeout=5)
        assert info.value.code == 500
        info.value.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/metrics", timeout=5) as response:
            assert response.status == 200
    finally:
        srv.stop()


def test_stop_frees_the_port_and_is_idempotent() -> None:
    srv = MetricsServer("127.0.0.1", 0, lambda: STATUS).start()
    port = srv.port
    srv.stop()
    srv.stop()
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))


def test_off_by_default_and_loopback_only() -> None:
    settings = MetricsSettings()
    assert settings.enabled is False
    assert settings.host == "127.0.0.1"


def test_quote_ages_and_the_learned_line_limit_are_exported() -> None:
    samples = _samples(render(STATUS))
    assert samples["slotwise_line_limit_learned"] == 80
    assert samples["slotwise_line_limit"] == 80
    assert samples["slotwise_lines_free"] == 3
    # cumulative buckets of the priced contracts' ages; the unpriced one only in slotwise_never_priced
    assert samples['slotwise_quote_age_contracts{path="queue",le="1"}'] == 1
    assert samples['slotwise_quote_age_contracts{path="queue",le="15"}'] == 2
    assert samples['slotwise_quote_age_contracts{path="queue",le="60"}'] == 3
    assert samples['slotwise_quote_age_contracts{path="queue",le="+Inf"}'] == 4
    assert samples['slotwise_never_priced{path="queue"}'] == 1
    assert samples['slotwise_quote_age_seconds{path="queue",quantile="1"}'] == 70.0
    assert samples['slotwise_quote_age_seconds{path="stream",quantile="0.5"}'] == 0.1
