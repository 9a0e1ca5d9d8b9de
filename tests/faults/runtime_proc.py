"""Helpers of the fault tests: the real runtime as a subprocess, and checks of a log after a fault.

The runtime runs as ``python runtime.py --demo ...`` exactly as a user would
start it, so a SIGKILL hits the real process with all its threads. Its
stdout and stderr go to files (a pipe nobody reads would block it), and
tests talk to it only through the control socket.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from actors.control import ControlClient, ControlUnavailable, request
from actors.queue import QueueActor
from actors.queue_state import QueueState
from events.base import Event
from tests.support.collector import wait_until

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = ROOT / "runtime.py"

#: A demo that does a lot in a few seconds: fast worker polls and refreshes,
#: snapshots every 200 events of a stream, quick ticks.
FAST_ENV = {
    "SLOTWISE_FRESHNESS_MONITORING_S": "3",
    "SLOTWISE_RUNTIME_SNAPSHOT_EVERY": "200",
    "SLOTWISE_RUNTIME_LEASE_S": "30",
    "SLOTWISE_DEMO_TICK_INTERVAL_S": "0.2",
}


def serves_status(sock: Path) -> bool:
    """True once a runtime answers ``status`` on ``sock``."""
    try:
        return bool(request(sock, {"type": "status"}, timeout=5)["ok"])
    except (ControlUnavailable, OSError, ValueError):
        return False


class RuntimeProcess:
    """One ``runtime.py run`` subprocess on a data directory."""

    def __init__(
        self,
        data_dir: Path | str,
        *args: str,
        env: dict[str, str] | None = None,
        name: str = "runtime",
        log_dir: Path | None = None,
        socket: Path | None = None,
    ) -> None:
        """``data_dir`` may be an ``s3://`` URI: then give ``log_dir`` and ``socket`` (not in the data dir)."""
        self.data_dir = data_dir
        self.socket = socket if socket is not None else Path(data_dir) / "slotwise.sock"
        log_dir = log_dir or Path(data_dir).parent  # elsewhere when the data's filesystem is to be filled
        self.stdout_path = log_dir / f"{name}.stdout"
        self.stderr_path = log_dir / f"{name}.stderr"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLOTWISE_")}
        full_env.update(FAST_ENV)
        full_env.update(env or {})
        full_env["PYTHONPATH"] = str(ROOT)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(RUNTIME), "run", "--data-dir", str(data_dir), "--log-level", "WARNING", *args],
                cwd=ROOT,
                stdout=out,
                stderr=err,
                env=full_env,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Wait until the control socket answers ``status``; False if the process died first."""

        def ready_or_dead() -> bool:
            return self.proc.poll() is not None or serves_status(self.socket)

        wait_until(ready_or_dead, timeout, 0.05, what=f"the runtime to serve status:\n{self.stderr()[-3000:]}")
        return self.proc.poll() is None

    def call(self, payload: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        return request(self.socket, payload, timeout=timeout)

    def client(self, timeout: float = 30.0) -> ControlClient:
        return ControlClient(self.socket, timeout)

    def kill(self) -> None:
        """SIGKILL: no handler runs, no flush, no snapshot."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: the graceful stop path."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.kill()


def registry_listing(proc: RuntimeProcess) -> dict[str, list[str]]:
    answer = proc.call({"type": "registry.list"})
    assert answer["ok"], answer
    return {k: sorted(v) for k, v in answer["reply"]["registry"].items()}


def expected_queue_after_restart(dump: bytes) -> QueueState:
    """The durable queue with the restart rule applied by the QueueActor's own decision code.

    The actor is never started (no thread, no log): its ``persist`` only
    applies, so this is exactly what a recovering actor decides.
    """
    actor = QueueActor(object(), lease_check_s=0)  # type: ignore[arg-type]
    actor.state = QueueState.load(dump)

    def persist(event: Event) -> None:
        actor.state.apply(event)

    actor.persist = persist  # type: ignore[method-assign]
    actor.on_recovered()
    return actor.state


def queue_rows(state: QueueState) -> list[tuple[Any, ...]]:
    return [state.items[i].row() for i in sorted(state.items)]
