"""``fleet`` on a local root: accounts found by their events table, facts from the tables, errors in one line.

The object-storage run of the same command is in ``tests/s3/test_accounts_s3.py``;
here each account is written with the event log directly, so every figure
the fleet prints is known in advance.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from events.log import RuntimeStarted
from events.queue import ItemEnqueued
from events.router import LineLimitLearned, LineLimitProbed
from storage.event_log import EventLog
from tests.conftest import TEST_LOG_CONFIG

ROOT = Path(__file__).resolve().parents[2]


def _write(data_dir: Path, *events: tuple[object, str, str]) -> int:
    with EventLog.open(data_dir, config=TEST_LOG_CONFIG) as log:
        receipts = log.append_many(events)  # type: ignore[arg-type]
        return receipts[-1].wait(30)


def _started(max_lines: int) -> tuple[object, str, str]:
    return RuntimeStarted(writer_id="w", pid=1, host="h", mode="demo", max_lines=max_lines), "runtime", "runtime"


def _enqueued(item_id: int) -> tuple[object, str, str]:
    conid = 1000 + item_id
    return ItemEnqueued(item_id=item_id, conid=conid, priority=2, enqueued_us=1), "queue", str(conid)


def _fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "runtime.py"), "fleet", *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_fleet_lists_each_account_with_seq_limit_and_queue_depth(tmp_path: Path) -> None:
    root = tmp_path / "accounts"
    _write(root / "alpha", _started(100), _enqueued(1), _enqueued(2), _enqueued(3))
    learned = LineLimitLearned(limit=60, previous=None, reason="101 on stream 7")
    _write(root / "beta", _started(100), (learned, "router", "router"), _enqueued(1))
    (root / "not-an-account").mkdir()
    probed = LineLimitProbed(limit=61, previous=60)
    _write(root / "gamma", _started(80), (learned, "router", "router"), (probed, "router", "router"))

    result = _fleet("--root", str(root), "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["account"]: row for row in json.loads(result.stdout)["accounts"]}
    assert sorted(rows) == ["alpha", "beta", "gamma"]
    assert rows["alpha"]["last_seq"] == 4
    assert (rows["alpha"]["line_limit"], rows["alpha"]["line_limit_source"]) == (100, "configured")
    assert rows["alpha"]["queue"] == {"pending": 3, "processing": 0, "failed": 0}
    assert (rows["beta"]["line_limit"], rows["beta"]["line_limit_source"]) == (60, "learned")
    assert rows["beta"]["line_limit_reason"] == "101 on stream 7"
    assert rows["beta"]["queue"]["pending"] == 1
    assert (rows["gamma"]["line_limit"], rows["gamma"]["line_limit_source"]) == (61, "learned")
    assert rows["gamma"]["last_event_ts"] is not None

    table = _fleet("--root", str(root))
    assert table.returncode == 0, table.stderr
    assert "60 (learned)" in table.stdout
    assert "3/0/0" in table.stdout


def test_fleet_refuses_a_root_without_accounts_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "empty", tmp_path / "missing"):
        result = _fleet("--root", str(root))
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("error: ")
        assert result.stdout == ""


def test_an_unreadable_account_is_named_and_the_others_still_listed(tmp_path: Path) -> None:
    root = tmp_path / "accounts"
    _write(root / "good", _started(100))
    _write(root / "broken", _started(100), _enqueued(1))
    for data_file in (root / "broken" / "events").glob("*.parquet"):
        data_file.write_bytes(b"not parquet")
    result = _fleet("--root", str(root))
    assert result.returncode == 1
    assert "good" in result.stdout
    assert "broken" in result.stdout
    assert "unreadable" in result.stdout
    assert result.stderr.strip() == "error: 1 account(s) could not be read: broken"
