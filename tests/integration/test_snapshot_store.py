"""The start's one read of every stream's newest snapshot (``SnapshotStore(preload=True)``) on a real Delta table."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

from storage.snapshots import SnapshotStore
from storage.tables import SNAPSHOTS_SCHEMA

STREAMS = ("queue", "registry", "router", "a-stream-name-longer-than-delta-keeps-in-its-statistics")


def _save_history(data_dir: Path) -> None:
    store = SnapshotStore(str(data_dir))
    seq = 0
    for round_ in range(3):
        for stream in STREAMS:
            seq += 10
            store.save(stream, seq, f"{stream}@{round_}".encode())


def _save_together(data_dir: Path, rows: list[tuple[str, int]]) -> None:
    """Several streams' snapshots in one file, as a compaction of the table would leave them."""
    states = [f"{stream}@{seq}".encode() for stream, seq in rows]
    table = pa.Table.from_pydict(
        {
            "stream": [stream for stream, _ in rows],
            "seq": [seq for _, seq in rows],
            "ts": [0] * len(rows),
            "v": [1] * len(rows),
            "state": states,
            "sha256": [hashlib.sha256(state).hexdigest() for state in states],
        }
    )
    write_deltalake(str(data_dir / "snapshots"), table.cast(SNAPSHOTS_SCHEMA), mode="append")


def test_the_preload_finds_what_a_read_of_each_stream_finds(data_dir: Path) -> None:
    _save_history(data_dir)
    _save_together(data_dir, [("registry", 500), ("queue", 5), (STREAMS[-1], 501)])  # newest for two streams, not queue
    preloaded = SnapshotStore(str(data_dir), preload=True)
    plain = SnapshotStore(str(data_dir))
    for stream in (*STREAMS, "never-saved"):
        assert preloaded.latest(stream) == plain.latest(stream), stream
    newest = {stream: snap.seq for stream in STREAMS if (snap := preloaded.latest(stream)) is not None}
    assert newest == {"queue": 90, "registry": 500, "router": 110, STREAMS[-1]: 501}


def test_the_preload_reads_only_the_files_of_the_newest_snapshots(data_dir: Path) -> None:
    """A table grows a file per snapshot: a start must not read them all."""
    _save_history(data_dir)
    adds = pa.table(DeltaTable(str(data_dir / "snapshots")).get_add_actions(flatten=True)).to_pylist()
    last_round = 2 * len(STREAMS) * 10  # seqs of the last round of saves are above this
    # (the long name's files are read to find its head: Delta keeps only a prefix of it as statistics)
    older = [a["path"] for a in adds if a["max.seq"] <= last_round and a["min.stream"] in STREAMS[:-1]]
    assert len(older) == 2 * (len(STREAMS) - 1)
    for path in older:  # unreadable now: only a read that skips them still works
        (data_dir / "snapshots" / path).write_bytes(b"not parquet")
    preloaded = SnapshotStore(str(data_dir), preload=True)
    for round_stream in STREAMS:
        snap = preloaded.latest(round_stream)
        assert snap is not None
        assert snap.state == f"{round_stream}@2".encode()
