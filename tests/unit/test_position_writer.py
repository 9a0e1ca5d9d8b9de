"""PositionWriter: coalescing, valuation, one commit per flush, flush on stop, retries; HandlerSet fan-out."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pykka
import pytest
from deltalake import DeltaTable

from actors.handlers import HandlerSet
from actors.messaging import CommandRejected, ask
from actors.position_writer import PositionWriter, mark_price, valuation
from events.ib import MarketUpdate, MarketUpdates, PositionChanged
from events.positions import Flush, Flushed, WriterStats, WriterStatsReply
from events.queue import QueueStats
from storage.positions_table import POSITIONS_COLUMNS, PositionsConfig, PositionsTable
from storage.tables import LogConfig, table_uri

#: No timer flush during a test unless the test asks for one; no backoff waits.
QUIET = PositionsConfig(flush_interval_s=3600, retry_backoff_s=0.0)
#: Tables these tests write to directly: no maintenance thread to outlive the test.
NO_MAINTENANCE = LogConfig(maintenance=False)
T0 = 1_700_000_000_000_000


def update(conid: int, *, source: str = "stream", ts_us: int = T0, **prices: float | None) -> MarketUpdate:
    return MarketUpdate(conid=conid, source=source, ts_us=ts_us, **prices)  # type: ignore[arg-type]


def position(
    conid: int, qty: float, avg_cost: float, *, sec_type: str = "STK", multiplier: float = 1.0
) -> PositionChanged:
    return PositionChanged(
        account="DU123",
        conid=conid,
        symbol=f"SYM{conid}",
        sec_type=sec_type,
        position=qty,
        avg_cost=avg_cost,
        multiplier=multiplier,
    )


def rows(data_dir: Path) -> dict[int, dict[str, Any]]:
    table = DeltaTable(table_uri(str(data_dir), "positions")).to_pyarrow_table()
    return {row["conid"]: row for row in table.to_pylist()}


def row_list(data_dir: Path) -> list[dict[str, Any]]:
    return DeltaTable(table_uri(str(data_dir), "positions")).to_pyarrow_table().to_pylist()


def flush(ref: pykka.ActorRef[Any]) -> Flushed:
    return ask(ref, Flush())


def stats(ref: pykka.ActorRef[Any]) -> WriterStatsReply:
    return ask(ref, WriterStats())


# ---------------------------------------------------------------------- pure valuation


def test_mark_is_mid_then_last_then_close() -> None:
    assert mark_price(update(1, bid=9.0, ask=11.0, last=12.0)) == 10.0
    assert mark_price(update(1, bid=-1.0, ask=11.0, last=12.0, close=8.0)) == 12.0  # IB's -1: no bid
    assert mark_price(update(1, bid=0.0, ask=11.0, last=float("nan"), close=8.0)) == 8.0
    assert mark_price(update(1)) is None


def test_valuation_of_a_stock_and_an_option() -> None:
    # 100 shares bought at 50, quoted 54/56
    assert valuation(100, 50.0, 1.0, 55.0) == (5500.0, 500.0)
    # 2 calls bought at 1.50: IB's avg_cost is per contract, 150.0; quoted 2.00
    assert valuation(2, 150.0, 100.0, 2.0) == (400.0, 100.0)
    # short 3 puts sold at 2.00 (avg_cost 200.0), now 1.00: a gain
    assert valuation(-3, 200.0, 100.0, 1.0) == (-300.0, 300.0)
    assert valuation(1, 1.0, 1.0, None) == (None, None)


# ---------------------------------------------------------------------- the actor


def test_ten_updates_of_one_contract_make_one_row_in_one_commit(data_dir: Path) -> None:
    ref = PositionWriter.start(str(data_dir), QUIET)
    for i in range(10):
        ref.tell(update(1, bid=100.0 + i, ask=101.0 + i, ts_us=T0 + i))
    ref.tell(update(2, bid=5.0, ask=6.0))
    assert flush(ref) == Flushed(rows=2)

    written = rows(data_dir)
    assert len(row_list(data_dir)) == 2
    assert written[1]["bid"] == 109.0  # the newest update of the interval won
    assert written[1]["ts"].timestamp() == pytest.approx((T0 + 9) / 1e6)
    assert DeltaTable(table_uri(str(data_dir), "positions")).version() == 1  # create + one append
    assert list(POSITIONS_COLUMNS) == DeltaTable(table_uri(str(data_dir), "positions")).schema().to_arrow().names
    assert stats(ref) == WriterStatsReply(rows_written=2, flushes=1, updates_received=11)


def test_each_flush_interval_writes_its_own_row(data_dir: Path) -> None:
    ref = PositionWriter.start(str(data_dir), QUIET)
    ref.tell(update(1, source="stream", bid=1.0, ask=2.0))
    flush(ref)
    ref.tell(update(1, source="queue", bid=3.0, ask=4.0, ts_us=T0 + 1))
    flush(ref)
    assert flush(ref) == Flushed(rows=0)  # nothing new: no empty commit
    assert [(r["source"], r["mark"]) for r in sorted(row_list(data_dir), key=lambda r: r["ts"])] == [
        ("stream", 1.5),
        ("queue", 3.5),
    ]
    assert stats(ref).flushes == 2


def test_both_sources_are_written_alike(data_dir: Path) -> None:
    ref = PositionWriter.start(str(data_dir), QUIET)
    ref.tell(position(1, 10, 20.0))
    ref.tell(position(2, 10, 20.0))
    ref.tell(update(1, source="stream", last=21.0))
    ref.tell(update(2, source="queue", last=21.0))
    flush(ref)
    written = rows(data_dir)
    assert written[1]["source"] == "stream"
    assert written[2]["source"] == "queue"
    strip = ("conid", "symbol", "source")
    assert {k: v for k, v in written[1].items() if k not in strip} == {
        k: v for k, v in written[2].items() if k not in strip
    }


def test_rows_record_the_market_data_type(data_dir: Path) -> None:
    ref = PositionWriter.start(str(data_dir), QUIET)
    ref.tell(update(1, last=21.0))
    ref.tell(MarketUpdate(conid=2, source="queue", ts_us=T0, bid=1.0, ask=1.1, data_type="delayed_frozen"))
    flush(ref)
    written = rows(data_dir)
    assert (written[1]["data_type"], written[2]["data_type"]) == ("live", "delayed_frozen")


def test_a_portfolio_mark_never_hides_a_recent_quote(data_dir: Path) -> None:
    """Newest row per contract: a portfolio mark within the floor of a stream/queue quote is not written."""
    ref = PositionWriter.start(str(data_dir), PositionsConfig(flush_interval_s=3600, portfolio_floor_s=60))
    ref.tell(update(1, source="stream", ts_us=T0, last=21.0))
    ref.tell(update(2, source="queue", ts_us=T0, last=31.0))
    flush(ref)
    ref.tell(update(1, source="portfolio", ts_us=T0 + 59_000_000, last=20.0))  # IB's mark, 59 s later
    ref.tell(update(2, source="portfolio", ts_us=T0 + 59_000_000, last=30.0))
    assert flush(ref).rows == 0
    ref.tell(update(1, source="portfolio", ts_us=T0 + 61_000_000, last=20.5))  # no quote for 61 s: the floor
    flush(ref)
    newest = {}
    for row in sorted(row_list(data_dir), key=lambda r: r["ts"]):
        newest[row["conid"]] = row
    assert (newest[1]["source"], newest[1]["last"]) == ("portfolio", 20.5)
    assert (newest[2]["source"], newest[2]["last"]) == ("queue", 31.0)


def test_a_portfolio_mark_prices_a_contract_nobody_quotes(data_dir: Path) -> None:
    ref = PositionWriter.start(str(data_dir), QUIET)
    ref.tell(position(7, 10, 20.0))
    ref.tell(MarketUpdates(updates=[update(7, source="portfolio", last=22.0), update(8, source="portfolio", last=5.0)]))
    flush(ref)
    written = rows(data_dir)
    assert (written[7]["source"], written[7]["mark"], written[7]["market_value"]) == ("portfolio", 22.0, 220.0)
    assert written[8]["source"] == "portfolio"


def test_stock_and_option_rows_carry_mark_value_and_pnl(data_dir: Path) -> None:
    ref = PositionWriter.start(str(data_dir), QUIET)
    ref.tell(position(1, 100, 50.0))
    ref.tell(position(2, 2, 150.0, sec_type="OPT", multiplier=100.0))
    ref.tell(position(2, 2, 150.0, sec_type="OPT", multiplier=100.0))  # the latest per conid is kept
    ref.tell(update(1, bid=54.0, ask=56.0, last=55.5))
    ref.tell(update(2, bid=1.9, ask=2.1, iv=0.31, delta=0.45, gamma=0.02, vega=0.11, theta=-0.03))
    flush(ref)
    stock, option = rows(data_dir)[1], rows(data_dir)[2]
    assert (stock["symbol"], stock["sec_type"], stock["account"]) == ("SYM1", "STK", "DU123")
    assert (stock["position"], stock["avg_cost"], stock["mark"]) == (100.0, 50.0, 55.0)
    assert stock["market_value"] == pytest.approx(5500.0)
    assert stock["unrealized_pnl"] == pytest.approx(500.0)
    assert option["mark"] == pytest.approx(2.0)
    assert option["market_value"] == pytest.approx(400.0)
    assert option["unrealized_pnl"] == pytest.approx(100.0)
    assert (option["iv"], option["delta"], option["gamma"], option["vega"], option["theta"]) == (
        0.31,
        0.45,
        0.02,
        0.11,
        -0.03,
    )
    assert stock["iv"] is None


def test_prices_without_a_position_leave_valuation_null(data_dir: Path) -> None:
    ref = PositionWriter.start(str(data_dir), QUIET)
    ref.tell(update(7, bid=1.0, ask=float("nan"), last=2.0))
    flush(ref)
    row = rows(data_dir)[7]
    assert (row["position"], row["market_value"], row["unrealized_pnl"], row["symbol"]) == (None, None, None, None)
    assert (row["ask"], row["mark"]) == (None, 2.0)


def test_rows_are_flushed_on_stop(data_dir: Path) -> None:
    ref = PositionWriter.start(str(data_dir), QUIET)
    ref.tell(update(1, last=3.0))
    ref.tell(update(2, last=4.0))
    ref.stop(timeout=10)
    assert sorted(rows(data_dir)) == [1, 2]


def test_the_timer_flushes_without_being_asked(data_dir: Path) -> None:
    table = PositionsTable(str(data_dir), maintenance=NO_MAINTENANCE)
    written = threading.Event()

    def write(rows_: pa.Table) -> None:
        table.append(rows_)
        written.set()

    ref = PositionWriter.start(str(data_dir), PositionsConfig(flush_interval_s=0.02), table_writer=write)
    ref.tell(update(1, last=3.0))
    assert written.wait(timeout=10)
    assert stats(ref).rows_written == 1


def failing_first(n: int, data_dir: Path) -> tuple[Callable[[pa.Table], None], list[int]]:
    """A writer whose first ``n`` commits fail; later ones reach the real Delta table."""
    table = PositionsTable(str(data_dir), maintenance=NO_MAINTENANCE)
    calls: list[int] = []

    def write(rows_: pa.Table) -> None:
        calls.append(rows_.num_rows)
        if len(calls) <= n:
            raise OSError(f"storage hiccup {len(calls)}")
        table.append(rows_)

    return write, calls


def test_a_failed_commit_is_retried_with_backoff(data_dir: Path) -> None:
    write, calls = failing_first(2, data_dir)
    ref = PositionWriter.start(str(data_dir), QUIET, table_writer=write)
    ref.tell(update(1, last=3.0))
    assert flush(ref) == Flushed(rows=1)
    assert calls == [1, 1, 1]
    assert stats(ref).write_errors == 2
    assert sorted(rows(data_dir)) == [1]


def test_a_flush_that_keeps_failing_keeps_its_rows_for_the_next(data_dir: Path) -> None:
    write, calls = failing_first(4, data_dir)  # retries=3: all four attempts of the first flush fail
    ref = PositionWriter.start(str(data_dir), QUIET, table_writer=write)
    ref.tell(update(1, last=3.0))
    failed = flush(ref)
    assert (failed.ok, failed.rows, failed.pending) == (False, 0, 1)
    assert "storage hiccup 4" in failed.error
    ref.tell(update(1, last=3.5))  # coalesces with the kept row: the buffer stays one per contract
    ref.tell(update(2, last=9.0))
    assert flush(ref) == Flushed(rows=2)
    assert {c: r["last"] for c, r in rows(data_dir).items()} == {1: 3.5, 2: 9.0}
    s = stats(ref)
    assert (s.failed_flushes, s.write_errors, s.flushes, s.rows_written, s.pending) == (1, 4, 1, 2, 0)
    assert calls == [1, 1, 1, 1, 2]
    assert ref.is_alive()


def test_an_unknown_command_is_rejected(data_dir: Path) -> None:
    ref = PositionWriter.start(str(data_dir), QUIET)
    with pytest.raises(CommandRejected):
        ask(ref, QueueStats())


# ---------------------------------------------------------------------- HandlerSet


class Recorder(pykka.ThreadingActor):
    """A handler that records what it is told and signals after ``expect`` messages."""

    def __init__(self, expect: int = 1, *, crash: bool = False) -> None:
        super().__init__()
        self.seen: list[Any] = []
        self.expect = expect
        self.crash = crash
        self.done = threading.Event()

    def on_receive(self, message: Any) -> Any:
        if self.crash:
            raise RuntimeError("handler bug")
        self.seen.append(message)
        if len(self.seen) >= self.expect:
            self.done.set()
        return None


def test_handler_set_fans_out_and_survives_a_dead_handler(data_dir: Path) -> None:
    writer = PositionWriter.start(str(data_dir), QUIET)
    recorder = Recorder.start(expect=2)
    dead = Recorder.start()
    dead.stop()
    handlers = HandlerSet()
    handlers.add(dead)
    handlers.add(writer)
    handlers.add(recorder)
    handlers.add(recorder)  # subscribing twice does not deliver twice
    assert len(handlers) == 3

    assert handlers.publish(update(1, last=1.0)) == 2
    assert handlers.publish(update(2, last=2.0)) == 2
    assert dead not in handlers
    assert handlers.dropped == 1
    assert recorder.proxy().done.get().wait(timeout=10)
    assert len(recorder.proxy().seen.get()) == 2
    assert flush(writer).rows == 2


def test_a_crashing_handler_does_not_stop_the_others() -> None:
    crashing = Recorder.start(crash=True)
    recorder = Recorder.start(expect=3)
    handlers = HandlerSet([crashing, recorder])
    for conid in (1, 2, 3):
        handlers.publish(update(conid, last=1.0))
    assert recorder.proxy().done.get().wait(timeout=10)
    assert [m.conid for m in recorder.proxy().seen.get()] == [1, 2, 3]


def test_handler_filter_by_message_type() -> None:
    positions_only = Recorder.start()
    handlers = HandlerSet()
    handlers.add(positions_only, accepts=(PositionChanged,))
    assert handlers.publish(update(1, last=1.0)) == 0
    assert handlers.publish(position(1, 1, 1.0)) == 1
    assert positions_only.proxy().done.get().wait(timeout=10)
    assert handlers.remove(positions_only)
    assert not handlers.remove(positions_only)


def test_a_malformed_update_is_dropped_without_killing_the_writer(data_dir: Path) -> None:
    ref = PositionWriter.start(str(data_dir), QUIET)
    ref.tell(MarketUpdate(conid=1, source="stream", ts_us=T0, bid="oops"))  # type: ignore[arg-type]
    dropped = flush(ref)
    assert (dropped.ok, dropped.pending) == (False, 0)
    ref.tell(update(2, last=1.0))
    assert flush(ref) == Flushed(rows=1)
    assert sorted(rows(data_dir)) == [2]


def test_a_burst_reaches_batch_handlers_whole_and_the_others_one_by_one(data_dir: Path) -> None:
    """MarketUpdates (one IB socket read) is one message to the writer, single updates to the rest."""
    from events.ib import MarketUpdates

    writer = PositionWriter.start(str(data_dir), QUIET)
    recorder = Recorder.start(expect=3)
    handlers = HandlerSet()
    handlers.add(writer, accepts=(MarketUpdate, PositionChanged), batches=True)
    handlers.add(recorder)
    told = handlers.publish(MarketUpdates(updates=[update(1, last=1.0), update(2, last=2.0), update(1, last=3.0)]))
    assert told == 4  # one batch to the writer, three single updates to the recorder
    assert recorder.proxy().done.get().wait(timeout=10)
    assert [type(m).__name__ for m in recorder.proxy().seen.get()] == ["MarketUpdate"] * 3
    assert stats(writer).updates_received == 3
    assert flush(writer).rows == 2  # the newest of each contract, as if they came one by one
