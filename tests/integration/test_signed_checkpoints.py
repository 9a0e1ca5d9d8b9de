"""Signed checkpoints against an insider: digest, verify --digest, verify, and the start-up check.

The insider here can write the data directory with any Delta engine and
has this repository (so ``storage.hashing.row_hash``), but not the signing
key, which lives outside the data directory. Every command runs as a user
runs it: ``python runtime.py ...`` in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from events.log import RuntimeStarted
from storage.attest import verify_start
from storage.checkpointer import Checkpointer
from storage.checkpoints import CheckpointStore, CheckpointsUnreadable, DataFile, FileHasher, sign_checkpoint
from storage.event_log import EventLog
from storage.hashing import GENESIS_HASH, row_hash
from storage.signing import Signer, load_signer
from storage.tables import EVENTS_SCHEMA, LogConfig
from storage.verify import verify_log

ROOT = Path(__file__).resolve().parents[2]
EVENTS = 600


@dataclass(frozen=True)
class SignedLog:
    data: Path
    key: Path


def cli(*args: str, key: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python runtime.py ...`` with the signing key at ``key`` (and ``env`` added)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLOTWISE_")}
    full_env["SLOTWISE_AUDIT_SIGNING_KEY"] = str(key)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(ROOT / "runtime.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=full_env,
    )


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> SignedLog:
    """600 events written by the real writer with its signing thread: a checkpoint every 100, one at close."""
    root = tmp_path_factory.mktemp("signed")
    key = root / "key" / "signing.key"
    data = root / "data"
    log = EventLog.open(data, config=LogConfig(flush_ms=2.0, maintenance=False))
    Checkpointer(log, load_signer(key, create=True), every=100).start()
    for i in range(EVENTS):
        log.append(RuntimeStarted(writer_id="w", pid=i, host="h", mode="run", max_lines=100), stream="runtime", key="runtime")
        if i % 25 == 24:
            log.flush()
    log.close()
    return SignedLog(data, key)


@pytest.fixture
def signed(original: SignedLog, tmp_path: Path) -> SignedLog:
    """A copy the test may tamper with."""
    data = tmp_path / "data"
    shutil.copytree(original.data, data)
    return SignedLog(data, original.key)


def take_digest(log: SignedLog, tmp_path: Path) -> Path:
    result = cli("digest", "--data-dir", str(log.data), key=log.key)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "digest.json"
    path.write_text(result.stdout)
    return path


def rewrite_with_recomputed_chain(data: Path, seq: int) -> None:
    """The insider's edit: change event ``seq`` and recompute every hash from there with the project's own row_hash."""
    uri = str(data / "events")
    dt = DeltaTable(uri)
    table = dt.to_pyarrow_table().sort_by("seq")
    rows = table.to_pylist()
    ts_us = table.column("ts").cast(pa.int64()).to_pylist()
    prev = GENESIS_HASH if seq == 1 else rows[seq - 2]["hash"]
    for i in range(seq - 1, len(rows)):
        row = rows[i]
        if row["seq"] == seq:
            row["payload"] = row["payload"].replace('"max_lines":100', '"max_lines":999')
        row["hash"] = prev = row_hash(
            prev, row["seq"], ts_us[i], row["type"], row["stream"], row["key"], row["v"], row["payload"].encode()
        )
    dt.alter.set_table_properties({"delta.appendOnly": "false"})
    write_deltalake(uri, pa.Table.from_pylist(rows, schema=EVENTS_SCHEMA), mode="overwrite")
    assert verify_log(uri).ok  # the chain alone no longer shows anything


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    """The refusal: exactly one line, no traceback."""
    out = (result.stdout + result.stderr).strip()
    assert "Traceback" not in out, out
    assert len(out.splitlines()) == 1, out
    return out


# ---------------------------------------------------------------------- digest and verify --digest


def test_digest_is_one_json_object_that_verify_accepts(signed: SignedLog, tmp_path: Path) -> None:
    path = take_digest(signed, tmp_path)
    digest = json.loads(path.read_text())
    assert digest["seq"] == EVENTS
    assert {"hash", "time", "key_fingerprint", "signature", "public_key"} <= set(digest)
    result = cli("verify", "--data-dir", str(signed.data), "--digest", str(path), key=signed.key)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"seq {EVENTS}" in result.stdout


def test_rewrite_with_recomputed_chain_is_named_by_verify_digest(signed: SignedLog, tmp_path: Path) -> None:
    path = take_digest(signed, tmp_path)
    rewrite_with_recomputed_chain(signed.data, 150)
    result = cli("verify", "--data-dir", str(signed.data), "--digest", str(path), key=signed.key)
    assert result.returncode == 1
    assert one_line(result).startswith("BROKEN at seq 150: seq 150 is not the row")


def test_rewrite_with_the_checkpoints_deleted_too_is_still_caught(signed: SignedLog, tmp_path: Path) -> None:
    path = take_digest(signed, tmp_path)
    rewrite_with_recomputed_chain(signed.data, 150)
    shutil.rmtree(signed.data / "checkpoints")
    assert cli("verify", "--data-dir", str(signed.data), key=signed.key).returncode == 0  # nothing left inside to say so
    result = cli("verify", "--data-dir", str(signed.data), "--digest", str(path), key=signed.key)
    assert result.returncode == 1
    assert f"history at or before seq {EVENTS} was rewritten" in one_line(result)


def test_tail_truncation_is_caught(signed: SignedLog, tmp_path: Path) -> None:
    path = take_digest(signed, tmp_path)
    events = DeltaTable(str(signed.data / "events"))
    events.alter.set_table_properties({"delta.appendOnly": "false"})
    events.delete("seq > 540")
    DeltaTable(str(signed.data / "checkpoints")).delete("seq > 540")  # and the checkpoints that would tell
    result = cli("verify", "--data-dir", str(signed.data), "--digest", str(path), key=signed.key)
    assert result.returncode == 1
    assert one_line(result) == f"BROKEN at seq 541: truncated: the log ends at seq 540, before the digest's head at seq {EVENTS}"


def test_truncation_is_caught_by_verify_while_the_checkpoints_remain(signed: SignedLog) -> None:
    events = DeltaTable(str(signed.data / "events"))
    events.alter.set_table_properties({"delta.appendOnly": "false"})
    events.delete("seq > 540")
    result = cli("verify", "--data-dir", str(signed.data), key=signed.key)
    assert result.returncode == 1
    assert one_line(result).startswith("BROKEN at seq 541: truncated: the log ends at seq 540")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot be read"),
        ("not json", "is not JSON"),
        ('{"seq": 1}', "is not a Slotwise digest"),
    ],
)
def test_a_bad_digest_file_is_one_line(signed: SignedLog, tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "digest.json"
    if content is not None:
        path.write_text(content)
    result = cli("verify", "--data-dir", str(signed.data), "--digest", str(path), key=signed.key)
    assert result.returncode == 1
    assert message in one_line(result)


def test_an_altered_digest_is_refused(signed: SignedLog, tmp_path: Path) -> None:
    path = take_digest(signed, tmp_path)
    digest = json.loads(path.read_text())
    digest["seq"] -= 1  # an auditor's copy changed after the fact
    path.write_text(json.dumps(digest))
    result = cli("verify", "--data-dir", str(signed.data), "--digest", str(path), key=signed.key)
    assert result.returncode == 1
    assert "the digest's signature does not verify" in one_line(result)


# ---------------------------------------------------------------------- forged checkpoints


def forge(data: Path, signer: Signer, *, tamper_signature: bool = False) -> None:
    """After a rewrite, the insider signs a checkpoint of the new head with a key of their own."""
    newest = CheckpointStore(str(data)).newest()
    assert newest is not None
    dt = DeltaTable(str(data / "events"))
    head = dt.to_pyarrow_table(filters=[("seq", "=", EVENTS)]).column("hash")[0].as_py()
    files = [DataFile(path=f.path, size=f.size, sha256=f.sha256, min_seq=f.min_seq, max_seq=f.max_seq) for f in newest.files]
    forged = sign_checkpoint(
        signer, table_id=dt.metadata().id, seq=EVENTS, head=head, delta_version=dt.version(), prev_seq=newest.statement.prev_seq,
        files=files, row_hashes=newest.row_hashes, reason="stop",
    )
    if tamper_signature:
        forged = type(forged)(statement=forged.statement, signature="00" * 64, reason="stop", files=forged.files, row_hashes=forged.row_hashes)
    CheckpointStore(str(data)).append(forged)


def test_a_checkpoint_signed_with_another_key_is_caught(signed: SignedLog, tmp_path: Path) -> None:
    forge(signed.data, load_signer(tmp_path / "insider.key", create=True))
    result = cli("verify", "--data-dir", str(signed.data), key=signed.key)
    assert result.returncode == 1
    assert one_line(result).startswith(f"BROKEN at seq {EVENTS}: the checkpoint at seq {EVENTS} is signed by key")
    assert "not a trusted key" in result.stdout


def test_a_rewrite_under_a_forged_checkpoint_does_not_start(signed: SignedLog, tmp_path: Path) -> None:
    """The insider's aim: a fast start that trusts their checkpoint instead of re-reading the rewritten chain."""
    rewrite_with_recomputed_chain(signed.data, 150)
    forge(signed.data, load_signer(tmp_path / "insider.key", create=True))
    run = cli("run", "--demo", "--duration", "1", "--data-dir", str(signed.data), key=signed.key)
    assert run.returncode == 1
    assert "is signed by key" in run.stderr
    assert "not a trusted key" in run.stderr
    assert "Traceback" not in run.stderr
    result = cli("verify", "--data-dir", str(signed.data), key=signed.key)
    assert one_line(result).startswith("BROKEN at seq 150: seq 150 is not the row")


def test_a_refused_start_writes_nothing_to_the_rewritten_table(signed: SignedLog) -> None:
    """Not even the table settings the log keeps (the insider turned delta.appendOnly off): only a passed check writes."""
    rewrite_with_recomputed_chain(signed.data, 150)
    before = events_version(signed.data)
    run = cli("run", "--demo", "--duration", "1", "--data-dir", str(signed.data), key=signed.key)
    assert run.returncode == 1
    assert "seq 150 is not the row" in run.stderr
    events = DeltaTable(str(signed.data / "events"))
    assert events.version() == before
    assert events.metadata().configuration["delta.appendOnly"] == "false"  # as the insider left it


def test_a_checkpoint_with_a_bad_signature_is_caught_at_start(signed: SignedLog) -> None:
    forge(signed.data, load_signer(signed.key), tamper_signature=True)
    run = cli("run", "--demo", "--duration", "1", "--data-dir", str(signed.data), key=signed.key)
    assert run.returncode == 1
    assert "signature that does not verify" in run.stderr


# ---------------------------------------------------------------------- the signing key


def events_version(data: Path) -> int:
    return DeltaTable(str(data / "events")).version()


def refused_run(signed: SignedLog, key: Path) -> str:
    before = (events_version(signed.data), len(CheckpointStore(str(signed.data)).read()))
    run = cli("run", "--demo", "--duration", "1", "--data-dir", str(signed.data), "--log-level", "WARNING", key=key)
    assert run.returncode == 1
    assert (events_version(signed.data), len(CheckpointStore(str(signed.data)).read())) == before  # nothing changed
    return one_line(run)


def test_a_missing_key_is_refused_once_the_log_is_signed(signed: SignedLog, tmp_path: Path) -> None:
    key = tmp_path / "nowhere" / "signing.key"
    assert "does not exist" in refused_run(signed, key)
    assert not key.exists()  # never silently replaced by a new key


def test_a_key_of_the_wrong_type_is_refused(signed: SignedLog, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = tmp_path / "ec.key"
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key.write_bytes(pem)
    key.chmod(0o600)
    assert "is a EC key, not Ed25519" in refused_run(signed, key)


def test_a_key_that_is_not_a_key_is_refused(signed: SignedLog, tmp_path: Path) -> None:
    key = tmp_path / "junk.key"
    key.write_text("hello\n")
    key.chmod(0o600)
    assert "is not a PEM private key" in refused_run(signed, key)


def test_an_unreadable_key_path_is_refused(signed: SignedLog, tmp_path: Path) -> None:
    key = tmp_path / "a-directory.key"
    key.mkdir()
    assert "is not a regular file" in refused_run(signed, key)


def test_a_world_readable_key_is_refused(signed: SignedLog, tmp_path: Path) -> None:
    key = tmp_path / "signing.key"
    shutil.copy(signed.key, key)
    key.chmod(0o644)
    assert "readable by others (mode 0644): run chmod 600" in refused_run(signed, key)


def test_verify_needs_the_key_once_the_log_is_signed(signed: SignedLog, tmp_path: Path) -> None:
    result = cli("verify", "--data-dir", str(signed.data), key=tmp_path / "missing.key")
    assert result.returncode == 1
    assert "needed to check the signed checkpoints" in one_line(result)


# ---------------------------------------------------------------------- rotation, compaction


def test_after_a_rotation_old_checkpoints_verify_with_the_old_public_key(signed: SignedLog, tmp_path: Path) -> None:
    new_key = tmp_path / "new" / "signing.key"
    load_signer(new_key, create=True)
    untrusted = cli("verify", "--data-dir", str(signed.data), key=new_key)
    assert untrusted.returncode == 1
    assert "not a trusted key" in one_line(untrusted)
    old_public = load_signer(signed.key).public_key
    env = {"SLOTWISE_AUDIT_TRUSTED_KEYS": json.dumps([old_public])}
    rotated = cli("verify", "--data-dir", str(signed.data), key=new_key, env=env)
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    run = cli("run", "--demo", "--duration", "0.5", "--data-dir", str(signed.data), "--log-level", "INFO", key=new_key, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"start-up verified from the signed checkpoint at seq {EVENTS}" in run.stderr
    newest = CheckpointStore(str(signed.data)).newest()
    assert newest is not None
    assert newest.statement.public_key == load_signer(new_key).public_key  # signed with the new key from now on
    assert cli("verify", "--data-dir", str(signed.data), key=new_key, env=env).returncode == 0


def test_files_compacted_after_the_newest_checkpoint_mean_one_full_check_not_a_refusal(signed: SignedLog) -> None:
    """Maintenance may compact after the last checkpoint when a run ends in a crash: that is no tampering."""
    DeltaTable(str(signed.data / "events")).optimize.compact()
    run = cli("run", "--demo", "--duration", "0.5", "--data-dir", str(signed.data), "--log-level", "INFO", key=signed.key)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"start-up verified the whole chain (the data files are not those the checkpoint at seq {EVENTS} lists" in run.stderr
    again = cli("run", "--demo", "--duration", "0.5", "--data-dir", str(signed.data), "--log-level", "INFO", key=signed.key)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "start-up verified from the signed checkpoint at seq" in again.stderr


def test_the_signer_never_signs_a_chain_it_has_not_seen_intact(signed: SignedLog) -> None:
    """Start-up verification off, checkpoints gone, a row edited: the run goes on, but nothing is signed."""
    shutil.rmtree(signed.data / "checkpoints")
    uri = str(signed.data / "events")
    rows = DeltaTable(uri).to_pyarrow_table().sort_by("seq").to_pylist()
    rows[149]["payload"] = rows[149]["payload"].replace('"max_lines":100', '"max_lines":999')  # seq 150, hash kept
    DeltaTable(uri).alter.set_table_properties({"delta.appendOnly": "false"})
    write_deltalake(uri, pa.Table.from_pylist(rows, schema=EVENTS_SCHEMA), mode="overwrite")
    env = {"SLOTWISE_RUNTIME_VERIFY_ON_START": "false"}
    run = cli("run", "--demo", "--duration", "0.5", "--data-dir", str(signed.data), key=signed.key, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "the hash chain does not hold at seq 150" in run.stderr
    assert CheckpointStore(str(signed.data)).read() == []


def test_rows_after_the_newest_checkpoint_are_rehashed_at_start(signed: SignedLog) -> None:
    """A run that ended without a checkpoint (a crash) left rows after it: those the start re-hashes."""
    import pyarrow.parquet as pq

    log = EventLog.open(signed.data, config=LogConfig(flush_ms=2.0, maintenance=False))
    for i in range(50):  # no signing thread: as if the run had been killed before its next checkpoint
        log.append(RuntimeStarted(writer_id="w", pid=i, host="h", mode="run", max_lines=100), stream="runtime", key="runtime")
        if i == 24:
            log.flush()  # two commits: the edited file is not the one holding the last seq, which opening reads
    log.close()
    events = DeltaTable(str(signed.data / "events"))
    adds = pa.table(events.get_add_actions(flatten=True)).to_pylist()
    tail = min((a for a in adds if a["min.seq"] > EVENTS), key=lambda a: a["min.seq"])
    path = signed.data / "events" / tail["path"]
    table = pq.read_table(path)
    payloads = table.column("payload").to_pylist()
    payloads[0] = payloads[0].replace('"max_lines":100', '"max_lines":999')
    pq.write_table(table.set_column(table.schema.get_field_index("payload"), "payload", pa.array(payloads, pa.string())), path)
    run = cli("run", "--demo", "--duration", "0.5", "--data-dir", str(signed.data), key=signed.key)
    assert run.returncode == 1
    assert f"the event log is broken at seq {tail['min.seq']}: hash chain broken" in run.stderr


def test_an_unreadable_checkpoints_table_is_one_line_and_refuses_the_start(signed: SignedLog) -> None:
    for part in (signed.data / "checkpoints").glob("*.parquet"):
        part.unlink()
    result = cli("verify", "--data-dir", str(signed.data), key=signed.key)
    assert result.returncode == 1
    assert one_line(result).startswith("BROKEN: the checkpoints table")
    digest = cli("digest", "--data-dir", str(signed.data), key=signed.key)
    assert digest.returncode == 1
    assert "cannot be read" in one_line(digest)
    run = cli("run", "--demo", "--duration", "0.5", "--data-dir", str(signed.data), key=signed.key)
    assert run.returncode == 1
    assert "the event log is broken: the checkpoints table" in run.stderr
    assert "Traceback" not in run.stderr


def test_the_newest_checkpoint_is_read_from_the_files_that_reach_its_seq(signed: SignedLog) -> None:
    """A start reads the newest checkpoint from its own file, not from every checkpoint's."""
    store = CheckpointStore(str(signed.data))
    everything = store.read()
    assert len(everything) >= 3
    adds = pa.table(DeltaTable(str(signed.data / "checkpoints")).get_add_actions(flatten=True)).to_pylist()
    older = [a["path"] for a in adds if a["max.seq"] < everything[-1].seq]
    for path in older:  # unreadable now: only a read that skips them still works
        (signed.data / "checkpoints" / path).write_bytes(b"not parquet")
    with pytest.raises(CheckpointsUnreadable):
        store.read()
    newest = store.newest()
    assert newest == everything[-1]
    assert newest is not None
    assert newest.files
    assert newest.signature_valid()


def test_of_two_checkpoints_at_one_seq_the_later_is_the_newest(signed: SignedLog) -> None:
    before = CheckpointStore(str(signed.data)).newest()
    assert before is not None
    assert before.seq == EVENTS
    forge(signed.data, load_signer(signed.key))  # signed again at the same seq, later
    newest = CheckpointStore(str(signed.data)).newest()
    assert newest is not None
    assert newest.seq == EVENTS
    assert newest.statement.ts_us > before.statement.ts_us


def test_the_signer_goes_on_from_the_checkpoint_the_start_up_check_began_from(
    signed: SignedLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start-up check reads the newest checkpoint under the log's lock; the signer takes it from there."""
    log = EventLog.open(signed.data, config=LogConfig(flush_ms=2.0, maintenance=False))
    report = verify_start(str(signed.data), {load_signer(signed.key).public_key}, events=log.start_view())
    assert report.ok, report
    assert report.method == "checkpoint"
    assert report.checkpoint is not None
    assert report.checkpoint == CheckpointStore(str(signed.data)).newest()
    monkeypatch.setattr(CheckpointStore, "newest", lambda _: pytest.fail("the newest checkpoint was read again"))
    Checkpointer(log, load_signer(signed.key), every=100, newest=report.checkpoint).start()
    monkeypatch.undo()
    log.append(RuntimeStarted(writer_id="w", pid=1, host="h", mode="run", max_lines=100), stream="runtime", key="runtime")
    log.close()
    newest = CheckpointStore(str(signed.data)).newest()
    assert newest is not None
    assert (newest.seq, newest.statement.prev_seq) == (EVENTS + 1, report.checkpoint.seq)
    assert cli("verify", "--data-dir", str(signed.data), key=signed.key).returncode == 0


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, (1 << 20) * 3 + 17])
def test_a_data_file_is_measured_as_sha256_of_all_its_bytes(tmp_path: Path, size: int) -> None:
    """The signer and the start-up check both measure files this way: a shortcut in it would blind both."""
    raw = os.urandom(size)
    (tmp_path / "part.parquet").write_bytes(raw)
    assert FileHasher(str(tmp_path)).size_and_sha256("part.parquet") == (size, hashlib.sha256(raw).hexdigest())


def test_a_signed_checkpoint_is_on_disk_before_it_counts(signed: SignedLog, monkeypatch: pytest.MonkeyPatch) -> None:
    """A start trusts the newest checkpoint instead of re-hashing: its file and commit are fsynced when written."""
    import storage.durability as durability

    synced: list[Path] = []
    real = durability.fsync

    def recording(path: str | os.PathLike[str]) -> None:
        synced.append(Path(path))
        real(path)

    monkeypatch.setattr(durability, "fsync", recording)
    newest = CheckpointStore(str(signed.data)).newest()
    assert newest is not None
    forge(signed.data, load_signer(signed.key))  # a genuine key this time: an ordinary append of a checkpoint
    table = signed.data / "checkpoints"
    version = DeltaTable(str(table)).version()
    commit = table / "_delta_log" / f"{version:020d}.json"
    added = [table / json.loads(line)["add"]["path"] for line in commit.read_text().splitlines() if '"add"' in line]
    assert added
    for path in [*added, table, commit, commit.parent]:
        assert path in synced, f"{path} was not fsynced"
