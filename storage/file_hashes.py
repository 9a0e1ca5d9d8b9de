"""The signed data files' hashes, kept across starts with each file's identity, signed like the checkpoints.

Why: the start-up check compares every data file the newest signed
checkpoint lists with its signed size and sha256
(:func:`storage.attest.verify_start`). On a million-event log that is
220-320 MB to read and hash at every start, growing with the log, and the
thread doing it slowed the interpreter's imports beside it by ~0.2 s. The
checkpointer has those hashes anyway: it hashes each file it signs. So
after each checkpoint it also writes, next to the tables, the list of the
signed files with the identity each file had when it was hashed (device,
inode, size, mtime and ctime in ns), signed with the checkpoints' key. A
start takes a listed file's hash from that list when the file's identity
is still exactly the one recorded, and reads and hashes the others.

Why that still catches a changed file:

* a file rewritten in place gets a new mtime and ctime; one swapped for
  another (a copy, a rename) has another inode and ctime. ``touch`` and
  ``utime`` set mtime back, never ctime: the kernel sets ctime to the
  current time on every change, so faking it means setting the system
  clock to the nanosecond, as root;
* the list is signed (Ed25519, the signing key outside the data directory):
  an insider cannot write an entry for a file they changed. A list that
  does not verify is ignored with a warning, and a missing or damaged one
  only means every file is hashed again;
* the deep check (``verify``, on a schedule) never uses it.

``[audit] hash_cache = false`` turns it off (every start hashes every
signed file, as before). Local data directories only: an object store has
no inode or ctime, and its files are hashed at each start as before.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import msgspec
from loguru import logger

from storage.signing import Signer, signature_valid

__all__ = ["FILE_HASHES_NAME", "FileHashes", "KnownFile", "identity", "load_known", "measure_local", "telling", "write_known"]

#: The list's file in the data directory (beside ``events`` and ``checkpoints``, not inside a Delta table's
#: directory, where a vacuum would delete a file no commit mentions).
FILE_HASHES_NAME = "signed-file-hashes.json"
FORMAT = "slotwise.file-hashes.v1"

#: (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns): what a file is, as the kernel keeps it.
Identity = tuple[int, int, int, int, int]


def identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def measure_local(path: str | os.PathLike[str]) -> tuple[int, str, Identity | None]:
    """Size, sha256 and identity of a local file, read through one buffer; raises FileNotFoundError if it is gone.

    The identity is the one the file had before and after the read (None if
    it changed meanwhile: then the hash may be of neither version, and
    nothing may remember it; None too on a file system that keeps times in
    whole seconds, see :func:`telling`). One reused buffer, unbuffered reads: no new
    bytes object per MB. Not mmap, which would be cheaper still: a file
    truncated under it kills the process (SIGBUS) instead of failing the
    check with a size that differs.
    """
    digest = hashlib.sha256()
    size = 0
    buffer = memoryview(bytearray(1 << 20))
    with open(path, "rb", buffering=0) as f:
        before = identity(os.fstat(f.fileno()))
        while n := f.readinto(buffer):
            digest.update(buffer[:n])
            size += n
        after = identity(os.fstat(f.fileno()))
    return size, digest.hexdigest(), before if before == after and before[2] == size and telling(before) else None


def telling(ident: Identity) -> bool:
    """Whether this identity would change with the file: False when its ctime is a whole second.

    ext4, xfs, btrfs and tmpfs keep nanoseconds, where a ctime on a whole
    second is a one-in-a-billion chance. A file system that keeps whole
    seconds (FAT, some network mounts) would keep the same ctime for a
    change made within the second: such files are never taken from the
    list, only hashed.
    """
    return ident[4] % 1_000_000_000 != 0


class KnownFile(msgspec.Struct, frozen=True, array_like=True):
    """One signed data file: its path in the events table, size, sha256, and identity when it was hashed."""

    path: str
    size: int
    sha256: str
    dev: int
    ino: int
    mtime_ns: int
    ctime_ns: int

    @property
    def identity(self) -> Identity:
        return (self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns)


class _Signed(msgspec.Struct, frozen=True, kw_only=True):
    """What the signature covers, encoded as msgspec JSON with its fields in declaration order."""

    format: str
    table_id: str
    seq: int
    files: tuple[KnownFile, ...]
    public_key: str


class FileHashes(msgspec.Struct, frozen=True, kw_only=True):
    signed: _Signed
    signature: str

    def message(self) -> bytes:
        return msgspec.json.encode(self.signed)


_DECODER = msgspec.json.Decoder(FileHashes)


def write_known(
    data_dir: str, signer: Signer, *, table_id: str, seq: int, files: Iterable[tuple[str, int, str, Identity]]
) -> int:
    """Replace the list with ``files`` (path, size, sha256, identity), signed; returns how many it holds.

    Written to a temporary file and renamed over the old one: a reader sees
    the old list or the new one, never half of one. Not fsynced: it is a
    cache, and a list lost in a crash only costs the next start a re-hash.
    """
    known = tuple(
        KnownFile(path, size, sha, dev=dev, ino=ino, mtime_ns=mtime_ns, ctime_ns=ctime_ns)
        for path, size, sha, (dev, ino, _size, mtime_ns, ctime_ns) in files
    )
    signed = _Signed(format=FORMAT, table_id=table_id, seq=seq, files=known, public_key=signer.public_key)
    body = msgspec.json.encode(FileHashes(signed=signed, signature=signer.sign(msgspec.json.encode(signed))))
    target = _list_path(data_dir)
    scratch = target.with_name(f".{FILE_HASHES_NAME}.tmp")  # one writer: the holder of the data directory's lock
    scratch.write_bytes(body)
    os.replace(scratch, target)
    return len(known)


def _list_path(data_dir: str) -> Path:
    return Path(data_dir.removeprefix("file://")) / FILE_HASHES_NAME


def load_known(data_dir: str, trusted: set[str]) -> Mapping[str, KnownFile]:
    """The signed list's files by path; empty if there is none, or it does not verify with a trusted key (warned)."""
    path = _list_path(data_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        logger.warning("{} cannot be read ({}): every signed data file is hashed at this start", path, exc.strerror)
        return {}
    try:
        hashes = _DECODER.decode(raw)
    except msgspec.DecodeError as exc:
        logger.warning("{} is damaged ({}): every signed data file is hashed at this start", path, exc)
        return {}
    signed = hashes.signed
    if signed.format != FORMAT:
        logger.warning("{} has format {!r}, not {}: every signed data file is hashed at this start", path, signed.format, FORMAT)
        return {}
    if signed.public_key not in trusted:
        # a rotated key: the next checkpoint writes a list under the new one
        logger.info("{} is signed by a key that is not trusted now: every signed data file is hashed at this start", path)
        return {}
    if not signature_valid(signed.public_key, hashes.message(), hashes.signature):
        logger.warning(
            "{} has a signature that does not verify (altered?): it is ignored and every signed data file is hashed",
            path,
        )
        return {}
    return {f.path: f for f in signed.files}
