"""The runtime signs its log and restarts from the newest signed checkpoint (issue 13).

The real runtime, as a subprocess: the first start creates the signing key
(owner-only) under the config directory, a clean stop signs the head, the
next start checks that checkpoint's files and re-hashes only what follows,
and a data file swapped for one of the same size refuses the start. A start
reads only the signed files that changed since they were hashed (the signed
list of storage/file_hashes.py); an in-place edit that puts the file's size
and mtime back is still read, and refused.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from deltalake import DeltaTable

from storage.checkpoints import CheckpointStore
from storage.reader import max_seq

ROOT = Path(__file__).resolve().parents[2]


def run(
    data: Path, config_home: Path, duration: str, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python runtime.py run --demo`` to its end, with the key under ``config_home`` (and ``env`` added)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLOTWISE_")}, **(env or {})}
    env["XDG_CONFIG_HOME"] = str(config_home)
    argv = [sys.executable, str(ROOT / "runtime.py"), "run", "--demo", "--duration", duration, "--data-dir", str(data)]
    return subprocess.run(
        [*argv, "--log-level", "INFO", *extra], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False, env=env
    )


@pytest.fixture(scope="module")
def stopped_runtime(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One demo run from an empty data directory and a config directory without a key; stopped cleanly."""
    root = tmp_path_factory.mktemp("restart")
    config_home = root / "config"
    data = root / "data"
    proc = run(data, config_home, "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, config_home


def test_the_first_start_creates_an_owner_only_key(stopped_runtime: tuple[Path, Path]) -> None:
    _, config_home = stopped_runtime
    key = config_home / "slotwise" / "signing.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")


def test_a_clean_stop_signs_the_last_event(stopped_runtime: tuple[Path, Path]) -> None:
    data, _ = stopped_runtime
    newest = CheckpointStore(str(data)).newest()
    assert newest is not None
    assert newest.reason == "stop"
    assert newest.seq == max_seq(DeltaTable(str(data / "events")))


def test_restart_verifies_from_the_signed_checkpoint(stopped_runtime: tuple[Path, Path], tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(stopped_runtime[0], data)
    last = max_seq(DeltaTable(str(data / "events")))
    proc = run(data, stopped_runtime[1], "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a copy: every file has a new inode, so none is taken from the signed list; all are read
    n = len(CheckpointStore(str(data)).newest().files)  # type: ignore[union-attr]
    assert (
        f"start-up verified from the signed checkpoint at seq {last}: its data files (0 unchanged since they were hashed, "
        f"{n} read and hashed), then 0 later events"
    ) in proc.stderr


VERIFIED = re.compile(r"its data files \((\d+) unchanged since they were hashed, (\d+) read and hashed\)")


def test_a_restart_in_place_reads_no_signed_file_again(stopped_runtime: tuple[Path, Path], tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(stopped_runtime[0], data)
    assert run(data, stopped_runtime[1], "0.5").returncode == 0  # the copy's files are hashed once, and listed
    proc = run(data, stopped_runtime[1], "0.5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = VERIFIED.search(proc.stderr)
    assert found is not None, proc.stderr[-3000:]
    assert int(found.group(1)) >= 1
    assert int(found.group(2)) == 0
    off = run(data, stopped_runtime[1], "0.5", env={"SLOTWISE_AUDIT_HASH_CACHE": "false"})  # every file read, as before
    assert off.returncode == 0, off.stderr[-3000:]
    found = VERIFIED.search(off.stderr)
    assert found is not None
    assert int(found.group(1)) == 0
    assert int(found.group(2)) >= 1


def test_a_data_file_edited_in_place_with_its_size_and_mtime_put_back_refuses_the_start(
    stopped_runtime: tuple[Path, Path], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(stopped_runtime[0], data)
    assert run(data, stopped_runtime[1], "0.5").returncode == 0  # the signed list now vouches for these files
    newest = CheckpointStore(str(data)).newest()
    assert newest is not None
    target = newest.files[0]
    path = data / "events" / target.path
    before = path.stat()
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    with open(path, "r+b") as f:  # the same inode and size: only the ctime tells
        f.write(raw)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    proc = run(data, stopped_runtime[1], "0.5")
    assert proc.returncode == 1
    assert f"data file {target.path} (seq {target.min_seq}..{target.max_seq}) is not the file signed at seq {newest.seq}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_data_file_swapped_for_one_of_the_same_size_refuses_the_start(
    stopped_runtime: tuple[Path, Path], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(stopped_runtime[0], data)
    newest = CheckpointStore(str(data)).newest()
    assert newest is not None
    target = newest.files[len(newest.files) // 2]
    path = data / "events" / target.path
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert path.stat().st_size == target.size
    signed = len(CheckpointStore(str(data)).read(with_details=False))
    proc = run(data, stopped_runtime[1], "0.5")
    assert proc.returncode == 1
    assert (
        f"the event log is broken at seq {target.min_seq}: data file {target.path} (seq {target.min_seq}..{target.max_seq}) "
        f"is not the file signed at seq {newest.seq}: its content (same size) changed"
    ) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(CheckpointStore(str(data)).read(with_details=False)) == signed  # the swapped file was never signed
