"""Two accounts on one bucket of a real S3 API server: the real runtime, a SIGKILL, a restart, the tools.

One scenario, in the order an operator lives it (each phase needs the one
before, and runtimes are the slow part, so it is one test):

1. account-a and account-b run side by side (``--demo``, ``s3://bucket/<account>``);
2. a second runtime on account-a is refused (no lock file on S3: the newest
   commit is account-a's own, seconds old) and account-a keeps running;
   account-b stops cleanly;
3. account-a is SIGKILLed, and restarted once its last commit is older than
   the restart's ``log.takeover_after_s`` (no release was written: it died);
   the restarted runtime continues the same chain with the same registry;
4. account-a stops cleanly; ``verify``, ``replay``, ``audit`` and ``digest`` work on
   account-a's S3 data dir; ``fleet --root s3://bucket/`` lists both accounts,
   account-a with the seq and queue depth ``replay`` computes, account-b with
   the line limit its router learned (its simulated IB has 5 lines).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from deltalake import DeltaTable

from runtime import control_socket_path
from tests.faults.runtime_proc import ROOT, RUNTIME, RuntimeProcess, registry_listing
from tests.support.collector import wait_until

pytestmark = pytest.mark.slow


#: A small demo account, compacted often: fewer small files for every read of the log over HTTP.
SMALL_DEMO = {
    "SLOTWISE_DEMO_STOCKS": "30",
    "SLOTWISE_DEMO_OPTION_STRATEGIES": "8",
    "SLOTWISE_DEMO_ACTIVE_STRATEGIES": "4",
    "SLOTWISE_LOG_COMPACT_EVERY_COMMITS": "25",
}


class S3Runtime(RuntimeProcess):
    """``runtime.py run --demo`` on an ``s3://`` data dir; its control socket is in $XDG_RUNTIME_DIR."""

    def __init__(self, data_dir: str, log_dir: Path, name: str, env: dict[str, str] | None = None) -> None:
        socket = control_socket_path(data_dir)
        env = {**SMALL_DEMO, **(env or {})}
        super().__init__(data_dir, "--demo", "--duration", "300", env=env, name=name, log_dir=log_dir, socket=socket)


def _cli_all(calls: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess[str]]:
    """Run several read-only ``runtime.py`` commands at once (they only read the tables) and collect them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLOTWISE_")}
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(RUNTIME), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, args in calls.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


def _newest_commit_age_s(data_dir: str) -> float:
    newest = DeltaTable(f"{data_dir}/events").history(limit=1)[0]
    return time.time() - int(newest["timestamp"]) / 1000


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short $XDG_RUNTIME_DIR: a socket path has at most 107 bytes, and tmp_path is long (longer under xdist)."""
    with tempfile.TemporaryDirectory(prefix="sw-") as path:  # 0700, as a runtime dir must be
        monkeypatch.setenv("XDG_RUNTIME_DIR", path)
        yield Path(path)


@pytest.mark.usefixtures("runtime_dir")
def test_two_accounts_crash_restart_and_tools_on_s3(bucket: str, tmp_path: Path) -> None:
    a_dir, b_dir = f"{bucket}/account-a", f"{bucket}/account-b"
    procs: list[RuntimeProcess] = []
    try:
        a = S3Runtime(a_dir, tmp_path, "a")
        b = S3Runtime(b_dir, tmp_path, "b", env={"SLOTWISE_DEMO_TRUE_LINES": "5"})  # b's IB refuses a 6th line
        procs += [a, b]
        assert a.wait_ready(), a.stderr()
        assert b.wait_ready(), b.stderr()
        wait_until(lambda: len(registry_listing(a)) > 0, 30, 0.1, what="account-a's demo registry")
        registry_before = registry_listing(a)

        intruder = S3Runtime(a_dir, tmp_path, "a-second")
        procs.append(intruder)
        assert intruder.wait(120) == 1
        assert f"data directory {a_dir} is in use by another Slotwise writer" in intruder.stderr()
        assert a.call({"type": "status"})["ok"], "the first runtime on account-a must be untouched"
        assert b.terminate() == 0, b.stderr()

        a.kill()
        # a SIGKILL leaves no release commit: the restart may take over only once a's last commit is old enough
        wait_until(lambda: _newest_commit_age_s(a_dir) > 1.0, 30, 0.1, what="account-a's last commit to age")
        restarted = S3Runtime(a_dir, tmp_path, "a-restarted", env={"SLOTWISE_LOG_TAKEOVER_AFTER_S": "1"})
        procs.append(restarted)
        assert restarted.wait_ready(), restarted.stderr()
        assert registry_listing(restarted) == registry_before
        assert restarted.terminate() == 0, restarted.stderr()
    finally:
        for proc in procs:
            proc.cleanup()

    run = _cli_all(
        {
            "verify a": ["verify", "--data-dir", a_dir],
            "replay a": ["replay", "--data-dir", a_dir, "--json"],
            "audit a": ["audit", "--data-dir", a_dir, "--type", "log.runtime_started", "--format", "jsonl"],
            "digest a": ["digest", "--data-dir", a_dir],
            "fleet": ["fleet", "--root", f"{bucket}/", "--json"],
        }
    )
    for name, result in run.items():
        assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
    assert run["verify a"].stdout.startswith("ok: ")
    replayed = json.loads(run["replay a"].stdout)
    writers = [json.loads(line)["writer_id"] for line in run["audit a"].stdout.splitlines()]
    assert len(set(writers)) == len(writers) == 2, "one chain, continued by the restarted writer"
    assert json.loads(run["digest a"].stdout)["seq"] == replayed["seq"], "the clean stop signs the head"

    rows = {row["account"]: row for row in json.loads(run["fleet"].stdout)["accounts"]}
    assert sorted(rows) == ["account-a", "account-b"]
    assert rows["account-a"]["last_seq"] == replayed["seq"]
    assert rows["account-a"]["queue"] == {k: replayed["queue"][k] for k in ("pending", "processing", "failed")}
    assert (rows["account-a"]["line_limit"], rows["account-a"]["line_limit_source"]) == (100, "configured")
    assert rows["account-b"]["last_seq"] > 0
    assert rows["account-b"]["line_limit_source"] == "learned"
    assert rows["account-b"]["line_limit"] <= 5
