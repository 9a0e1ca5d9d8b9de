"""The Delta table ``positions``: one row per contract per flush, prices and valuation.

Written only by :class:`actors.position_writer.PositionWriter`; read by anyone
(DuckDB, Polars, Spark, ...) for analytics. It is a data table, not the event
log: rows are derived from IB positions and market updates, so losing a flush
loses a sample, never a decision. Appends only; ``ts`` is when the prices were
observed, so "as of" questions filter on it.

``source`` says which path priced a row: ``stream``, ``queue`` (a snapshot)
or ``portfolio`` (IB's portfolio updates: the line-free floor, written only
when no stream or queue quote of the contract is recent, so the newest row
of a contract is never a portfolio mark hiding a fresher quote; see
:mod:`actors.position_writer`). ``data_type`` is IB's market data type of the
prices: live, frozen, delayed or delayed_frozen.

Schema evolution: columns are only ever added, at the end and nullable. A
table written by an older version gets them when it is opened (one metadata
commit); its old rows read them as null.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import pyarrow as pa
from deltalake import DeltaTable, Schema, write_deltalake

from storage.durability import sync_commit, sync_commit_files_between, sync_new_table
from storage.maintenance import Maintenance, append_hooks, commits_since_checkpoint, keep_table_properties
from storage.tables import LogConfig, is_local, table_properties, table_uri

__all__ = ["POSITIONS_COLUMNS", "POSITIONS_SCHEMA", "PositionsConfig", "PositionsTable"]

POSITIONS_SCHEMA = pa.schema(
    [
        pa.field("conid", pa.int64(), nullable=False),
        pa.field("symbol", pa.string()),
        pa.field("sec_type", pa.string()),
        pa.field("account", pa.string()),
        # null when IB has not (yet) reported a position for the contract
        pa.field("position", pa.float64()),
        pa.field("avg_cost", pa.float64()),
        pa.field("bid", pa.float64()),
        pa.field("ask", pa.float64()),
        pa.field("last", pa.float64()),
        pa.field("mark", pa.float64()),
        pa.field("market_value", pa.float64()),
        pa.field("unrealized_pnl", pa.float64()),
        pa.field("iv", pa.float64()),
        pa.field("delta", pa.float64()),
        pa.field("gamma", pa.float64()),
        pa.field("vega", pa.float64()),
        pa.field("theta", pa.float64()),
        pa.field("source", pa.string(), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        # added with issue 11: null in rows written before it
        pa.field("data_type", pa.string()),
    ]
)

POSITIONS_COLUMNS: tuple[str, ...] = tuple(POSITIONS_SCHEMA.names)


class PositionsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Tuning of the positions writer (config file table ``[positions]``)."""

    #: Rows are coalesced per contract and committed once per interval.
    flush_interval_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 1.0
    #: Retries of a failed commit within one flush; after them the rows wait for the next flush.
    write_retries: Annotated[int, msgspec.Meta(ge=0, le=20)] = 3
    #: First backoff between retries; doubled each time (0.05, 0.1, 0.2 s by default).
    retry_backoff_s: Annotated[float, msgspec.Meta(ge=0, le=10)] = 0.05
    #: A portfolio price (source "portfolio", IB's updatePortfolio, about every 3 minutes) is written only
    #: when the contract has had no stream or queue quote for this long: it is a floor, never a mask.
    portfolio_floor_s: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 180.0


class PositionsTable:
    """Appends Arrow tables to ``<data dir>/positions``, creating the table on first use.

    The table stays open between appends: handing ``write_deltalake`` a path
    loads the table afresh (checkpoint plus log listing) for every flush, and
    a growth run showed flushes slowing from 72 to 104 ms within 2,000 of
    them. It is maintained like the event log, by a background thread when
    ``maintenance.maintenance`` is on: checkpoints, cleanup of expired commit
    files, compaction of the one-small-file-per-flush, and vacuum of what
    compaction replaced. :meth:`close` stops that thread.
    """

    #: Names this table's maintenance commits in the Delta history.
    WRITER_ID = "slotwise-positions"

    def __init__(
        self, data_dir: str, storage_options: dict[str, str] | None = None, maintenance: LogConfig | None = None
    ) -> None:
        self.uri = table_uri(str(data_dir), "positions")
        self.storage_options = storage_options
        self.config = maintenance or LogConfig()
        self._dt: DeltaTable | None = None
        self._synced_version = -1
        self._maintenance: Maintenance | None = None

    def ensure(self) -> DeltaTable:
        """Create the table if it does not exist, open it, start its maintenance (idempotent)."""
        if self._dt is not None:
            return self._dt
        if not DeltaTable.is_deltatable(self.uri, storage_options=self.storage_options):
            created = DeltaTable.create(
                self.uri,
                schema=POSITIONS_SCHEMA,
                mode="ignore",
                name="positions",
                description="Slotwise positions with prices, greeks and valuation; one row per contract per flush",
                configuration=table_properties(self.config),
                storage_options=self.storage_options,
            )
            if self._syncs:
                sync_new_table(self.uri, created.version())
        dt = DeltaTable(self.uri, storage_options=self.storage_options)
        opened = dt.version()  # commits after it (columns, properties) are synced with the next flush
        _add_missing_columns(dt)
        keep_table_properties(dt, self.config, self.WRITER_ID)
        self._dt = dt
        self._synced_version = max(self._synced_version, opened)
        if self.config.maintenance and self._maintenance is None:
            self._maintenance = Maintenance(
                self.uri, self.config, self.WRITER_ID, self.storage_options, table="positions",
                pending_commits=commits_since_checkpoint(dt),
            )  # fmt: skip
            self._maintenance.start()
        return dt

    def append(self, rows: pa.Table) -> None:
        """One Delta commit holding ``rows`` (which must follow :data:`POSITIONS_SCHEMA`)."""
        dt = self.ensure()
        try:
            write_deltalake(dt, rows, mode="append", post_commithook_properties=append_hooks(self.config, dt))
            if self._syncs:  # on disk before the writer reports the flush
                sync_commit_files_between(self.uri, self._synced_version, dt.version())  # maintenance's, in between
                sync_commit(self.uri, dt.version())
                self._synced_version = dt.version()
        except BaseException:
            self._dt = None  # whatever state the handle is in, the next append opens the table afresh
            raise
        if self._maintenance is not None:
            self._maintenance.note_commit()

    @property
    def _syncs(self) -> bool:
        return self.config.fsync and is_local(self.uri)

    def maintenance_stats(self) -> dict[str, Any] | None:
        return None if self._maintenance is None else self._maintenance.stats()

    def close(self) -> None:
        """Stop the maintenance thread (appends may still follow; they reopen and restart it)."""
        if self._maintenance is not None:
            # within the runtime's 30 s for stopping an actor; a round cut short is redone next start
            self._maintenance.stop(timeout=20)
            self._maintenance = None
        self._dt = None

    @staticmethod
    def to_arrow(rows: list[dict[str, Any]]) -> pa.Table:
        """Rows (dicts keyed by column) to an Arrow table of the positions schema."""
        return pa.Table.from_pylist(rows, schema=POSITIONS_SCHEMA)


def _add_missing_columns(dt: DeltaTable) -> None:
    """Evolve a table written by an older version: add the columns of :data:`POSITIONS_SCHEMA` it lacks.

    An ALTER (metadata only, no data rewritten) rather than ``schema_mode="merge"`` on every append:
    it runs once per table, and appends stay plain appends.
    """
    have = {f.name for f in dt.schema().fields}
    missing = [f for f in POSITIONS_SCHEMA if f.name not in have]
    if missing:
        dt.alter.add_columns(list(Schema.from_arrow(pa.schema(missing)).fields))
