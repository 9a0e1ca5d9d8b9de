"""The signed list of data files hashed before (storage/file_hashes.py) and the FileHasher that trusts it.

What must hold: a file unchanged since it was hashed is not read again; a
file changed in any way an insider can manage without root and a clock
(rewritten in place, swapped for another, with its size and mtime put
back) is read and hashed again; and a list that is not signed by a trusted
key is not used at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

import storage.checkpoints as checkpoints
from storage.checkpoints import FileHasher
from storage.file_hashes import FILE_HASHES_NAME, identity, load_known, measure_local, telling, write_known
from storage.signing import Signer, load_signer


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return load_signer(tmp_path / "keys" / "signing.key", create=True)


@pytest.fixture
def table(tmp_path: Path) -> Path:
    """A data directory whose events table holds three data files."""
    events = tmp_path / "data" / "events"
    events.mkdir(parents=True)
    for i in range(3):
        (events / f"part-{i}.parquet").write_bytes(os.urandom(300_000 + i))
    return events


def _sign_all(table: Path, signer: Signer) -> dict[str, tuple[int, str]]:
    """Hash every file as a checkpointer does and write the signed list; returns path -> (size, sha256)."""
    hasher = FileHasher(str(table), cache=True)
    measured = {p.name: hasher.size_and_sha256(p.name) for p in sorted(table.iterdir())}
    files = [(name, size, sha, hasher.identity_of(name)) for name, (size, sha) in measured.items()]
    assert all(f[3] is not None for f in files)
    assert write_known(str(table.parent), signer, table_id="t", seq=10, files=files) == 3  # type: ignore[arg-type]
    return measured


def _no_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: object) -> tuple[int, str, None]:
        raise AssertionError(f"{path} was read although it is unchanged since it was hashed")

    monkeypatch.setattr(checkpoints, "measure_local", refuse)


def test_measure_local_gives_the_size_the_sha256_and_the_identity(table: Path) -> None:
    path = table / "part-1.parquet"
    raw = path.read_bytes()
    assert measure_local(path) == (len(raw), hashlib.sha256(raw).hexdigest(), identity(os.stat(path)))


def test_unchanged_files_are_taken_from_the_signed_list_without_a_read(
    table: Path, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    measured = _sign_all(table, signer)
    known = load_known(str(table.parent), {signer.public_key})
    assert set(known) == set(measured)
    _no_reads(monkeypatch)
    hasher = FileHasher(str(table), known=known)
    assert {name: hasher.size_and_sha256(name) for name in measured} == measured
    assert (hasher.reused, hasher.hashed) == (3, 0)
    assert hasher.identity_of("part-0.parquet") == identity(os.stat(table / "part-0.parquet"))  # the next list keeps it


def _put_back(path: Path, st: os.stat_result) -> None:
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_file_rewritten_in_place_with_its_size_and_mtime_put_back_is_hashed_again(table: Path, signer: Signer) -> None:
    measured = _sign_all(table, signer)
    path = table / "part-1.parquet"
    before = path.stat()
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    with open(path, "r+b") as f:  # the same inode, the same size
        f.write(raw)
    _put_back(path, before)
    assert (path.stat().st_ino, path.stat().st_size, path.stat().st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    hasher = FileHasher(str(table), known=load_known(str(table.parent), {signer.public_key}))
    size, sha = hasher.size_and_sha256("part-1.parquet")
    assert (size, sha) == (len(raw), hashlib.sha256(raw).hexdigest())
    assert sha != measured["part-1.parquet"][1]  # what the check then compares with the signed sha256: it differs
    assert (hasher.reused, hasher.hashed) == (0, 1)


def test_a_file_swapped_for_another_of_the_same_size_and_mtime_is_hashed_again(table: Path, signer: Signer) -> None:
    measured = _sign_all(table, signer)
    path = table / "part-2.parquet"
    before = path.stat()
    other = table.parent / "forged.parquet"
    other.write_bytes(os.urandom(before.st_size))
    _put_back(other, before)
    os.replace(other, path)
    _put_back(path, before)
    hasher = FileHasher(str(table), known=load_known(str(table.parent), {signer.public_key}))
    sha = hasher.size_and_sha256("part-2.parquet")[1]
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha != measured["part-2.parquet"][1]
    assert (hasher.reused, hasher.hashed) == (0, 1)


def test_a_list_edited_to_vouch_for_a_changed_file_is_not_used(table: Path, signer: Signer) -> None:
    _sign_all(table, signer)
    path = table / "part-0.parquet"
    path.write_bytes(os.urandom(path.stat().st_size))  # the insider's change ...
    listing = table.parent / FILE_HASHES_NAME
    doc = json.loads(listing.read_text())
    now = identity(path.stat())
    for entry in doc["signed"]["files"]:  # ... and the list edited to the file's new identity and hash
        if entry[0] == "part-0.parquet":
            entry[2] = hashlib.sha256(path.read_bytes()).hexdigest()
            entry[3:] = [now[0], now[1], now[3], now[4]]
    listing.write_text(json.dumps(doc))
    assert load_known(str(table.parent), {signer.public_key}) == {}


def test_a_list_signed_by_a_key_not_trusted_is_not_used(table: Path, signer: Signer, tmp_path: Path) -> None:
    _sign_all(table, signer)
    other = load_signer(tmp_path / "other" / "signing.key", create=True)
    assert load_known(str(table.parent), {other.public_key}) == {}
    assert len(load_known(str(table.parent), {other.public_key, signer.public_key})) == 3  # a retired key still trusted


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"signed": {}, "signature": ""}'])
def test_a_damaged_or_missing_list_means_every_file_is_hashed(table: Path, signer: Signer, content: bytes) -> None:
    assert load_known(str(table.parent), {signer.public_key}) == {}  # none yet
    (table.parent / FILE_HASHES_NAME).write_bytes(content)
    assert load_known(str(table.parent), {signer.public_key}) == {}


def test_a_file_that_is_gone_is_reported_missing_even_if_listed(table: Path, signer: Signer) -> None:
    _sign_all(table, signer)
    (table / "part-0.parquet").unlink()
    hasher = FileHasher(str(table), known=load_known(str(table.parent), {signer.public_key}))
    with pytest.raises(FileNotFoundError):
        hasher.size_and_sha256("part-0.parquet")


def test_identities_in_whole_seconds_are_never_remembered() -> None:
    """A file system that keeps whole seconds would keep a file's ctime through a change made within the second."""
    assert telling((1, 2, 3, 1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    assert not telling((1, 2, 3, 1_700_000_000_000_000_000, 1_700_000_000_000_000_000))


def test_a_listed_identity_in_whole_seconds_is_not_trusted(
    table: Path, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on a file system that keeps whole seconds: the file's identity matches the list, and is still not trusted."""
    path = table / "part-0.parquet"
    size, sha, _ = measure_local(path)
    st = path.stat()
    coarse = (st.st_dev, st.st_ino, size, 1_700_000_000_000_000_000, 1_700_000_000_000_000_000)
    write_known(str(table.parent), signer, table_id="t", seq=1, files=[("part-0.parquet", size, sha, coarse)])
    monkeypatch.setattr(checkpoints, "identity", lambda _st: coarse)  # what os.stat says there
    hasher = FileHasher(str(table), known=load_known(str(table.parent), {signer.public_key}))
    assert hasher.size_and_sha256("part-0.parquet") == (size, sha)
    assert (hasher.reused, hasher.hashed) == (0, 1)
