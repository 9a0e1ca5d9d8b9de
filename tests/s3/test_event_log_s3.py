"""The event log on a real S3 API server: chain continuity, one writer, the conditional commit.

No lock file reaches object storage: a second writer is refused by
:mod:`storage.object_fence` while the first commits, and if it takes over
anyway, Delta's conditional commit (``If-None-Match: *``) stops whichever
writer's table moved under it. These run delta-rs's own S3 client against
moto's server over HTTP on loopback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from events.log import RuntimeStopped
from storage.event_log import EventLog, LogFencedError
from storage.object_fence import DataDirInUse
from storage.tables import LogConfig
from storage.verify import verify_log

CONFIG = LogConfig(flush_ms=2.0, maintenance=False)
ROOT = Path(__file__).resolve().parents[2]


def _append(log: EventLog, n: int, tag: str) -> int:
    receipts = [log.append(RuntimeStopped(reason=f"{tag}{i}"), stream="runtime", key="runtime") for i in range(n)]
    return receipts[-1].wait(60)


def test_reopened_log_continues_the_chain(bucket: str) -> None:
    data_dir = f"{bucket}/account-a"
    with EventLog.open(data_dir, config=CONFIG) as log:
        assert _append(log, 30, "a") == 30
    with EventLog.open(data_dir, config=CONFIG) as log:
        assert log.last_seq == 30
        assert _append(log, 5, "b") == 35
    report = verify_log(f"{data_dir}/events")
    assert report.ok, report.problem
    assert (report.events, report.last_seq) == (35, 35)


def test_second_writer_refused_while_the_first_commits(bucket: str) -> None:
    data_dir = f"{bucket}/account-a"
    with EventLog.open(data_dir, config=CONFIG) as first:
        _append(first, 3, "a")
        with pytest.raises(DataDirInUse, match=f"in use by another Slotwise writer \\(writer {first.writer_id}"):
            EventLog.open(data_dir, config=CONFIG)
        assert _append(first, 1, "still mine") == 4


def test_a_cleanly_closed_log_is_free_at_once(bucket: str) -> None:
    data_dir = f"{bucket}/account-a"
    with EventLog.open(data_dir, config=CONFIG) as first:
        _append(first, 3, "a")
    # the default takeover_after_s (minutes) has not passed: only the release commit lets this open
    with EventLog.open(data_dir, config=CONFIG) as second:
        assert _append(second, 1, "b") == 4


def test_a_taken_over_writer_is_fenced_by_the_conditional_commit(bucket: str) -> None:
    """The newcomer takes over (takeover_after_s=0); the old writer's next commit fails instead of forking."""
    data_dir = f"{bucket}/account-a"
    old = EventLog.open(data_dir, config=CONFIG)
    try:
        _append(old, 3, "old")
        with EventLog.open(data_dir, config=LogConfig(flush_ms=2.0, maintenance=False, takeover_after_s=0)) as new:
            assert _append(new, 2, "new") == 5
            with pytest.raises(LogFencedError, match="another writer"):
                _append(old, 1, "old again")
            assert _append(new, 1, "new again") == 6
    finally:
        old.close()
    report = verify_log(f"{data_dir}/events")
    assert report.ok, report.problem
    assert report.last_seq == 6


def test_storage_section_alone_reaches_the_server(bucket: str, tmp_path: Path) -> None:
    """Endpoint and credentials only in ``[storage]`` of the config file: the CLI still finds the bucket."""
    data_dir = f"{bucket}/account-a"
    with EventLog.open(data_dir, config=CONFIG) as log:
        _append(log, 3, "a")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SLOTWISE_"))}
    config = tmp_path / "slotwise.toml"
    server = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    config.write_text(
        "[storage]\n"
        f'endpoint_url = "{server["AWS_ENDPOINT_URL"]}"\n'
        "allow_http = true\n"
        f'region = "{server["AWS_REGION"]}"\n'
        f'access_key_id = "{server["AWS_ACCESS_KEY_ID"]}"\n'
        f'secret_access_key = "{server["AWS_SECRET_ACCESS_KEY"]}"\n'
    )
    verify = subprocess.run(
        [sys.executable, str(ROOT / "runtime.py"), "verify", "--config", str(config), "--data-dir", data_dir],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.startswith("ok: 3 events")
