"""Running it as a service: the status line in the log, ``--log-file``, collapsed bursts, the unit and Dockerfile.

The runtime runs as a subprocess the way a service manager starts it; every
wait reads the log file it writes, with a deadline.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.config import load_config
from tests.integration.test_end_to_end import ROOT, RUNTIME, cli, wait_for

DOCS = ROOT / "docs"
SMALL_DEMO = """
[runtime]
max_lines = 20
status_interval_s = 0.25
[demo]
stocks = 10
option_strategies = 3
active_strategies = 2
default_duration_s = 0.0
"""


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test.

    The socket stays bound and never listens: a connect is refused, and no other process can take the
    port meanwhile (one bound and released at once could be listened on by anything before the runtime
    got to it).
    """
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        yield holder.getsockname()[1]


class Service:
    """``runtime.py run`` with ``--log-file``; stdout and stderr kept apart in files."""

    def __init__(self, root: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.log_file = root / "logs" / "slotwise.log"
        self.stdout = root / "stdout"
        self.data_dir = root / "data"
        config = root / "c.toml"
        config.write_text(SMALL_DEMO)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLOTWISE_")}
        full_env.update(env or {})
        argv = [sys.executable, str(RUNTIME), "run", "--config", str(config), "--data-dir", str(self.data_dir)]
        with open(self.stdout, "wb") as out, open(root / "stderr", "wb") as err:
            self.proc = subprocess.Popen(
                [*argv, "--log-file", str(self.log_file), *args], cwd=ROOT, stdout=out, stderr=err, env=full_env
            )

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    def wait_log(self, pattern: str, what: str) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            assert self.proc.poll() is None, f"the runtime exited with {self.proc.returncode}:\n{self.log()[-3000:]}"
            return re.search(pattern, self.log(), flags=re.MULTILINE)

        return wait_for(found, 60, what, interval=0.2)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[type[Service]]:
    started: list[Service] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Service:
        svc = Service(tmp_path, *args, env=env)
        started.append(svc)
        return svc

    yield start  # type: ignore[misc]
    for svc in started:
        svc.close()


def test_a_service_run_writes_its_status_line_to_the_log_file(service: type[Service], closed_port: int) -> None:
    """No --demo, no IB to talk to: it still runs, and says how it is doing every status_interval_s."""
    svc = service(env={"SLOTWISE_IB_PORT": str(closed_port), "SLOTWISE_IB_RECONNECT_MAX_S": "1"})
    svc.wait_log(r"\| INFO +\| __main__: status: lines .*\| IB ", "a status line in the log file")
    # ten a burst window: a periodic line is never collapsed into a "... and N more" summary
    wait_for(lambda: svc.log().count("__main__: status: ") >= 12, 60, "twelve status lines", interval=0.2)
    assert svc.stop() == 0, svc.log()[-3000:]
    assert not re.search(r"more like that .*, the first: status: ", svc.log())
    # one line of shared code (the actors' base class) about different actors is not a burst
    recovered = re.findall(r"actors\.base: (\w+) recovered", svc.log())
    assert {"registry", "queue", "router"} <= set(recovered), recovered
    assert not re.search(r"more like that .*, the first: \w+ recovered", svc.log())
    assert "stopped cleanly" in svc.log()
    assert svc.stdout.read_text() == "", "a service writes its status to the log, not to stdout"


def test_a_burst_of_alike_lines_becomes_a_few_and_one_summary(service: type[Service]) -> None:
    svc = service("--demo")
    svc.wait_log(r"control socket at", "the runtime to serve")
    unknown = [str(c) for c in range(900_001, 900_031)]
    added = cli("registry", "add", *unknown, "--strategy", "burst", "--data-dir", str(svc.data_dir))
    assert added.returncode == 0, added.stderr
    site = r"reconciliation: no_position on 9000\d\d"
    summary = svc.wait_log(rf"\.\.\. and (\d+) more like that in the last \d+ s, the first: {site}", "the summary line")
    log = svc.log()
    kept = re.findall(rf"^\S+ \S+ \| WARNING \| [\w.]+: {site}", log, flags=re.MULTILINE)
    summarised = sum(int(n) for n in re.findall(rf"\.\.\. and (\d+) more like that .*: {site}", log))
    assert 1 <= len(kept) <= 3, kept
    assert len(kept) + summarised == len(unknown), (kept, summary.group(0))
    assert svc.stop() == 0


def _unit_for_this_machine(tmp_path: Path) -> Path:
    text = (DOCS / "slotwise.service").read_text()
    text = text.replace("/opt/slotwise/.venv/bin/python", sys.executable).replace("/opt/slotwise", str(ROOT))
    unit = tmp_path / "slotwise.service"
    unit.write_text(text)
    return unit


def _runtime_args(command: list[str]) -> list[str]:
    """The arguments after ``runtime.py`` in a command line."""
    return command[next(i for i, word in enumerate(command) if word.endswith("runtime.py")) + 1 :]


def _parses(args: list[str]) -> None:
    """The real parser of runtime.py accepts ``args`` (run in a subprocess: it is the CLI's own code)."""
    code = f"import runpy, sys; m = runpy.run_path({str(RUNTIME)!r}); print(m['parse_args']({args!r}).command)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "run"


def test_the_systemd_unit_verifies_and_starts_a_valid_command(tmp_path: Path) -> None:
    unit = _unit_for_this_machine(tmp_path)
    exec_start = re.search(r"^ExecStart=(.*)$", unit.read_text(), flags=re.MULTILINE)
    assert exec_start is not None
    _parses(_runtime_args(shlex.split(exec_start.group(1))))
    env = dict(line.split("=", 1) for line in re.findall(r"^Environment=(\S+)$", unit.read_text(), flags=re.MULTILINE))
    load_config(environ=env)  # every variable names a real config key
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_the_dockerfile_copies_what_exists_and_runs_a_valid_command() -> None:
    """No Docker daemon here: what can be checked without building is checked."""
    text = (DOCS / "Dockerfile").read_text()
    for sources in re.findall(r"^COPY (.+) \S+$", text, flags=re.MULTILINE):
        for source in sources.split():
            assert (ROOT / source).exists(), f"COPY {source}: not in the checkout"
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", text, flags=re.MULTILINE)
    cmd = re.search(r"^CMD (\[.*\])$", text, flags=re.MULTILINE)
    assert entry is not None
    assert cmd is not None
    command = tomllib.loads(f"e = {entry.group(1)}\nc = {cmd.group(1)}")
    _parses(_runtime_args(command["e"] + command["c"]))
    env_line = re.search(r"^ENV (.+)$", text, flags=re.MULTILINE)
    assert env_line is not None
    env = dict(pair.split("=", 1) for pair in env_line.group(1).split())
    load_config(environ=env)
