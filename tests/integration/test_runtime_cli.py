"""The command line against a running runtime: status, refused registry input, and a clean SIGTERM stop.

One demo runtime serves the whole module (starting one costs about a
second); each test reads it through the same commands an operator types.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_end_to_end import DEMO_STOCK_CONIDS, RuntimeProc, cli, write_config


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProc]:
    root = tmp_path_factory.mktemp("cli")
    rt = RuntimeProc(root / "data", write_config(root / "c.toml"))
    try:
        rt.wait_connected()
        yield rt
    finally:
        rt.close()


def test_status_json_while_running(running: RuntimeProc) -> None:
    running.wait_status(lambda s: s["worker"]["cycles"] >= 1, 20, "a worker cycle")
    status = running.status()  # the CLI's own output
    assert status is not None
    for key in ("uptime_s", "mode", "max_lines", "lines_in_use", "streams", "overflow", "queue", "last_seq", "ib"):
        assert key in status, key
    assert status["mode"] == "demo"
    assert status["ib"]["connected"] is True
    assert status["lines_in_use"] <= status["max_lines"] == 30
    assert status["streams"] == status["active"] > 0
    text = cli("status", *running.dir_args())
    assert text.returncode == 0
    assert "lines in use" in text.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-5", "--strategy", "bad"], "conid"),
        ([str(DEMO_STOCK_CONIDS[1]), "--strategy", ""], "strategy"),
    ],
    ids=["negative-conid", "empty-strategy"],
)
def test_registry_add_with_bad_input_is_refused_and_changes_nothing(
    running: RuntimeProc, args: list[str], needle: str
) -> None:
    before = cli("registry", "list", "--json", *running.dir_args())
    assert before.returncode == 0, before.stderr
    result = cli("registry", "add", *args, *running.dir_args())
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "error" in result.stderr
    assert needle in result.stderr
    assert "nothing was changed" in result.stderr
    after = cli("registry", "list", "--json", *running.dir_args())
    assert json.loads(after.stdout) == json.loads(before.stdout)


def test_commands_without_a_runtime_say_so(tmp_path: Path) -> None:
    empty = tmp_path / "nothing"
    empty.mkdir()
    for args in (["status"], ["registry", "add", "1", "--strategy", "x"]):
        # SLOTWISE_LOG_LEVEL is the log level, not a config key: it must not turn this into a usage error
        result = cli(*args, "--data-dir", str(empty), env={"SLOTWISE_LOG_LEVEL": "DEBUG"})
        assert result.returncode == 1
        assert "error" in result.stderr
        assert "runtime" in result.stderr.lower()


def test_sigterm_stops_cleanly_with_exit_0(tmp_path: Path) -> None:
    rt = RuntimeProc(tmp_path / "data", write_config(tmp_path / "c.toml"))
    try:
        rt.wait_connected()
        assert rt.terminate() == 0, rt.log_tail()
        log = rt.log_tail(200)
        assert "stopped cleanly" in log
        events = cli(
            "audit", "--data-dir", str(tmp_path / "data"), "--type", "log.runtime_stopped", "--format", "jsonl"
        )
        assert [json.loads(line)["reason"] for line in events.stdout.splitlines()] == ["SIGTERM"]
        assert cli("verify", "--data-dir", str(tmp_path / "data")).returncode == 0
    finally:
        rt.close()


def test_help_needs_no_dependency_and_a_missing_one_is_named() -> None:
    """``-S`` hides site-packages: what a fresh machine looks like before ``pip install .``."""
    runtime_py = str(Path(__file__).resolve().parents[2] / "runtime.py")
    helped = subprocess.run(
        [sys.executable, "-S", runtime_py, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert helped.returncode == 0, helped.stderr
    assert "{run,registry,status,replay,audit,verify," in helped.stdout  # later commands follow (digest, ...)
    bad = subprocess.run(
        [sys.executable, "-S", runtime_py, "--bogus"], capture_output=True, text=True, timeout=60, check=False
    )
    assert bad.returncode == 2
    needs = subprocess.run(
        [sys.executable, "-S", runtime_py, "verify"], capture_output=True, text=True, timeout=60, check=False
    )
    assert needs.returncode == 1
    assert "is not installed: run `pip install .`" in needs.stderr


def test_the_socket_of_an_object_store_data_dir_is_found_from_another_process() -> None:
    """The CLI and the runtime must agree on the path, so it cannot depend on per-process hashing."""
    runtime_py = str(Path(__file__).resolve().parents[2] / "runtime.py")
    code = f"import runpy; m = runpy.run_path({runtime_py!r}); print(m['control_socket_path']('s3://bucket/slotwise'))"
    paths = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert len(paths) == 1, paths
