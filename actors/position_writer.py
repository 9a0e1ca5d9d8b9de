"""The PositionWriter: every position with its latest prices, into the Delta table ``positions``.

A market update handler (DESIGN.md section 2). Streams tick many times a
second; the table needs a sample, not every tick, and every Delta commit
costs milliseconds and a file. So updates are coalesced per contract (the
newest update of a contract in an interval wins) and written once per
``flush_interval_s`` as one commit holding one row per contract. A ticker
thread tells the actor ``Flush``; the actor never sleeps on its own thread.

Valuation (IB's own convention, the one TWS and ib_insync's ``PortfolioItem`` use):

* ``mark`` = mid of bid and ask when both are > 0, else ``last`` (> 0), else ``close`` (> 0);
* ``market_value = position * mark * multiplier``;
* ``unrealized_pnl = market_value - position * avg_cost``.

IB's ``avgCost`` is per *contract*, commission included, so for options and
futures it already contains the multiplier (an option bought at 1.50 with
multiplier 100 has avgCost 150.0). It is therefore never multiplied again,
while the mark, a per-unit price, is. For a stock (multiplier 1) this reduces
to ``position * (mark - avg_cost)``.

Rows are built at flush time from the newest update and the newest position
of each contract. A contract with prices but no position from IB gets a row
with a null position, market value and P&L: its prices are still worth
keeping.

Portfolio prices (source ``portfolio``: IB's updatePortfolio marks, about
every 3 minutes, no line) are a *floor*: one is kept only when the contract
has had no stream or queue quote within ``portfolio_floor_s`` (180 s, IB's
cadence) of it. A reader asking for the newest row per contract (max ``ts``)
therefore never gets a portfolio mark in place of a fresher stream or
snapshot quote, yet a contract nobody can quote still gets a price. The rule
compares the updates' own ``ts_us``, so it holds whatever order they arrive
in. A write that fails is retried with backoff a bounded number of
times; then the rows stay for the next flush (at most one per contract, so the
buffer is bounded) and an error is logged: a positions-table hiccup never
stops the runtime.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pykka
from loguru import logger

from actors.messaging import Request, reject
from actors.ticker import Ticker
from events.ib import MarketUpdate, MarketUpdates, PositionChanged
from events.positions import Flush, Flushed, WriterStats, WriterStatsReply
from storage.positions_table import PositionsConfig, PositionsTable
from storage.tables import LogConfig

__all__ = ["PositionWriter", "mark_price", "valuation"]


def _finite(value: float | None) -> float | None:
    """ib_insync reports a missing value as NaN; the table stores null instead."""
    return value if value is not None and math.isfinite(value) else None


def _price(value: float | None) -> float | None:
    """A usable price: finite and > 0 (IB sends -1 or 0 for "no quote")."""
    return value if value is not None and math.isfinite(value) and value > 0 else None


def mark_price(update: MarketUpdate) -> float | None:
    """Mid of bid/ask when both are > 0, else last, else close; None when none is usable."""
    bid, ask = _price(update.bid), _price(update.ask)
    if bid is not None and ask is not None:
        return (bid + ask) / 2.0
    last = _price(update.last)
    return last if last is not None else _price(update.close)


def valuation(
    position: float, avg_cost: float, multiplier: float, mark: float | None
) -> tuple[float | None, float | None]:
    """(market_value, unrealized_pnl); ``avg_cost`` is IB's, per contract, multiplier included."""
    if mark is None:
        return None, None
    market_value = position * mark * multiplier
    return market_value, market_value - position * avg_cost


def _multiplier(position: PositionChanged) -> float:
    # a missing or nonsensical multiplier means the IB actor could not parse one: IB's default is 1
    m = position.multiplier
    return m if math.isfinite(m) and m > 0 else 1.0


class PositionWriter(pykka.ThreadingActor):
    """Appends coalesced position rows to the Delta table ``positions``.

    Handles: MarketUpdate (told; kept, newest per contract), PositionChanged
    (told; newest per contract), Flush (told by the ticker, or asked: replies
    Flushed), WriterStats (asked: replies WriterStatsReply).
    Emits: nothing to other actors; one Delta commit per non-empty flush.

    ``table_writer`` replaces the Delta append (tests inject failures with it);
    it receives one Arrow table per flush.
    """

    def __init__(
        self,
        data_dir: str,
        config: PositionsConfig | None = None,
        *,
        storage_options: dict[str, str] | None = None,
        table_writer: Callable[[pa.Table], None] | None = None,
        table_maintenance: LogConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config or PositionsConfig()
        self.table = PositionsTable(str(data_dir), storage_options, maintenance=table_maintenance)
        self._write = table_writer or self.table.append
        self._pending: dict[int, MarketUpdate] = {}
        self._positions: dict[int, PositionChanged] = {}
        #: ts_us of the newest stream/queue quote of each contract, for the portfolio floor rule.
        self._quoted_us: dict[int, int] = {}
        self._floor_us = int(self.config.portfolio_floor_s * 1_000_000)
        self._ticker: Ticker | None = None
        self.rows_written = 0
        self.flushes = 0
        self.updates_received = 0
        self.positions_received = 0
        self.failed_flushes = 0
        self.write_errors = 0
        self.last_error = ""

    # ------------------------------------------------------------------ lifecycle

    def on_start(self) -> None:
        self._ticker = Ticker(self.actor_ref, Flush(), self.config.flush_interval_s, name="positions-flush").start()

    def on_stop(self) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        result = self._flush()
        self.table.close()
        if not result.ok:
            logger.error("positions writer stopped with {} rows unwritten: {}", result.pending, result.error)

    def on_failure(self, *_: object) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        self.table.close()

    # ------------------------------------------------------------------ messages

    def on_receive(self, message: Any) -> Any:
        match message:
            case MarketUpdate():
                self.updates_received += 1
                self._keep(message)
            case MarketUpdates(updates=updates):
                self.updates_received += len(updates)
                keep = self._keep
                for update in updates:  # the newest of each contract wins, as one by one
                    keep(update)
            case PositionChanged(conid=conid):
                self.positions_received += 1
                self._positions[conid] = message
            case Flush():
                self._flush()
            case Request(command=Flush()):
                message.reply.set(self._flush())
            case Request(command=WriterStats()):
                message.reply.set(self.stats())
            case Request(command=command):
                exc = reject(type(command).__name__, "unknown_command", "the positions writer does not take it")
                message.reply.set_exception(exc_info=(type(exc), exc, None))
            case _:
                logger.debug("positions writer ignored {!r}", message)
        return None

    def _keep(self, update: MarketUpdate) -> None:
        conid = update.conid
        if update.source == "portfolio":
            quoted = self._quoted_us.get(conid)
            if quoted is not None and update.ts_us - quoted < self._floor_us:
                return  # a recent stream/queue quote is better than IB's portfolio mark
        else:
            quoted = self._quoted_us.get(conid)
            if quoted is None or update.ts_us > quoted:
                self._quoted_us[conid] = update.ts_us
        self._pending[conid] = update

    def stats(self) -> WriterStatsReply:
        return WriterStatsReply(
            rows_written=self.rows_written,
            flushes=self.flushes,
            updates_received=self.updates_received,
            positions_received=self.positions_received,
            pending=len(self._pending),
            failed_flushes=self.failed_flushes,
            write_errors=self.write_errors,
            last_error=self.last_error,
        )

    # ------------------------------------------------------------------ flushing

    def _flush(self) -> Flushed:
        if not self._pending:
            return Flushed(rows=0)
        try:
            rows = [self._row(update) for update in self._pending.values()]
            table = PositionsTable.to_arrow(rows)
        except Exception as exc:  # noqa: BLE001 - a malformed message must not kill the writer
            # msgspec Structs are not type-checked when built in Python: bad data would never
            # convert, so keeping it would fail every later flush too
            self.failed_flushes += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            logger.exception("positions table: {} rows dropped, they do not fit the schema", len(self._pending))
            self._pending.clear()
            return Flushed(rows=0, ok=False, error=self.last_error)
        error = self._write_with_retries(table)
        if error is not None:
            self.failed_flushes += 1
            self.last_error = f"{type(error).__name__}: {error}"
            logger.error(
                "positions table: commit failed after {} retries, {} rows kept for the next flush: {}",
                self.config.write_retries,
                len(rows),
                self.last_error,
            )
            return Flushed(rows=0, ok=False, pending=len(rows), error=self.last_error)
        self._pending.clear()
        self.rows_written += len(rows)
        self.flushes += 1
        return Flushed(rows=len(rows))

    def _write_with_retries(self, table: pa.Table) -> BaseException | None:
        """Write ``table``; the last error if every attempt failed, else None.

        The backoff runs on the actor's thread: it is short and bounded
        (0.35 s with the defaults), and updates arriving meanwhile only wait
        in the mailbox to be coalesced.
        """
        delay = self.config.retry_backoff_s
        error: BaseException | None = None
        for attempt in range(self.config.write_retries + 1):
            if attempt:
                time.sleep(delay)
                delay *= 2
            try:
                self._write(table)
            except Exception as exc:  # noqa: BLE001 - any storage failure is retried, then logged
                self.write_errors += 1
                error = exc
                logger.warning("positions table: commit attempt {} failed: {}", attempt + 1, exc)
                continue
            return None
        return error

    def _row(self, update: MarketUpdate) -> dict[str, Any]:
        held = self._positions.get(update.conid)
        mark = mark_price(update)
        market_value = unrealized_pnl = None
        if held is not None:
            market_value, unrealized_pnl = valuation(held.position, held.avg_cost, _multiplier(held), mark)
        return {
            "conid": update.conid,
            "symbol": held.symbol if held else None,
            "sec_type": held.sec_type if held else None,
            "account": held.account if held else None,
            "position": held.position if held else None,
            "avg_cost": held.avg_cost if held else None,
            "bid": _finite(update.bid),
            "ask": _finite(update.ask),
            "last": _finite(update.last),
            "mark": mark,
            "market_value": market_value,
            "unrealized_pnl": unrealized_pnl,
            "iv": _finite(update.iv),
            "delta": _finite(update.delta),
            "gamma": _finite(update.gamma),
            "vega": _finite(update.vega),
            "theta": _finite(update.theta),
            "source": update.source,
            "ts": update.ts_us if update.ts_us > 0 else time.time_ns() // 1000,
            "data_type": update.data_type,
        }
