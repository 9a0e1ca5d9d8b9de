"""Make a Delta commit on a local data dir survive a power cut: fsync its files and directories.

delta-rs writes a data file and then creates the commit file with a rename
or a hard link; on a local file system none of that reaches the disk until
the kernel gets round to it (object_store's local store never calls fsync).
"Durable" in this project means on disk (DESIGN.md section 3), so the event
log, the snapshot store and the positions table call :func:`sync_commit`
after a commit and before anyone is told about it.

What a commit needs, in the order a reader needs it: each file the commit
adds (its data), the directory holding each of them (its name), the commit
file itself, and ``_delta_log`` (the commit file's name). The table
directory is synced too: it holds the names of new data files and of
``_delta_log`` itself on a new table. A checkpoint that maintenance is about
to clean older commit files below gets the same treatment first
(:func:`sync_checkpoint`), or a power cut could leave neither.

Object stores are not touched: a PUT that returned is the store's promise
(docs/operations.md says what each one guarantees).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import unquote

__all__ = [
    "commit_file",
    "fsync",
    "local_dir",
    "sync_checkpoint",
    "sync_commit",
    "sync_commit_files_between",
    "sync_new_table",
]


def local_dir(uri: str) -> Path | None:
    """The directory of a local table URI (a path, or ``file://`` as delta-rs reports it); None for object stores."""
    if uri.startswith("file://"):
        return Path(unquote(uri[len("file://") :]))
    if "://" in uri:
        return None
    return Path(uri)


def fsync(path: str | os.PathLike[str]) -> None:
    """fsync one file or directory (the one place this module reaches the disk; tests wrap it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(table_dir: str | os.PathLike[str], version: int) -> Path:
    return Path(table_dir) / "_delta_log" / f"{version:020d}.json"


def _added_files(commit: Path) -> list[Path]:
    """The data files a commit adds (paths relative to the table, percent-encoded in the log)."""
    table = commit.parent.parent
    added = []
    for line in commit.read_bytes().splitlines():
        if not line.strip():
            continue
        action = json.loads(line)
        add = action.get("add")
        if add is not None and "://" not in add["path"]:
            added.append(table / unquote(add["path"]))
    return added


def sync_commit(table_dir: str | os.PathLike[str], version: int) -> list[Path]:
    """fsync everything commit ``version`` of the local table needs; returns what was synced, in order."""
    table = Path(table_dir)
    commit = commit_file(table, version)
    synced: list[Path] = []
    data = _added_files(commit)
    for path in data:
        fsync(path)
        synced.append(path)
    for directory in sorted({path.parent for path in data} | {table}):
        fsync(directory)
        synced.append(directory)
    fsync(commit)
    fsync(commit.parent)
    synced += [commit, commit.parent]
    return synced


def sync_commit_files_between(table_dir: str | os.PathLike[str], after: int, before: int) -> list[Path]:
    """fsync the commit files of versions ``after < v < before`` that still exist.

    Those are other writers' commits of this process (maintenance: a
    property change, a vacuum) that landed between two of the log's own. They
    add no data of ours, but a commit file left empty by a power cut before
    ours would make the whole table unreadable. One cleaned meanwhile is
    skipped: it is below a checkpoint, which was synced first.
    """
    synced = []
    for version in range(after + 1, before):
        path = commit_file(table_dir, version)
        try:
            fsync(path)
        except FileNotFoundError:
            continue
        synced.append(path)
    return synced


def sync_new_table(table_dir: str | os.PathLike[str], version: int) -> list[Path]:
    """A table just created: its first commit, and the table's own name in the data directory."""
    synced = sync_commit(table_dir, version)
    parent = Path(table_dir).parent
    fsync(parent)
    return [*synced, parent]


def sync_checkpoint(table_dir: str | os.PathLike[str], version: int) -> list[Path]:
    """fsync the checkpoint at ``version`` and ``_last_checkpoint`` before older commit files may go."""
    log_dir = Path(table_dir) / "_delta_log"
    paths = sorted(log_dir.glob(f"{version:020d}.checkpoint*.parquet"))
    last = log_dir / "_last_checkpoint"
    if last.exists():
        paths.append(last)
    for path in paths:
        fsync(path)
    fsync(log_dir)
    return [*paths, log_dir]
