"""A damaged events table: ``verify`` names the first bad seq, ``run`` refuses, ``--allow-broken-log`` proceeds.

The log is made by a real demo run stopped with SIGTERM (so registry and
queue snapshots cover its end). Then one parquet file in the middle of the
table is damaged in one of two ways:

* truncated to half its size (a torn or lost write): the file cannot be read;
* one row's payload rewritten in an otherwise valid file (an edit): the
  hash chain breaks at that row.

``verify`` exits 1 and names the first bad seq; ``run`` exits 1 at once
with a message that says the chain is broken and how to proceed; ``run
--allow-broken-log`` starts past a broken chain (a forged row appended by a
foreign writer) and stops cleanly, and also past an unreadable old file, since
every actor recovers from its newest snapshot and reads only later events.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

from tests.faults.runtime_proc import ROOT, RUNTIME, RuntimeProcess

EXIT_OK, EXIT_FAILED = 0, 1


@pytest.fixture(scope="module")
def demo_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo log of several commits, stopped cleanly; tests copy it before damaging it.

    Built without table maintenance, which at a clean stop would merge the run's small files into one:
    the tests damage a file in the middle of several.
    """
    data_dir = tmp_path_factory.mktemp("corrupt") / "data"
    data_dir.mkdir()
    proc = RuntimeProcess(data_dir, "--demo", "--duration", "600", name="build", env={"SLOTWISE_LOG_MAINTENANCE": "false"})
    try:
        assert proc.wait_ready(60), proc.stderr()[-3000:]
        with proc.client() as client:
            for n in range(40):  # a few commits of our own, spread over the table
                assert client.call({"type": "registry.add_active", "conid": 6_000_000 + n, "strategy": "c"})["ok"]
        assert proc.terminate(60) == EXIT_OK, proc.stderr()[-3000:]
    finally:
        proc.cleanup()
    return data_dir


def _copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def _middle_file(data_dir: Path) -> tuple[Path, int]:
    """A data file of the events table that is neither the first nor the last, and its first seq."""
    dt = DeltaTable(str(data_dir / "events"))
    adds = pa.table(dt.get_add_actions(flatten=True)).sort_by("min.seq").to_pylist()
    assert len(adds) >= 3, f"only {len(adds)} files: the demo wrote too little"
    add = adds[len(adds) // 2]
    return data_dir / "events" / add["path"], int(add["min.seq"])


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_a_row(path: Path) -> None:
    table = pq.read_table(path)
    payloads = table.column("payload").to_pylist()
    payloads[0] = json.dumps({**json.loads(payloads[0]), "edited": True})
    i = table.schema.get_field_index("payload")
    pq.write_table(table.set_column(i, table.schema.field(i), pa.array(payloads, pa.string())), path)


def _forge_a_row(data_dir: Path) -> int:
    """Append, as a foreign writer would, a copy of the last row with the next seq: readable, but off the chain."""
    uri = str(data_dir / "events")
    table = DeltaTable(uri).to_pyarrow_table().sort_by("seq")
    last = table.slice(table.num_rows - 1)
    seq = last.column("seq")[0].as_py() + 1
    forged = last.set_column(0, last.schema.field(0), pa.array([seq], pa.int64()))
    write_deltalake(uri, forged, mode="append")
    return seq


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RUNTIME), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


DAMAGES = [
    pytest.param(_truncate, "cannot be read", id="truncated"),
    pytest.param(_edit_a_row, "hash chain broken", id="edited"),
]


def _damaged(demo_log: Path, tmp_path: Path, damage: Callable[[Path], None]) -> tuple[Path, int]:
    data_dir = _copy(demo_log, tmp_path / "data")
    assert _cli("verify", "--data-dir", str(data_dir)).returncode == EXIT_OK
    path, first_seq = _middle_file(data_dir)
    damage(path)
    return data_dir, first_seq


@pytest.mark.parametrize(("damage", "what"), DAMAGES)
def test_verify_names_it_and_run_refuses(
    demo_log: Path, tmp_path: Path, damage: Callable[[Path], None], what: str
) -> None:
    data_dir, first_seq = _damaged(demo_log, tmp_path, damage)
    verify = _cli("verify", "--data-dir", str(data_dir))
    assert verify.returncode == EXIT_FAILED, verify.stdout + verify.stderr
    assert f"BROKEN at seq {first_seq}:" in verify.stdout, verify.stdout
    assert what in verify.stdout, verify.stdout

    commits = sorted(p.name for p in (data_dir / "events" / "_delta_log").iterdir())
    refused = _cli("run", "--demo", "--duration", "5", "--data-dir", str(data_dir))
    assert refused.returncode == EXIT_FAILED, refused.stderr[-3000:]
    # not even log.runtime_stopped: an append after the bad seq leaves verify's answer alike, so compare commits
    assert sorted(p.name for p in (data_dir / "events" / "_delta_log").iterdir()) == commits
    assert f"the event log is broken at seq {first_seq}" in refused.stderr, refused.stderr[-3000:]
    assert "--allow-broken-log" in refused.stderr
    assert not (data_dir / "slotwise.sock").exists()
    assert _cli("verify", "--data-dir", str(data_dir)).stdout == verify.stdout  # the refusal wrote nothing




def test_allow_broken_log_proceeds_past_a_broken_chain(demo_log: Path, tmp_path: Path) -> None:
    data_dir = _copy(demo_log, tmp_path / "data")
    bad_seq = _forge_a_row(data_dir)
    refused = _cli("run", "--demo", "--duration", "5", "--data-dir", str(data_dir))
    assert refused.returncode == EXIT_FAILED, refused.stderr[-3000:]
    assert f"the event log is broken at seq {bad_seq}: hash chain broken" in refused.stderr, refused.stderr[-3000:]

    allowed = _cli("run", "--demo", "--duration", "1", "--allow-broken-log", "--data-dir", str(data_dir))
    assert allowed.returncode == EXIT_OK, allowed.stderr[-3000:]
    assert "starting anyway (--allow-broken-log)" in allowed.stderr
    # the damage is still there and still named: nothing papered over it
    again = _cli("verify", "--data-dir", str(data_dir))
    assert again.returncode == EXIT_FAILED
    assert f"BROKEN at seq {bad_seq}: hash chain broken" in again.stdout, again.stdout


def test_allow_broken_log_proceeds_past_an_unreadable_file(demo_log: Path, tmp_path: Path) -> None:
    data_dir, _ = _damaged(demo_log, tmp_path, _truncate)
    allowed = _cli("run", "--demo", "--duration", "1", "--allow-broken-log", "--data-dir", str(data_dir))
    assert allowed.returncode == EXIT_OK, allowed.stderr[-3000:]
    assert _cli("verify", "--data-dir", str(data_dir)).returncode == EXIT_FAILED


@pytest.mark.parametrize("damage", [Path.unlink, lambda path: path.write_bytes(b"")], ids=["deleted", "emptied"])
@pytest.mark.parametrize("command", [["audit"], ["replay", "--seq", "{seq}"]], ids=["audit", "replay"])
def test_reading_a_missing_or_empty_file_is_one_line(
    demo_log: Path, tmp_path: Path, damage: Callable[[Path], None], command: list[str]
) -> None:
    """delta-rs tells these with its chain of causes one a line, each after a coloured arrow: joined, on one."""
    data_dir, first_seq = _damaged(demo_log, tmp_path, damage)
    result = _cli(*(a.format(seq=first_seq) for a in command), "--data-dir", str(data_dir))
    assert result.returncode == EXIT_FAILED, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: the event log cannot be read: "), lines[0]
    assert "\x1b[" not in lines[0]
