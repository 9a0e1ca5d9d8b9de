"""A Prometheus text-exposition endpoint over the runtime's status.

Off by default (config ``[metrics] enabled``); bound to 127.0.0.1 unless
``[metrics] host`` says otherwise, because the numbers describe an account's
positions and nobody else's network should see them. The server is the
stdlib ``http.server`` in a daemon thread: a scrape every few seconds needs
no framework, and a dependency (prometheus_client) would bring a registry of
its own that would duplicate what ``Runtime.status`` already gathers.

Every scrape calls ``snapshot_fn`` (``Runtime.metrics_snapshot``, the same
dict ``status --json`` prints) and renders it; nothing is cached, so what
Prometheus sees is what ``status`` would say at that moment. This is not an
actor: it holds no state and only reads through the runtime's own asks.

    GET /metrics  -> text/plain; version=0.0.4 (exposition format 0.0.4)
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from loguru import logger

__all__ = ["CONTENT_TYPE", "MetricsServer", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

SnapshotFn = Callable[[], Mapping[str, Any]]

#: (name, type, help, how to read it from a status dict). Names follow Prometheus' conventions:
#: base units, ``_total`` for counters.
_SCALARS: tuple[tuple[str, str, str, Callable[[Mapping[str, Any]], Any]], ...] = (
    ("slotwise_lines_in_use", "gauge", "Market data lines in use (the line ledger: streams and open snapshots).",
     lambda s: s.get("lines_in_use")),
    ("slotwise_lines_free", "gauge", "Lines neither streaming nor snapshotting under the current limit.",
     lambda s: s.get("lines_free")),
    ("slotwise_line_limit", "gauge", "Lines the ledger holds at most: the learned limit, never above max_lines.",
     lambda s: s.get("line_limit")),
    ("slotwise_line_limit_learned", "gauge", "The account's line limit learned from IB's 101 (absent until one).",
     lambda s: s.get("learned_line_limit")),
    ("slotwise_lines_budget", "gauge", "Market data lines of the account (config runtime.max_lines).",
     lambda s: s.get("max_lines")),
    ("slotwise_stream_budget", "gauge", "Lines streams may use: max_lines minus the snapshot reserve.",
     lambda s: s.get("stream_budget")),
    ("slotwise_streams", "gauge", "Contracts streaming in real time.", lambda s: s.get("streams")),
    ("slotwise_overflow", "gauge", "Active contracts served by the queue because no line is free.",
     lambda s: s.get("overflow")),
    ("slotwise_snapshots_in_flight", "gauge", "Snapshot requests waiting for IB's answer.",
     lambda s: s.get("snapshots_in_flight")),
    ("slotwise_dead_letters", "gauge", "Queue items that failed max_attempts times (FAILED).",
     lambda s: s.get("dead_letters")),
    ("slotwise_events_appended_total", "counter", "Events appended to the event log (its last seq).",
     lambda s: s.get("last_seq")),
    ("slotwise_events_durable_total", "counter", "Events the event log has committed (its durable seq).",
     lambda s: s.get("durable_seq")),
    ("slotwise_event_log_commits_total", "counter", "Delta commits of the event log since start.",
     lambda s: (s.get("log") or {}).get("commits")),
    ("slotwise_event_log_commit_p50_seconds", "gauge", "Median latency of the event log's recent commits.",
     lambda s: _ms((s.get("log") or {}).get("commit_ms_p50"))),
    ("slotwise_event_log_commit_max_seconds", "gauge", "Slowest of the event log's recent commits.",
     lambda s: _ms((s.get("log") or {}).get("commit_ms_max"))),
    ("slotwise_event_log_failed", "gauge", "1 when the event log refuses appends after failed commits.",
     lambda s: None if "log" not in s else int(bool((s.get("log") or {}).get("failed")))),
    ("slotwise_ib_connected", "gauge", "1 while connected to IB (or the demo's fake), else 0.",
     lambda s: int(bool((s.get("ib") or {}).get("connected")))),
    ("slotwise_positions_rows_total", "counter", "Rows appended to the positions table since start.",
     lambda s: s.get("positions_rows_written")),
    ("slotwise_uptime_seconds", "gauge", "Seconds since the runtime started.", lambda s: s.get("uptime_s")),
)  # fmt: skip


def _ms(value: Any) -> float | None:
    return None if value is None else float(value) / 1000.0


def _number(value: Any) -> str | None:
    """A sample value in exposition syntax, or None when the status had no number there."""
    if isinstance(value, bool):
        return str(int(value))
    if not isinstance(value, int | float):
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return str(value)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _family(name: str, kind: str, help_text: str, samples: list[tuple[str, str]]) -> Iterator[str]:
    yield f"# HELP {name} {help_text}"
    yield f"# TYPE {name} {kind}"
    for labels, value in samples:
        yield f"{name}{labels} {value}"


def _age_families(status: Mapping[str, Any]) -> Iterator[str]:
    """The age of each contract's newest quote, per path, as gauges (ages go up and down: not a counter histogram).

    ``slotwise_quote_age_contracts{path,le}`` counts priced contracts at most
    ``le`` seconds old (cumulative, as Prometheus buckets are, ``+Inf`` = all
    priced); ``slotwise_quote_age_seconds{path,quantile}`` gives p50, p99 and the
    max (quantile 1); ``slotwise_never_priced{path}`` the contracts with no price.
    """
    ages = (status.get("freshness") or {}).get("ages") or {}
    buckets: list[tuple[str, str]] = []
    quantiles: list[tuple[str, str]] = []
    never: list[tuple[str, str]] = []
    for path, summary in sorted(ages.items()):
        p = _label(path)
        for le, n in (summary.get("le") or {}).items():
            buckets.append((f'{{path="{p}",le="{_label(le)}"}}', str(n)))
        priced = int(summary.get("count", 0)) - int(summary.get("never_priced", 0))
        buckets.append((f'{{path="{p}",le="+Inf"}}', str(priced)))
        for q, key in (("0.5", "p50_s"), ("0.99", "p99_s"), ("1", "max_s")):
            if (v := _number(summary.get(key))) is not None and priced:
                quantiles.append((f'{{path="{p}",quantile="{q}"}}', v))
        never.append((f'{{path="{p}"}}', str(int(summary.get("never_priced", 0)))))
    if buckets:
        yield from _family(
            "slotwise_quote_age_contracts", "gauge", "Priced contracts whose newest quote is at most le seconds old.", buckets
        )
    if quantiles:
        yield from _family("slotwise_quote_age_seconds", "gauge", "Age of the newest quote per path.", quantiles)
    if never:
        yield from _family("slotwise_never_priced", "gauge", "Known contracts without any price yet.", never)


def render(status: Mapping[str, Any]) -> str:
    """The exposition text of one status dict; a metric the status lacks is left out, not reported as 0."""
    lines: list[str] = []
    for name, kind, help_text, read in _SCALARS:
        value = _number(read(status))
        if value is not None:
            lines.extend(_family(name, kind, help_text, [("", value)]))
    queue = status.get("queue") or {}
    by_status = [
        (f'{{status="{label}"}}', v)
        for label in ("pending", "processing", "failed")
        if (v := _number(queue.get(label))) is not None
    ]
    if by_status:
        lines.extend(_family("slotwise_queue_items", "gauge", "Queue items by status.", by_status))
    lines.extend(_age_families(status))
    state = (status.get("ib") or {}).get("state")
    if isinstance(state, str):
        samples = [(f'{{state="{_label(state)}"}}', "1")]
        lines.extend(
            _family(
                "slotwise_ib_connection_state", "gauge", "IB connection state (the one labelled is current).", samples
            )
        )
    unanswered = sorted(k.removesuffix("_error") for k in status if k.endswith("_error"))
    samples = [(f'{{part="{_label(part)}"}}', "1") for part in unanswered]
    lines.extend(
        _family(
            "slotwise_status_unanswered", "gauge", "Parts of the runtime that did not answer the last status.", samples
        )
    )
    return "\n".join(lines) + "\n"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path != "/metrics":
            self._send(404, "text/plain; charset=utf-8", b"slotwise: metrics are at /metrics\n")
            return
        try:
            body = render(self.server.snapshot_fn()).encode()
        except Exception as exc:  # noqa: BLE001 - a failed scrape answers 500 and the runtime goes on
            logger.warning("metrics: the status could not be gathered: {!r}", exc)
            self._send(500, "text/plain; charset=utf-8", f"status unavailable: {exc!r}\n".encode())
            return
        self._send(200, CONTENT_TYPE, body)

    def _send(self, code: int, content_type: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Request lines go to loguru at debug level, not to stderr as the stdlib does."""
        logger.debug("metrics: {}", format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], snapshot_fn: SnapshotFn) -> None:
        self.snapshot_fn = snapshot_fn
        super().__init__(address, _Handler)


class MetricsServer:
    """``MetricsServer(host, port, snapshot_fn).start()`` serves ``/metrics``; ``.stop()`` ends it.

    Port 0 takes a free port; :attr:`port` tells which. ``start`` binds in
    the caller's thread, so a port in use fails the runtime's start with the
    OSError rather than leaving it running without its metrics.
    """

    def __init__(self, host: str, port: int, snapshot_fn: SnapshotFn) -> None:
        self.host = host
        self.port = port
        self.snapshot_fn = snapshot_fn
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> MetricsServer:
        server = _Server((self.host, self.port), self.snapshot_fn)
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, name="slotwise-metrics", daemon=True)
        self._thread.start()
        logger.info("metrics at http://{}:{}/metrics", self.host, self.port)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
