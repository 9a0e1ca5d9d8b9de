"""Signed checkpoints of the event log: the Delta table ``checkpoints`` next to ``events``.

A checkpoint says "at Delta version V the events table held seq 1..S, the
chain head was H, these were its data files (path, size, sha256), and these
were the rows since the previous checkpoint (an 8-byte prefix of each row's
hash)", signed with the Ed25519 key of :mod:`storage.signing`. An insider
who rewrites events and recomputes the chain can delete checkpoints but not
forge one, and a digest (the newest checkpoint's head, kept elsewhere)
outlives the whole data directory.

What the signature covers is :class:`Statement`, encoded as msgspec JSON
with its fields in declaration order: a digest carries every field of it,
so anyone can check a digest's signature without Slotwise. The file list and
the row prefixes are covered through their sha256.

The table is a plain Delta table (one row per checkpoint; ``files`` is JSON
text, ``row_hashes`` binary): any Delta engine can read it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from deltalake import DeltaTable, write_deltalake
from deltalake.fs import DeltaStorageHandler

from storage.durability import sync_commit, sync_new_table
from storage.file_hashes import Identity, KnownFile, identity, measure_local, telling
from storage.maintenance import keep_opens_cheap
from storage.reader import open_table, plain_dataset, table_exists
from storage.signing import Signer, fingerprint, signature_valid
from storage.tables import is_local, table_uri

__all__ = [
    "CHECKPOINTS_SCHEMA",
    "STATEMENT_FORMAT",
    "Checkpoint",
    "CheckpointStore",
    "CheckpointsUnreadable",
    "DataFile",
    "FileHasher",
    "Statement",
    "row_prefixes",
    "table_data_files",
]

STATEMENT_FORMAT = "slotwise.checkpoint.v1"
#: Bytes of each row hash kept as a row anchor: enough to tell rows apart, small enough to keep all.
PREFIX_BYTES = 8

CHECKPOINTS_SCHEMA = pa.schema(
    [
        pa.field("seq", pa.int64(), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("hash", pa.string(), nullable=False),
        pa.field("delta_version", pa.int64(), nullable=False),
        pa.field("prev_seq", pa.int64(), nullable=False),
        pa.field("table_id", pa.string(), nullable=False),
        pa.field("files", pa.string(), nullable=False),
        pa.field("files_sha256", pa.string(), nullable=False),
        pa.field("row_hashes", pa.binary(), nullable=False),
        pa.field("rows_sha256", pa.string(), nullable=False),
        pa.field("public_key", pa.string(), nullable=False),
        pa.field("key_fingerprint", pa.string(), nullable=False),
        pa.field("signature", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
    ]
)


class DataFile(msgspec.Struct, frozen=True, kw_only=True):
    """One data file of the events table as a checkpoint saw it."""

    path: str
    size: int
    sha256: str
    min_seq: int
    max_seq: int


class Statement(msgspec.Struct, frozen=True, kw_only=True):
    """Exactly what a checkpoint's signature covers; a digest carries all of it."""

    format: str = STATEMENT_FORMAT
    table_id: str
    seq: int
    hash: str
    ts_us: int
    delta_version: int
    prev_seq: int
    files_sha256: str
    rows_sha256: str
    public_key: str

    def message(self) -> bytes:
        return msgspec.json.encode(self)


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True):
    """One row of the ``checkpoints`` table."""

    statement: Statement
    signature: str
    reason: str
    files: tuple[DataFile, ...] = ()
    row_hashes: bytes = b""
    #: Whether ``files`` and ``row_hashes`` were read (a listing of heads leaves them out).
    details: bool = True

    @property
    def seq(self) -> int:
        return self.statement.seq

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.statement.public_key)

    def signature_valid(self) -> bool:
        """The signature fits the statement, and the file list and row prefixes fit their sha256."""
        st = self.statement
        return (
            signature_valid(st.public_key, st.message(), self.signature)
            and (not self.details or _files_sha256(self.files) == st.files_sha256)
            and (not self.details or hashlib.sha256(self.row_hashes).hexdigest() == st.rows_sha256)
        )

    def anchors(self) -> list[str]:
        """Hex prefixes of the row hashes of seq prev_seq+1 .. seq, in order."""
        hexed = self.row_hashes.hex()
        n = PREFIX_BYTES * 2
        return [hexed[i : i + n] for i in range(0, len(hexed), n)]


def _files_sha256(files: Iterable[DataFile]) -> str:
    return hashlib.sha256(msgspec.json.encode(list(files))).hexdigest()


def row_prefixes(hashes: Iterable[str]) -> bytes:
    """The row anchors of ``hashes`` (hex row hashes, in seq order)."""
    return bytes.fromhex("".join(h[: PREFIX_BYTES * 2] for h in hashes))


def sign_checkpoint(
    signer: Signer,
    *,
    table_id: str,
    seq: int,
    head: str,
    delta_version: int,
    prev_seq: int,
    files: list[DataFile],
    row_hashes: bytes,
    reason: str,
) -> Checkpoint:
    statement = Statement(
        table_id=table_id,
        seq=seq,
        hash=head,
        ts_us=int(datetime.now(UTC).timestamp() * 1_000_000),
        delta_version=delta_version,
        prev_seq=prev_seq,
        files_sha256=_files_sha256(files),
        rows_sha256=hashlib.sha256(row_hashes).hexdigest(),
        public_key=signer.public_key,
    )
    return Checkpoint(
        statement=statement,
        signature=signer.sign(statement.message()),
        reason=reason,
        files=tuple(files),
        row_hashes=row_hashes,
    )


def table_data_files(dt: DeltaTable) -> list[tuple[str, int, int, int]]:
    """``(path, size, min_seq, max_seq)`` of every file the Delta log lists, by first seq."""
    adds = pa.table(dt.get_add_actions(flatten=True))
    if adds.num_rows == 0:
        return []
    names = adds.column_names
    if "min.seq" not in names or adds.column("min.seq").null_count:
        raise ValueError("a data file of the events table has no seq statistics")
    rows = zip(
        adds.column("path").to_pylist(),
        adds.column("size_bytes").to_pylist(),
        adds.column("min.seq").to_pylist(),
        adds.column("max.seq").to_pylist(),
        strict=True,
    )
    return sorted(((str(p), int(s), int(lo), int(hi)) for p, s, lo, hi in rows), key=lambda f: (f[2], f[0]))


class FileHasher:
    """sha256 and real size of the events table's data files, read from storage.

    Delta never rewrites a file under the same name, so the writer's
    checkpointer caches by path; a start-up check uses a fresh one.
    ``known``: the signed list of files hashed before (``storage.file_hashes``);
    a local file whose identity is still the one recorded there is not read
    again. Local files also keep the identity they had when they were hashed
    (:meth:`identity_of`), for the next list.
    """

    def __init__(
        self,
        events_uri: str,
        storage_options: dict[str, str] | None = None,
        *,
        cache: bool = False,
        known: Mapping[str, KnownFile] | None = None,
    ) -> None:
        self.uri = events_uri
        self._local = is_local(events_uri)
        self._root = events_uri.removeprefix("file://")
        self._fs = None if self._local else pafs.PyFileSystem(DeltaStorageHandler(events_uri, storage_options))
        self._cache: dict[str, tuple[int, str]] | None = {} if cache else None
        self._known = known if self._local and known else {}
        self._identities: dict[str, Identity] = {}
        self._started: dict[str, Future[tuple[int, str]]] = {}
        self._started_lock = threading.Lock()
        #: Files taken from ``known`` (unchanged since hashed) and files read and hashed.
        self.reused = 0
        self.hashed = 0

    def prefetch(self, paths: Iterable[str], workers: int = 2) -> None:
        """Start reading and hashing ``paths`` in the background; :meth:`size_and_sha256` of one waits for it.

        The runtime starts this before it opens the log, so the start-up
        check finds the signed files hashed or being hashed. hashlib
        releases the GIL, so this runs beside the Python work of the start.
        """
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prehash")
        with self._started_lock:
            for path in paths:
                if path not in self._started:
                    self._started[path] = pool.submit(self._measure, path)
        pool.shutdown(wait=False)

    def size_and_sha256(self, path: str) -> tuple[int, str]:
        """Raises FileNotFoundError if the file is gone."""
        if self._cache is not None and path in self._cache:
            return self._cache[path]
        with self._started_lock:
            started = self._started.get(path)
        result = started.result() if started is not None else self._measure(path)
        if self._cache is not None:
            self._cache[path] = result
        return result

    def identity_of(self, path: str) -> Identity | None:
        """The identity ``path`` had when it was hashed here (or when the known list recorded it); None: unknown."""
        with self._started_lock:
            return self._identities.get(path)

    def _measure(self, path: str) -> tuple[int, str]:
        if self._local:
            full = os.path.join(self._root, path)
            known = self._known.get(path)
            if known is not None and telling(known.identity) and identity(os.stat(full)) == known.identity:
                with self._started_lock:
                    self._identities[path] = known.identity
                    self.reused += 1
                return known.size, known.sha256
            size, sha, ident = measure_local(full)
            with self._started_lock:
                if ident is not None:
                    self._identities[path] = ident
                self.hashed += 1
            return size, sha
        assert self._fs is not None
        digest = hashlib.sha256()
        size = 0
        with self._fs.open_input_stream(path) as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
        with self._started_lock:
            self.hashed += 1
        return size, digest.hexdigest()

    def describe(self, files: list[tuple[str, int, int, int]]) -> list[DataFile]:
        out = []
        for path, _size, lo, hi in files:
            size, sha = self.size_and_sha256(path)
            out.append(DataFile(path=path, size=size, sha256=sha, min_seq=lo, max_seq=hi))
        return out

    def forget_except(self, paths: Iterable[str]) -> None:
        """Drop cached files the table no longer lists (compaction replaced them)."""
        keep = set(paths)
        if self._cache is not None:
            self._cache = {p: v for p, v in self._cache.items() if p in keep}
        with self._started_lock:
            self._identities = {p: v for p, v in self._identities.items() if p in keep}


_FILES = msgspec.json.Decoder(tuple[DataFile, ...])


def _files_reaching_highest_seq(dt: DeltaTable) -> list[str] | None:
    """Paths of the files whose ``seq`` statistics reach the table's highest seq; None: some file has none."""
    adds = pa.table(dt.get_add_actions(flatten=True))
    if adds.num_rows == 0:
        return []
    if "max.seq" not in adds.column_names or adds.column("max.seq").null_count:
        return None
    highest = pc.max(adds.column("max.seq"))
    return adds.filter(pc.equal(adds.column("max.seq"), highest)).column("path").to_pylist()


class CheckpointsUnreadable(ValueError):
    """The ``checkpoints`` table exists but cannot be read; the message is one line."""


class CheckpointStore:
    """Append-only ``<data dir>/checkpoints``; each append is durable (fsynced) before it returns."""

    def __init__(self, data_dir: str, storage_options: dict[str, str] | None = None) -> None:
        self.data_dir = str(data_dir)
        self.uri = table_uri(self.data_dir, "checkpoints")
        self.storage_options = storage_options
        self._lock = threading.Lock()

    def exists(self) -> bool:
        return table_exists(self.uri, self.storage_options)

    def append(self, checkpoint: Checkpoint) -> None:
        st = checkpoint.statement
        row = pa.Table.from_pylist(
            [
                {
                    "seq": st.seq,
                    "ts": datetime.fromtimestamp(st.ts_us / 1_000_000, UTC),
                    "hash": st.hash,
                    "delta_version": st.delta_version,
                    "prev_seq": st.prev_seq,
                    "table_id": st.table_id,
                    "files": msgspec.json.encode(list(checkpoint.files)).decode(),
                    "files_sha256": st.files_sha256,
                    "row_hashes": checkpoint.row_hashes,
                    "rows_sha256": st.rows_sha256,
                    "public_key": st.public_key,
                    "key_fingerprint": fingerprint(st.public_key),
                    "signature": checkpoint.signature,
                    "reason": checkpoint.reason,
                    "format": st.format,
                }
            ],
            schema=CHECKPOINTS_SCHEMA,
        )
        # the ts column is microseconds; the statement's ts_us is what was signed, keep them equal
        row = row.set_column(1, "ts", pa.array([st.ts_us], pa.int64()).cast(pa.timestamp("us", tz="UTC")))
        with self._lock:
            write_deltalake(self.uri, row, mode="append", storage_options=self.storage_options)
            if is_local(self.uri):  # on disk before a start may rely on it and skip re-hashing what it covers
                dt = DeltaTable(self.uri)
                version = dt.version()
                (sync_new_table if version == 0 else sync_commit)(self.uri, version)
                keep_opens_cheap(dt)  # a commit a checkpoint: every start opens this table

    def read(self, *, with_details: bool = True, seq: int | None = None) -> list[Checkpoint]:
        """Every checkpoint (or those at ``seq``), oldest first; without details: no files, no row prefixes.

        A table that cannot be read raises :class:`CheckpointsUnreadable` (one line): the data directory
        was damaged or tampered with, and every caller reports it as such.
        """
        if not self.exists():
            return []
        try:
            return self._read(open_table(self.uri, self.storage_options), with_details, seq)
        except Exception as exc:  # noqa: BLE001 - Delta, Arrow and OS errors alike
            raise self._unreadable(exc) from None

    def _unreadable(self, exc: Exception) -> CheckpointsUnreadable:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return CheckpointsUnreadable(f"the checkpoints table {self.uri} cannot be read: {first}")

    def _read(
        self, dt: DeltaTable, with_details: bool, seq: int | None, paths: list[str] | None = None
    ) -> list[Checkpoint]:
        columns = None if with_details else [n for n in CHECKPOINTS_SCHEMA.names if n not in ("files", "row_hashes")]
        expr = None if seq is None else pc.field("seq") == seq
        table = plain_dataset(dt, paths).to_table(columns=columns, filter=expr)
        table = table.set_column(table.schema.get_field_index("ts"), "ts", table.column("ts").cast(pa.int64()))
        out = [self._from_row(row, with_details) for row in table.to_pylist()]
        out.sort(key=lambda c: (c.seq, c.statement.ts_us))
        return out

    def newest(self) -> Checkpoint | None:
        """The checkpoint with the highest seq (the newer of two at one seq), with its file list.

        Only the files whose Delta statistics reach the highest seq are read
        (one of a table's one-row files, where reading them all cost
        0.04-0.1 s of a start): a file without
        statistics makes it read every file. Statistics that lied could only
        make this an older checkpoint, which a start-up check still proves
        (the rows after it are re-hashed).
        """
        if not self.exists():
            return None
        try:
            dt = open_table(self.uri, self.storage_options)
            rows = self._read(dt, True, None, _files_reaching_highest_seq(dt))
        except Exception as exc:  # noqa: BLE001 - as in read()
            raise self._unreadable(exc) from None
        return rows[-1] if rows else None

    @staticmethod
    def _from_row(row: dict[str, object], with_details: bool) -> Checkpoint:
        statement = Statement(
            format=str(row["format"]),
            table_id=str(row["table_id"]),
            seq=int(row["seq"]),  # type: ignore[call-overload]
            hash=str(row["hash"]),
            ts_us=int(row["ts"]),  # type: ignore[call-overload]
            delta_version=int(row["delta_version"]),  # type: ignore[call-overload]
            prev_seq=int(row["prev_seq"]),  # type: ignore[call-overload]
            files_sha256=str(row["files_sha256"]),
            rows_sha256=str(row["rows_sha256"]),
            public_key=str(row["public_key"]),
        )
        files: tuple[DataFile, ...] = ()
        row_hashes = b""
        if with_details:
            try:
                files = _FILES.decode(str(row["files"]))
            except msgspec.DecodeError:
                files = ()  # signature_valid fails it: no list of files has the signed sha256 of ()
            row_hashes = bytes(row["row_hashes"])  # type: ignore[arg-type]
        return Checkpoint(
            statement=statement, signature=str(row["signature"]), reason=str(row["reason"]), files=files,
            row_hashes=row_hashes, details=with_details,
        )
