"""The positions table stays cheap to append to: one open handle, and the event log's maintenance.

A flush a second for a trading day is ~23,000 commits. Opening the table for
each of them, and keeping every commit file and every small data file, made
flushes slower as the day went on (72 -> 104 ms within 2,000 flushes).
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from storage.positions_table import POSITIONS_SCHEMA, PositionsTable
from storage.tables import LogConfig
from tests.support.collector import wait_until

MAINTAINED = LogConfig(checkpoint_interval=10, compact_every_commits=20, vacuum_every_compactions=1,
                       vacuum_retention_hours=0, log_retention_minutes=0.01)  # fmt: skip


def flush(k: int, contracts: int = 5) -> pa.Table:
    now = datetime.now(UTC)
    rows = [{"conid": c, "symbol": "X", "position": 1.0, "mark": float(k), "source": "stream", "ts": now} for c in range(contracts)]
    return PositionsTable.to_arrow(rows)


def test_appends_reuse_one_open_table(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = PositionsTable(str(data_dir), maintenance=LogConfig(maintenance=False))
    table.append(flush(0))
    opened: list[str] = []
    real_init = DeltaTable.__init__

    def counting(self: DeltaTable, uri: str, *args: Any, **kwargs: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            opened.append(uri)
        real_init(self, uri, *args, **kwargs)

    monkeypatch.setattr(DeltaTable, "__init__", counting)
    for k in range(1, 30):
        table.append(flush(k))
    assert opened == []
    assert DeltaTable(table.uri).to_pyarrow_table().num_rows == 30 * 5


def test_maintenance_compacts_checkpoints_and_cleans(data_dir: Path) -> None:
    table = PositionsTable(str(data_dir), maintenance=MAINTAINED)
    log_dir = data_dir / "positions" / "_delta_log"
    try:
        for k in range(60):
            table.append(flush(k))
            if k == 29:
                time.sleep(1.2)  # the first commit files pass the 1 s log retention
        # the thread works behind the appends: wait for its rounds rather than racing them
        wait_until(lambda: not (log_dir / f"{0:020d}.json").exists(), 30, what="expired commit files to be cleaned")
        stats = wait_until(lambda: (s := table.maintenance_stats()) and s["rounds"] >= 2 and s, 30, what="2 compactions")
    finally:
        table.close()
    assert stats["errors"] == 0
    assert list(log_dir.glob("*.checkpoint.parquet"))
    dt = DeltaTable(table.uri)
    assert len(dt.file_uris()) < 60
    assert dt.metadata().configuration["delta.logRetentionDuration"] == "interval 1 seconds"
    marks = dt.to_pyarrow_table(columns=["mark"]).column("mark").to_pylist()
    assert sorted(set(marks)) == [float(k) for k in range(60)]
    assert len(marks) == 60 * 5


def test_an_existing_table_gets_the_retention_settings(data_dir: Path) -> None:
    old = PositionsTable(str(data_dir), maintenance=LogConfig(maintenance=False))
    DeltaTable.create(old.uri, schema=flush(0).schema, configuration={"delta.appendOnly": "true"})
    table = PositionsTable(str(data_dir), maintenance=LogConfig(maintenance=False, log_retention_minutes=2))
    table.append(flush(1))
    config = DeltaTable(table.uri).metadata().configuration
    assert config["delta.logRetentionDuration"] == "interval 120 seconds"
    assert config["delta.checkpointInterval"] == "100"


def test_an_old_table_without_data_type_gets_the_column(data_dir: Path) -> None:
    """A table written before issue 11 (no ``data_type``) is evolved when opened; its old rows read null."""
    old_schema = pa.schema([f for f in POSITIONS_SCHEMA if f.name != "data_type"])
    uri = PositionsTable(str(data_dir)).uri
    now = datetime.now(UTC)
    old_row = {"conid": 1, "symbol": "X", "mark": 1.0, "source": "stream", "ts": now}
    write_deltalake(uri, pa.Table.from_pylist([old_row], schema=old_schema), mode="append")
    table = PositionsTable(str(data_dir), maintenance=LogConfig(maintenance=False))
    table.append(PositionsTable.to_arrow([{**old_row, "conid": 2, "data_type": "delayed"}]))
    read = {r["conid"]: r for r in DeltaTable(uri).to_pyarrow_table().to_pylist()}
    assert (read[1]["data_type"], read[2]["data_type"]) == (None, "delayed")
    assert DeltaTable(uri).schema().to_arrow().names == list(POSITIONS_SCHEMA.names)
