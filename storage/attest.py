"""What signed checkpoints prove: digests, the checkpoints check of ``verify``, and the start-up check.

Three questions, one module:

* **verify --digest FILE**: does the log still hold the head an auditor
  stored elsewhere? The whole chain is re-hashed; every checkpoint signed by
  the digest's key up to the digest's seq, and the digest itself, are
  compared with the rows (each checkpoint keeps an 8-byte prefix of every
  row hash since the one before), so a rewrite with a recomputed chain is
  named at its first changed seq, and a log that ends early is "truncated".
* **verify**: is every checkpoint in the table signed by a trusted key, and
  does the log still hold every row each one signed?
* **start-up**: the newest checkpoint's signature, its list of data files
  against the Delta log (paths and sizes) and against the files themselves
  (size and sha256), then the chain only from its head on. If the files no
  longer match its list because compaction replaced them after a crash,
  start-up falls back to the full check; a listed file whose bytes changed
  is a broken log.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from storage.checkpoints import (
    Checkpoint,
    CheckpointStore,
    CheckpointsUnreadable,
    DataFile,
    FileHasher,
    Statement,
    table_data_files,
)
from storage.reader import open_table, read_batches, table_exists
from storage.signing import fingerprint, signature_valid
from storage.tables import table_uri
from storage.verify import verify_log

__all__ = [
    "AttestReport",
    "Digest",
    "DigestError",
    "check_checkpoints",
    "digest_of",
    "load_digest",
    "verify_digest",
    "verify_start",
]


class AttestReport(msgspec.Struct, kw_only=True):
    """The verdict; when not ok, the first bad seq known (None: the problem has no seq) and why."""

    ok: bool = True
    first_bad_seq: int | None = None
    problem: str = ""
    checkpoints: int = 0
    events: int = 0
    last_seq: int = 0
    #: How start-up checked: "checkpoint" (files + the tail) or "full" (the whole chain), and why full.
    method: str = "full"
    reason: str = ""
    #: The newest checkpoint, when a start-up check began from it: the signer goes on from it without reading it again.
    checkpoint: Checkpoint | None = None

    def fail(self, seq: int | None, problem: str) -> None:
        """Keep the problem with the lowest seq (the first place history differs)."""
        if self.ok or (seq is not None and (self.first_bad_seq is None or seq < self.first_bad_seq)):
            self.ok, self.first_bad_seq, self.problem = False, seq, problem


class Digest(msgspec.Struct, frozen=True, kw_only=True):
    """The newest signed head, as an auditor stores it: every field the signature covers, and the signature."""

    seq: int
    hash: str
    time: str
    key_fingerprint: str
    signature: str
    public_key: str
    ts_us: int
    table_id: str
    delta_version: int
    prev_seq: int
    files_sha256: str
    rows_sha256: str
    format: str

    def statement(self) -> Statement:
        return Statement(
            format=self.format,
            table_id=self.table_id,
            seq=self.seq,
            hash=self.hash,
            ts_us=self.ts_us,
            delta_version=self.delta_version,
            prev_seq=self.prev_seq,
            files_sha256=self.files_sha256,
            rows_sha256=self.rows_sha256,
            public_key=self.public_key,
        )

    def signature_valid(self) -> bool:
        return fingerprint_ok(self.public_key, self.key_fingerprint) and signature_valid(
            self.public_key, self.statement().message(), self.signature
        )


class DigestError(ValueError):
    """A digest file that cannot be used; one line naming the file."""


def fingerprint_ok(public_key: str, claimed: str) -> bool:
    try:
        return fingerprint(public_key) == claimed
    except ValueError:
        return False


def digest_of(checkpoint: Checkpoint) -> Digest:
    st = checkpoint.statement
    return Digest(
        seq=st.seq,
        hash=st.hash,
        time=datetime.fromtimestamp(st.ts_us / 1_000_000, UTC).isoformat().replace("+00:00", "Z"),
        key_fingerprint=fingerprint(st.public_key),
        signature=checkpoint.signature,
        public_key=st.public_key,
        ts_us=st.ts_us,
        table_id=st.table_id,
        delta_version=st.delta_version,
        prev_seq=st.prev_seq,
        files_sha256=st.files_sha256,
        rows_sha256=st.rows_sha256,
        format=st.format,
    )


def load_digest(path: str) -> Digest:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DigestError(f"digest file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        return msgspec.json.decode(raw, type=Digest)
    except msgspec.ValidationError as exc:
        raise DigestError(f"digest file {path} is not a Slotwise digest: {exc}") from None
    except msgspec.DecodeError as exc:
        raise DigestError(f"digest file {path} is not JSON: {exc}") from None


# ---------------------------------------------------------------------- rows against signed anchors


class _Rows:
    """seq and the 16-hex-digit hash prefix of every row of the events table, in seq order."""

    def __init__(self, uri: str, storage_options: dict[str, str] | None) -> None:
        self.uri, self.storage_options = uri, storage_options
        seq_parts: list[np.ndarray] = []
        prefix_parts: list[pa.Array] = []
        #: False when a file could not be read: rows past it are unknown, not missing (the chain check names it)
        self.complete = False
        with contextlib.suppress(Exception):
            for batch in read_batches(uri, columns=["seq", "hash"], storage_options=storage_options):
                seq_parts.append(batch.column("seq").to_numpy())
                prefix_parts.append(pc.utf8_slice_codeunits(batch.column("hash"), 0, 16))
            self.complete = True
        self.seqs = np.concatenate(seq_parts) if seq_parts else np.empty(0, np.int64)
        self.prefixes = pa.chunked_array(prefix_parts, pa.string()) if prefix_parts else pa.chunked_array([], pa.string())
        self.last_seq = int(self.seqs[-1]) if len(self.seqs) else 0

    def first_mismatch(self, first_seq: int, anchors: list[str]) -> int | None:
        """The first seq of ``first_seq..`` whose row is missing or whose hash prefix is not the anchor."""
        n = len(anchors)
        lo = int(np.searchsorted(self.seqs, first_seq))
        got = self.seqs[lo : lo + n]
        expected = np.arange(first_seq, first_seq + n)
        m = len(got)
        wrong = np.nonzero(got != expected[:m])[0]
        missing = int(expected[wrong[0]]) if len(wrong) else (first_seq + m if m < n else None)
        upto = n if missing is None else missing - first_seq
        if upto:
            same = pc.equal(self.prefixes.slice(lo, upto), pa.array(anchors[:upto], pa.string()))
            idx = pc.index(same, False).as_py()
            if idx >= 0:
                return first_seq + idx
        if missing is not None and missing > self.last_seq and not self.complete:
            return None  # past an unreadable file: unknown, and the chain check reports that file
        return missing

    def full_hash(self, seq: int) -> str | None:
        for batch in read_batches(self.uri, from_seq=seq, to_seq=seq, columns=["hash"], storage_options=self.storage_options):
            if batch.num_rows:
                return str(batch.column("hash")[0].as_py())
        return None


def _compare(report: AttestReport, rows: _Rows, checkpoint: Checkpoint, signed_by: str) -> None:
    st = checkpoint.statement
    anchors = checkpoint.anchors()
    if len(anchors) != st.seq - st.prev_seq:
        report.fail(st.seq, f"the checkpoint at seq {st.seq} is malformed ({len(anchors)} row anchors for {st.seq - st.prev_seq} rows)")
        return
    bad = rows.first_mismatch(st.prev_seq + 1, anchors)
    if bad is None and rows.complete and rows.full_hash(st.seq) != st.hash:
        bad = st.seq
    if bad is None:
        return
    if bad > rows.last_seq:
        report.fail(bad, f"truncated: the log ends at seq {rows.last_seq}, but {signed_by} at seq {st.seq} signed rows up to it")
    else:
        report.fail(bad, f"seq {bad} is not the row {signed_by} at seq {st.seq} signed: history was rewritten from there on (a recomputed hash chain does not hide it)")


def check_checkpoints(data_dir: str, trusted: set[str], storage_options: dict[str, str] | None = None) -> AttestReport:
    """Every checkpoint: a valid signature by a trusted key, of this table, over rows the log still holds."""
    report = AttestReport()
    try:
        checkpoints = CheckpointStore(data_dir, storage_options).read()
    except CheckpointsUnreadable as exc:
        report.fail(None, str(exc))
        return report
    report.checkpoints = len(checkpoints)
    if not checkpoints:
        return report
    uri = table_uri(data_dir, "events")
    if not table_exists(uri, storage_options):
        report.fail(1, "there are signed checkpoints but no events table: the log was removed")
        return report
    table_id = open_table(uri, storage_options).metadata().id
    rows = _Rows(uri, storage_options)
    report.last_seq = rows.last_seq
    for cp in checkpoints:
        st = cp.statement
        if not cp.signature_valid():
            report.fail(st.seq, f"the checkpoint at seq {st.seq} has a signature that does not verify: it was forged or altered")
        elif st.public_key not in trusted:
            report.fail(
                st.seq,
                f"the checkpoint at seq {st.seq} is signed by key {fingerprint(st.public_key)[:16]}, not a trusted key "
                "(this installation's signing key or [audit] trusted_keys): forged, or a rotated key not yet trusted",
            )
        elif st.table_id != table_id:
            report.fail(st.seq, f"the checkpoint at seq {st.seq} was signed for another events table (id {st.table_id})")
        else:
            _compare(report, rows, cp, "the checkpoint")
    return report


def verify_digest(data_dir: str, digest: Digest, storage_options: dict[str, str] | None = None) -> AttestReport:
    """Prove the log still holds ``digest``'s head and every row signed before it (see the module docstring)."""
    report = AttestReport()
    if not digest.signature_valid():
        report.fail(None, "the digest's signature does not verify: the digest file was altered")
        return report
    uri = table_uri(data_dir, "events")
    chain = verify_log(uri, storage_options)
    report.events, report.last_seq = chain.events, chain.last_seq
    if not chain.ok:
        report.fail(chain.first_bad_seq, chain.problem)
    rows = _Rows(uri, storage_options)
    try:
        stored = CheckpointStore(data_dir, storage_options).read()
    except CheckpointsUnreadable as exc:
        report.fail(None, f"{exc} (the digest alone still bounds a rewrite)")
        stored = []
    signed = [
        cp
        for cp in stored
        if cp.statement.public_key == digest.public_key
        and cp.statement.table_id == digest.table_id
        and cp.seq <= digest.seq
        and cp.signature_valid()
    ]
    report.checkpoints = len(signed)
    for cp in signed:
        _compare(report, rows, cp, "the checkpoint")
    if not rows.complete:
        pass  # an unreadable file: the chain check above named it
    elif rows.last_seq < digest.seq:
        report.fail(rows.last_seq + 1, f"truncated: the log ends at seq {rows.last_seq}, before the digest's head at seq {digest.seq}")
    elif rows.full_hash(digest.seq) != digest.hash:
        named = " (no checkpoint signed by the digest's key is left to name the first changed seq)" if report.ok else ""
        report.fail(digest.seq, f"history at or before seq {digest.seq} was rewritten: the log's hash there is not the digest's{named}")
    return report


# ---------------------------------------------------------------------- start-up


def verify_start(
    data_dir: str,
    trusted: set[str],
    storage_options: dict[str, str] | None = None,
    *,
    events: DeltaTable | None = None,
    hasher: FileHasher | None = None,
    newest: Callable[[], Checkpoint | None] | None = None,
) -> AttestReport:
    """The start-up check: from the newest trusted checkpoint when its files are intact, else in full.

    ``events`` is the events table already open (the runtime shares one with
    the actors' recovery: each open re-reads the Delta log); by default it is
    opened here. ``hasher`` may have started hashing the files already
    (:meth:`FileHasher.prefetch`); every listed file is still read and
    compared, only perhaps earlier. ``newest`` reads the newest checkpoint
    (and may raise :class:`CheckpointsUnreadable`): the runtime's prefetch has
    read it already; by default it is read here.
    """
    try:
        checkpoint = newest() if newest is not None else CheckpointStore(data_dir, storage_options).newest()
    except CheckpointsUnreadable as exc:
        report = AttestReport(method="checkpoint")
        report.fail(None, str(exc))
        return report
    if checkpoint is None:
        return _full(data_dir, trusted, storage_options, "no signed checkpoint yet")
    st = checkpoint.statement
    report = AttestReport(method="checkpoint")
    if not checkpoint.signature_valid():
        report.fail(st.seq, f"the newest checkpoint (seq {st.seq}) has a signature that does not verify: it was forged or altered")
        return report
    if st.public_key not in trusted:
        report.fail(
            st.seq,
            f"the newest checkpoint (seq {st.seq}) is signed by key {fingerprint(st.public_key)[:16]}, not a trusted key: "
            "forged, or the signing key was rotated without adding the old public key to [audit] trusted_keys",
        )
        return report
    uri = table_uri(data_dir, "events")
    if not table_exists(uri, storage_options):
        report.fail(1, f"a checkpoint signed seq 1..{st.seq} but there is no events table")
        return report
    dt = open_table(uri, storage_options) if events is None else events
    if dt.metadata().id != st.table_id:
        report.fail(1, "the events table is not the one the checkpoints were signed for (its Delta table id changed)")
        return report
    files = table_data_files(dt)
    last = max((f[3] for f in files), default=0)
    if last < st.seq:
        report.fail(last + 1, f"truncated: the log ends at seq {last}, but a checkpoint signed rows up to seq {st.seq}")
        return report
    listed = {f.path: f for f in checkpoint.files}
    covered = [f for f in files if f[2] <= st.seq]
    if {f[0] for f in covered} != set(listed) or any(f[3] > st.seq or f[1] != listed[f[0]].size for f in covered):
        return _full(data_dir, trusted, storage_options, f"the data files are not those the checkpoint at seq {st.seq} lists (compacted since?)")
    hasher = hasher if hasher is not None else FileHasher(uri, storage_options)
    for f, measured in zip(checkpoint.files, _measure_files(hasher, checkpoint.files), strict=True):
        if measured is None:
            report.fail(f.min_seq, f"data file {f.path} (seq {f.min_seq}..{f.max_seq}), signed at seq {st.seq}, is missing")
            return report
        size, sha = measured
        if (size, sha) != (f.size, f.sha256):
            changed = "size and content" if size != f.size else "content (same size)"
            report.fail(
                f.min_seq,
                f"data file {f.path} (seq {f.min_seq}..{f.max_seq}) is not the file signed at seq {st.seq}: its {changed} changed",
            )
            return report
    report.last_seq, report.checkpoints, report.checkpoint = st.seq, 1, checkpoint
    if last == st.seq:
        return report  # a clean stop signed the head: no row after it to re-hash
    tail = verify_log(uri, storage_options, after=(st.seq, st.hash))
    report.events, report.last_seq = tail.events, tail.last_seq
    if not tail.ok:
        report.fail(tail.first_bad_seq, tail.problem)
    return report


def _measure_files(hasher: FileHasher, files: tuple[DataFile, ...]) -> list[tuple[int, str] | None]:
    """Size and sha256 of each file (None: missing), in order; hashed on all cores (hashlib releases the GIL)."""

    def measure(f: DataFile) -> tuple[int, str] | None:
        try:
            return hasher.size_and_sha256(f.path)
        except FileNotFoundError:
            return None

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(measure, files))


def _full(data_dir: str, trusted: set[str], storage_options: dict[str, str] | None, reason: str) -> AttestReport:
    chain = verify_log(table_uri(data_dir, "events"), storage_options)
    report = check_checkpoints(data_dir, trusted, storage_options)
    report.method, report.reason = "full", reason
    report.events, report.last_seq = chain.events, chain.last_seq
    if not chain.ok:
        report.fail(chain.first_bad_seq, chain.problem)
    return report
