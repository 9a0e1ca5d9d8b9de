"""The per-contract view: which path serves each contract, and how old its price is.

``python runtime.py contracts`` prints one row per known contract. Online,
the rows come from the running runtime (the router's ``ContractsQuery``,
with the registry's strategies added); with ``--offline`` they are folded
from the tables alone: registry and queue state replayed from the event
log, the router's streams and overflow from its events, and the newest row
per contract of the ``positions`` table. Both give the same row shape, so a
script reading ``--json`` need not care which it got.

Why it lives with the actors: the offline fold uses the actors' pure states
(``RegistryState``, ``QueueState``, ``RouterState``), and storage must not
know them (layers point one way).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "PATHS",
    "ROW_FIELDS",
    "filter_rows",
    "offline_rows",
    "online_rows",
    "render_table",
]

#: The paths a contract can be served by (events.router.ContractPath).
PATHS = ("stream", "queue", "overflow", "portfolio")

#: Every row has these keys, online and offline alike.
ROW_FIELDS = (
    "conid", "symbol", "local_symbol", "sec_type", "strategies", "path", "active", "position",
    "last_quote_us", "age_s", "source", "data_type", "target_s", "last_error",
)  # fmt: skip


def online_rows(router_reply: Any, registry: Mapping[str, list[str]]) -> dict[str, Any]:
    """The runtime's answer to a ``contracts`` request: the router's rows plus each one's strategies."""
    import msgspec

    rows = []
    for row in router_reply.rows:
        out = msgspec.to_builtins(row)
        out.pop("type", None)
        out["strategies"] = sorted(registry.get(str(row.conid), []))
        rows.append({k: out.get(k) for k in ROW_FIELDS})
    return {"source": "runtime", "now_us": router_reply.now_us, "rows": rows}


def offline_rows(data_dir: str, *, monitoring_s: float, overflow_s: float) -> dict[str, Any]:
    """Rows from the tables alone, as of the log's last event (the runtime need not run).

    Paths follow the router's own rule: a stream or the overflow as its
    events left them, ``portfolio`` for a contract whose only queue item is a
    dead letter, ``queue`` otherwise. With no runtime running no stream is
    open; the path says how the contract was served when it last ran.
    """
    from actors.base import state_at
    from actors.queue_state import FAILED
    from actors.router import RouterState
    from storage.replay import replay

    result = replay(data_dir)
    registry = result.registry.to_json()
    router = state_at(data_dir, "router", RouterState, seq=result.seq)
    latest = _latest_positions(data_dir)
    queue = result.queue
    waiting: dict[int, Any] = {}
    dead: dict[int, Any] = {}
    for item in queue.items.values():
        (dead if item.status == FAILED else waiting)[item.conid] = item
    active = {int(c) for c in registry}
    held = {c for c, row in latest.items() if row.get("position")}
    known = sorted(active | held | set(waiting) | set(dead) | router.streams | set(router.overflow))
    now_us = time.time_ns() // 1000
    rows = []
    for conid in known:
        pos = latest.get(conid, {})
        if conid in router.streams:
            path = "stream"
        elif conid in router.overflow:
            path = "overflow"
        elif conid in dead and conid not in waiting:
            path = "portfolio"
        else:
            path = "queue"
        item = waiting.get(conid) or dead.get(conid)
        quote_us = _micros(pos.get("ts"))
        rows.append(
            {
                "conid": conid,
                "symbol": pos.get("symbol") or "",
                "local_symbol": pos.get("local_symbol") or "",
                "sec_type": pos.get("sec_type") or "",
                "strategies": sorted(registry.get(str(conid), [])),
                "path": path,
                "active": conid in active,
                "position": pos.get("position") or 0.0,
                "last_quote_us": quote_us,
                "age_s": None if quote_us is None else round(max(0.0, (now_us - quote_us) / 1e6), 3),
                "source": pos.get("source") or "",
                "data_type": pos.get("data_type") or "",
                "target_s": 0.0 if path == "stream" else (overflow_s if conid in active else monitoring_s),
                "last_error": (item.last_error if item is not None else "") or "",
            }
        )
    return {"source": "tables", "seq": result.seq, "as_of": result.to_json(items=False)["ts"], "now_us": now_us, "rows": rows}


def _latest_positions(data_dir: str) -> dict[int, dict[str, Any]]:
    """The newest ``positions`` row of each contract (nulls filled from its older rows), by conid."""
    import pyarrow.compute as pc

    from storage.reader import open_table, table_exists
    from storage.tables import table_uri

    uri = table_uri(data_dir, "positions")
    if not table_exists(uri):
        return {}
    dataset = open_table(uri).to_pyarrow_dataset()
    wanted = [c for c in ("conid", "symbol", "local_symbol", "sec_type", "position", "source", "data_type", "ts") if c in dataset.schema.names]
    table = dataset.to_table(columns=wanted)
    if table.num_rows == 0:
        return {}
    table = table.take(pc.sort_indices(table, sort_keys=[("ts", "ascending")]))
    others = [c for c in wanted if c != "conid"]
    newest = table.group_by("conid", use_threads=False).aggregate([(c, "last") for c in others])
    out: dict[int, dict[str, Any]] = {}
    for row in newest.to_pylist():
        out[row["conid"]] = {c: row.get(f"{c}_last") for c in others}
    return out


def _micros(ts: Any) -> int | None:
    if ts is None:
        return None
    return int(ts.timestamp() * 1_000_000)


def filter_rows(rows: Iterable[dict[str, Any]], *, path: str | None, stale_over: float | None) -> list[dict[str, Any]]:
    """Rows on ``path`` (any if None) whose quote is older than ``stale_over`` seconds or missing."""
    out = []
    for row in rows:
        if path is not None and row["path"] != path:
            continue
        if stale_over is not None and row["age_s"] is not None and row["age_s"] <= stale_over:
            continue
        out.append(row)
    return out


def _age(age_s: float | None) -> str:
    if age_s is None:
        return "never"
    if age_s < 60:
        return f"{age_s:.1f}s"
    if age_s < 3600:
        return f"{age_s / 60:.1f}m"
    if age_s < 86_400:
        return f"{age_s / 3600:.1f}h"
    return f"{age_s / 86_400:.1f}d"


def _symbol(row: dict[str, Any]) -> str:
    """IB's local symbol when known (an option's full name), else the symbol and, unless a stock, its type."""
    if row["local_symbol"]:
        return row["local_symbol"]
    if not row["symbol"]:
        return "?"
    return row["symbol"] if row["sec_type"] in ("", "STK") else f"{row['symbol']} {row['sec_type']}"


def render_table(rows: list[dict[str, Any]], total: int) -> list[str]:
    """A table a person reads in a terminal, and one line of totals by path."""
    header = ("CONID", "SYMBOL", "STRATEGY", "PATH", "DATA", "AGE", "TARGET", "LAST ERROR")
    body = []
    for row in sorted(rows, key=lambda r: (PATHS.index(r["path"]) if r["path"] in PATHS else 9, r["conid"])):
        strategy = ",".join(row["strategies"])
        body.append(
            (
                str(row["conid"]),
                _symbol(row)[:24],
                strategy if len(strategy) <= 28 else strategy[:25] + "...",
                row["path"],
                row["data_type"] or "-",
                _age(row["age_s"]),
                "-" if not row["target_s"] else _age(row["target_s"]),
                (row["last_error"] or "")[:60],
            )
        )
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip() for line in (header, *body)]
    counts = {p: sum(1 for r in rows if r["path"] == p) for p in PATHS}
    shown = f"{len(rows)} of {total} contracts" if len(rows) != total else f"{total} contracts"
    lines.append(f"{shown}: " + ", ".join(f"{n} {p}" for p, n in counts.items()))
    return lines
