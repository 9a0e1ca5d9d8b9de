"""The snapshot store: newest per stream, bounded by seq, and never a corrupt one."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
from deltalake import write_deltalake

from storage.snapshots import SnapshotStore
from storage.tables import SNAPSHOTS_SCHEMA


def test_newest_per_stream_and_not_after_a_seq(data_dir: Path) -> None:
    store = SnapshotStore(str(data_dir))
    assert store.latest("queue") is None
    store.save("queue", 5, b"five")
    store.save("queue", 9, b"nine")
    store.save("registry", 7, b"seven")
    assert store.latest("queue").state == b"nine"  # type: ignore[union-attr]
    assert store.latest("queue", at_or_before=8).state == b"five"  # type: ignore[union-attr]
    assert store.latest("queue", at_or_before=4) is None
    assert sorted(s.seq for s in store.all()) == [5, 7, 9]


def test_a_corrupt_newest_snapshot_falls_back_to_the_one_before(data_dir: Path) -> None:
    store = SnapshotStore(str(data_dir))
    store.save("queue", 5, b"five")
    forged = pa.Table.from_pylist(
        [{"stream": "queue", "seq": 9, "ts": datetime.now(UTC), "v": 1, "state": b"nine", "sha256": "0" * 64}],
        schema=SNAPSHOTS_SCHEMA,
    )
    write_deltalake(store.uri, forged, mode="append")
    assert store.latest("queue").seq == 5  # type: ignore[union-attr]
    assert [s.seq for s in store.all("queue")] == [5]
