"""Where the Delta tables live, their schemas, and the log's settings.

The data directory is a local path or any delta-rs URI (``s3://``,
``az://``, ``gs://``, ``file://``); each table is a folder under it.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
import pyarrow as pa

__all__ = ["EVENTS_SCHEMA", "SNAPSHOTS_SCHEMA", "LogConfig", "is_local", "table_properties", "table_uri"]

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("type", pa.string(), nullable=False),
        pa.field("stream", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("payload", pa.string(), nullable=False),
        pa.field("v", pa.int32(), nullable=False),
        pa.field("hash", pa.string(), nullable=False),
    ]
)

SNAPSHOTS_SCHEMA = pa.schema(
    [
        pa.field("stream", pa.string(), nullable=False),
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("v", pa.int32(), nullable=False),
        pa.field("state", pa.binary(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
    ]
)

Positive = Annotated[int, msgspec.Meta(ge=1)]


class LogConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Tuning of the event log; the defaults are the production settings."""

    #: A batch is committed at most this long after its first event.
    flush_ms: Annotated[float, msgspec.Meta(ge=0, le=1000)] = 5.0
    #: A batch is committed as soon as it holds this many events.
    max_batch: Positive = 20_000
    #: Appends block (backpressure) while this many events wait for a commit.
    max_pending: Positive = 400_000
    #: Retries of one failing commit before the log refuses further appends.
    commit_retries: Annotated[int, msgspec.Meta(ge=0, le=100)] = 5
    retry_backoff_s: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.05
    #: delta.checkpointInterval of the events table (a checkpoint every N versions).
    checkpoint_interval: Positive = 100
    #: Run compaction, checkpoints and vacuum in the background.
    maintenance: bool = True
    #: Compact small files after this many commits...
    compact_every_commits: Positive = 200
    #: ...or this many seconds, whichever comes first (if there was any commit).
    compact_every_s: Annotated[float, msgspec.Meta(gt=0)] = 600.0
    #: Target size of compacted files; files at this size are left alone.
    compact_target_mb: Positive = 32
    #: Vacuum files that compaction replaced, every N compactions...
    vacuum_every_compactions: Positive = 10
    #: ...once they are older than this (readers of older versions need them until then).
    vacuum_retention_hours: Annotated[float, msgspec.Meta(ge=0)] = 24.0
    #: Delta commit files older than this (and older than the newest checkpoint) are deleted.
    #: Every commit lists the log directory, so its cost grows with the files kept: 30 days of
    #: small commits (Delta's default) made a commit three times slower within hours, and a
    #: busy log keeps about (commits a second x this) files. One minute is far longer than a
    #: reader needs between listing the log and reading it. Time travel by version reaches
    #: back only this far; audits use the ``ts`` column instead.
    log_retention_minutes: Annotated[float, msgspec.Meta(ge=0.01)] = 1.0
    #: fsync each commit's files and directories before acknowledging it (local data dirs). Off only
    #: for data nobody needs after a power cut (throwaway benchmarks): then "durable" means "in the
    #: page cache" and a kernel crash or power cut can lose acknowledged events.
    fsync: bool = True
    #: Object storage only (no lock file there): a log whose newest commit is another writer's and
    #: younger than this is refused as in use; an older one is taken over (its writer died, or is
    #: fenced at its next commit). Longer than the quietest gap between a live runtime's commits
    #: (every snapshot commits a claim and an acknowledgement); 0 always takes over.
    takeover_after_s: Annotated[float, msgspec.Meta(ge=0)] = 180.0


def table_properties(config: LogConfig) -> dict[str, str]:
    """The Delta table properties the events table is kept at."""
    return {
        "delta.checkpointInterval": str(config.checkpoint_interval),
        "delta.appendOnly": "true",
        "delta.logRetentionDuration": f"interval {max(1, round(config.log_retention_minutes * 60))} seconds",
        "delta.deletedFileRetentionDuration": f"interval {max(1, round(config.vacuum_retention_hours * 3600))} seconds",
    }


def is_local(data_dir: str) -> bool:
    return "://" not in data_dir or data_dir.startswith("file://")


def table_uri(data_dir: str, name: str) -> str:
    if data_dir.startswith("file://"):
        data_dir = data_dir[len("file://") :]
    return f"{data_dir.rstrip('/')}/{name}"
