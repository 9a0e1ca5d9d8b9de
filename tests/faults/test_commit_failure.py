"""A Delta commit that keeps failing: the runtime stops cleanly (exit 3), and a restart recovers everything acknowledged.

Two ways to make commits fail, because tests run as root (``chmod`` stops
nothing):

* an injected fault: the real ``run_runtime`` in-process, with an event log
  whose ``fault_hook`` raises ``OSError`` once the test flips a switch (the
  runtime's ``EventLog`` is swapped for a subclass for the test's duration;
  runtime.py is unchanged). Runs everywhere.
* a full disk: ``python runtime.py --demo`` on a tmpfs of a few MB that the
  test fills up, so delta-rs itself gets ENOSPC. Runs where ``mount`` is
  permitted (root in a container that allows it); skipped elsewhere.

Both: registry changes acknowledged over the control socket before the
failure are all in the log, nothing is acknowledged after it, the exit code
is 3 and the message says the log failed and nothing acknowledged was
lost, ``verify`` passes, and a restart serves the acknowledged registry.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

import runtime
from actors.config import Config, DemoSettings, RuntimeSettings
from actors.control import ControlClient, ControlUnavailable, request
from storage.event_log import EventLog
from storage.replay import replay
from storage.tables import LogConfig
from storage.verify import verify_data_dir
from tests.faults.runtime_proc import RuntimeProcess, registry_listing, serves_status
from tests.support.collector import wait_until

EXIT_OK, EXIT_LOG_FAILED = 0, 3
STRATEGY = "before-failure"


class Acks:
    """Registry adds sent over the control socket; ``acked`` holds those answered ok."""

    def __init__(self, sock: Path, base: int) -> None:
        self.sock = sock
        self.base = base
        self.acked: list[int] = []
        self.errors: list[dict[str, Any]] = []

    def add(self, client: ControlClient, n: int) -> bool:
        """Add one leg; False once the runtime refuses (the log failed) or hangs up."""
        conid = self.base + n
        try:
            answer = client.call({"type": "registry.add_active", "conid": conid, "strategy": STRATEGY})
        except (OSError, ValueError, ControlUnavailable):
            return False
        if not answer["ok"]:
            self.errors.append(answer["error"])
            return False
        self.acked.append(conid)
        return True


def _wait_socket(sock: Path, alive: Callable[[], bool], timeout: float = 60) -> None:
    wait_until(lambda: not alive() or serves_status(sock), timeout, 0.05, what="the runtime's control socket")
    assert serves_status(sock), "the runtime never served its control socket"


def _check_recovered(data_dir: Path, acked: list[int]) -> None:
    report = verify_data_dir(str(data_dir))
    assert report.ok, report
    registry = replay(str(data_dir)).registry.to_json()
    lost = [c for c in acked if STRATEGY not in registry.get(str(c), [])]
    assert not lost, f"acknowledged adds lost: {lost[:10]}"


# ---------------------------------------------------------------- injected fault, in-process


@pytest.fixture
def loguru_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="ERROR", format="{message}")
    yield lines
    logger.remove(sink)


@pytest.fixture
def keep_signal_handlers() -> Iterator[None]:
    """run_runtime installs SIGINT/SIGTERM handlers; give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def _config(data_dir: Path) -> Config:
    return Config(
        runtime=RuntimeSettings(data_dir=str(data_dir), snapshot_every=200),
        log=LogConfig(flush_ms=2.0, maintenance=False, commit_retries=2, retry_backoff_s=0.01),
        demo=DemoSettings(tick_interval_s=0.2),
    )


def test_injected_commit_failure_stops_with_exit_3(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, loguru_lines: list[str], keep_signal_handlers: None
) -> None:
    failing = threading.Event()
    hook_calls = {"failed": 0}

    def hook(batch_no: int) -> None:
        if failing.is_set():
            hook_calls["failed"] += 1
            raise OSError(f"injected: the disk went away (batch {batch_no})")

    class FaultyLog(EventLog):
        """The runtime's EventLog, with the test's fault hook."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, fault_hook=hook, **kwargs)

    monkeypatch.setattr(runtime, "EventLog", FaultyLog)
    sock = data_dir / "slotwise.sock"
    acks = Acks(sock, base=8_000_000)
    finished = threading.Event()

    def client_side() -> None:
        _wait_socket(sock, lambda: not finished.is_set())
        with ControlClient(sock) as client:
            for n in range(1, 41):
                assert acks.add(client, n)
            failing.set()
            n = 41
            while acks.add(client, n):  # nothing may be acknowledged from here on
                n += 1

    helper = threading.Thread(target=client_side, daemon=True)
    helper.start()
    try:
        code = runtime.run_runtime(_config(data_dir), demo=True, duration=60, allow_broken_log=False)
    finally:
        finished.set()
        helper.join(30)
    assert code == EXIT_LOG_FAILED
    assert hook_calls["failed"] >= 3  # the first try and its retries
    assert len(acks.acked) == 40, "an add was acknowledged after the log failed"
    assert all(e["code"] in ("log_failed", "internal") for e in acks.errors), acks.errors
    text = "\n".join(loguru_lines)
    assert "stopped because the event log failed" in text, text
    assert "Everything acknowledged before is in the log" in text, text
    assert not sock.exists()

    monkeypatch.undo()  # the real log again: restart
    _check_recovered(data_dir, acks.acked)
    seen: dict[str, list[str]] = {}

    def read_registry() -> None:
        _wait_socket(sock, lambda: not finished.is_set())
        seen.update(request(sock, {"type": "registry.list"})["reply"]["registry"])

    finished.clear()
    reader = threading.Thread(target=read_registry, daemon=True)
    reader.start()
    try:
        assert runtime.run_runtime(_config(data_dir), demo=True, duration=3, allow_broken_log=False) == EXIT_OK
    finally:
        finished.set()
        reader.join(30)
    assert all(STRATEGY in seen.get(str(c), []) for c in acks.acked)
    _check_recovered(data_dir, acks.acked)


# ---------------------------------------------------------------- a real full disk


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 24 MB tmpfs, or a skip where mounting is not permitted."""
    mount = tmp_path / f"tiny-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) for a tiny filesystem")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"mount not permitted here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(path: Path) -> None:
    """Write until the filesystem is full."""
    block = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as out:
        with contextlib.suppress(OSError):
            while True:
                out.write(block)
        with contextlib.suppress(OSError):
            while True:
                out.write(b"\0" * 4096)


def _run_until_the_disk_fills(tiny_fs: Path, output_dir: Path) -> tuple[int, RuntimeProcess, Acks]:
    """A demo runtime on ``tiny_fs``: 30 acknowledged adds, then the disk fills while adds go on.

    Returns the runtime's exit code, the process (for its stderr) and the
    acknowledged adds; a runtime still alive 90 s later fails the test
    (``subprocess.TimeoutExpired``). ``output_dir`` takes its stdout/stderr.
    """
    data_dir = tiny_fs / "data"
    data_dir.mkdir()
    proc = RuntimeProcess(
        data_dir, "--demo", "--duration", "120", env={"SLOTWISE_LOG_COMMIT_RETRIES": "2"}, name="full", log_dir=output_dir
    )
    acks = Acks(proc.socket, base=9_000_000)
    try:
        assert proc.wait_ready(60), proc.stderr()[-3000:]
        with proc.client() as client:
            for n in range(1, 31):
                assert acks.add(client, n)
            _fill(tiny_fs / "filler")
            n = 31
            while acks.add(client, n) and n < 5000:
                n += 1
        code = proc.wait(90)
    finally:
        proc.cleanup()
    (tiny_fs / "filler").unlink()
    return code, proc, acks


def test_full_disk_stops_with_exit_3_and_restart_recovers(tiny_fs: Path, tmp_path: Path) -> None:
    code, proc, acks = _run_until_the_disk_fills(tiny_fs, output_dir=tmp_path)
    stderr = proc.stderr()
    assert code == EXIT_LOG_FAILED, stderr[-3000:]
    assert "stopped because the event log failed" in stderr, stderr[-3000:]
    assert "Everything acknowledged before is in the log" in stderr

    data_dir = tiny_fs / "data"
    _check_recovered(data_dir, acks.acked)
    again = RuntimeProcess(data_dir, "--demo", "--duration", "120", name="again", log_dir=tmp_path)
    try:
        assert again.wait_ready(60), again.stderr()[-3000:]
        registry = registry_listing(again)
        assert all(STRATEGY in registry.get(str(c), []) for c in acks.acked)
        assert again.terminate(60) == EXIT_OK, again.stderr()[-3000:]
    finally:
        again.cleanup()
    _check_recovered(data_dir, acks.acked)


def test_full_disk_that_also_holds_stdout_and_stderr_still_stops(tiny_fs: Path) -> None:
    """The runtime's own output on the full disk: it cannot say why, but it must still stop with exit 3.

    Once, a status line that could not be written escaped the runtime's stop
    path, and the process hung in interpreter shutdown behind its actors.
    """
    code, proc, acks = _run_until_the_disk_fills(tiny_fs, output_dir=tiny_fs)
    assert code == EXIT_LOG_FAILED, proc.stderr()[-3000:]
    _check_recovered(tiny_fs / "data", acks.acked)
