"""Every mistake an operator can type gets one clear line, a non-zero exit, and changes nothing.

Each case runs the real command line as a subprocess, the way a person
meets it: the exit code, a single line on stderr naming what to fix, no
Python traceback anywhere, and the data directory exactly as it was before
(or still absent).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_end_to_end import RUNTIME, cli


def _tree(path: Path) -> list[tuple[str, int]] | str:
    """What is at ``path``: a listing of (relative name, size), the file's bytes, or absent."""
    if not path.exists():
        return "absent"
    if path.is_file():
        return path.read_text(errors="replace")
    return sorted((str(p.relative_to(path)), p.stat().st_size if p.is_file() else -1) for p in path.rglob("*"))


def assert_refused(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """Exit ``code``, one line on stderr holding every needle, nothing on stdout, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.fixture
def unwritable_parent() -> Iterator[Path]:
    """A directory this user (or, for root, the user that runs the command) cannot write into."""
    top = Path(tempfile.mkdtemp(prefix="slotwise-ro-"))
    top.chmod(0o755)  # traversable by the unprivileged user the command may run as
    locked = top / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        yield locked
    finally:
        locked.chmod(0o755)
        shutil.rmtree(top)


def _as_unprivileged(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user for whom permissions hold (root passes every permission check)."""
    argv = [sys.executable, str(RUNTIME), *args]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: a read-only directory cannot be made here")
        argv = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLOTWISE_")}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=env, cwd="/")


# (id, args, extra environment, exit code, needles); {dir} is the test's data directory, {file} a plain file
CASES = [
    ("data-dir-is-a-file/run", ["run", "--demo", "--data-dir", "{file}"], {}, 1, ["{file}", "not a directory"]),
    ("data-dir-is-a-file/status", ["status", "--data-dir", "{file}"], {}, 1, ["{file}", "not a directory"]),
    ("data-dir-is-a-file/registry", ["registry", "list", "--data-dir", "{file}"], {}, 1, ["not a directory"]),
    ("data-dir-empty/what-if", ["what-if", "--data-dir", ""], {}, 1, ["the data directory is empty"]),
    ("config-is-a-directory", ["run", "--demo", "--data-dir", "{dir}", "--config", "{tmp}"], {}, 2, ["is a directory"]),
    ("config-is-binary", ["status", "--data-dir", "{dir}", "--config", "{binary}"], {}, 2, ["{binary}"]),
    ("log-level-unknown", ["run", "--demo", "--data-dir", "{dir}", "--log-level", "LOUD"], {}, 2, ["LOUD", "WARNING"]),
    ("log-level-env-unknown", ["status", "--data-dir", "{dir}"], {"SLOTWISE_LOG_LEVEL": "loud"}, 2, ["SLOTWISE_LOG_LEVEL"]),
    ("duration-negative", ["run", "--demo", "--data-dir", "{dir}", "--duration", "-5"], {}, 2, ["'-5'", ">= 0"]),
    ("duration-nan", ["run", "--demo", "--data-dir", "{dir}", "--duration", "nan"], {}, 2, ["'nan'", "finite"]),
    ("duration-inf", ["run", "--demo", "--data-dir", "{dir}", "--duration", "inf"], {}, 2, ["'inf'", "finite"]),
    ("duration-text", ["run", "--demo", "--data-dir", "{dir}", "--duration", "soon"], {}, 2, ["'soon'"]),
    ("env-wrong-type", ["run", "--demo", "--data-dir", "{dir}"], {"SLOTWISE_IB_PORT": "abc"}, 2, ["SLOTWISE_IB_PORT"]),
    ("env-out-of-range", ["run", "--demo", "--data-dir", "{dir}"], {"SLOTWISE_RUNTIME_MAX_LINES": "1"}, 2,
     ["SLOTWISE_RUNTIME_MAX_LINES"]),
    ("env-unknown-key", ["status", "--data-dir", "{dir}"], {"SLOTWISE_IB_PROT": "4002"}, 2, ["SLOTWISE_IB_PROT"]),
    ("no-line-for-streams", ["run", "--demo", "--data-dir", "{dir}"], {"SLOTWISE_FRESHNESS_MIN_SNAPSHOT_LINES": "100"}, 2,
     ["min_snapshot_lines", "runtime.max_lines", "SLOTWISE_FRESHNESS_MIN_SNAPSHOT_LINES"]),
    ("backoff-past-its-cap", ["run", "--demo", "--data-dir", "{dir}"], {"SLOTWISE_RUNTIME_RETRY_BACKOFF_S": "500"}, 2,
     ["retry_backoff_cap_s"]),
    ("ib-client-unknown", ["run", "--demo", "--data-dir", "{dir}"], {"SLOTWISE_IB_CLIENT": "ib_bogus"}, 2,
     ["ib.client = 'ib_bogus'", "'ib_async'", "SLOTWISE_IB_CLIENT"]),
    ("flag-out-of-range", ["run", "--demo", "--data-dir", "{dir}", "--ib-port", "99999"], {}, 2, ["ib.port", "command line"]),
    ("unknown-flag", ["status", "--data-dir", "{dir}", "--jsn"], {}, 2, ["--jsn", "--help"]),
    ("log-file-is-a-directory", ["run", "--demo", "--data-dir", "{dir}", "--log-file", "{tmp}"], {}, 1, ["is a directory"]),
    ("metrics-port-in-use", ["run", "--demo", "--data-dir", "{dir}"],
     {"SLOTWISE_METRICS_ENABLED": "true", "SLOTWISE_METRICS_PORT": "{port}"}, 1, ["{port}", "in use"]),
]  # fmt: skip


@pytest.mark.parametrize(("args", "env", "code", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_a_nonzero_exit_and_changes_nothing(
    tmp_path: Path, busy_port: int, args: list[str], env: dict[str, str], code: int, needles: list[str]
) -> None:
    names = {"dir": tmp_path / "data", "file": tmp_path / "a-file", "tmp": tmp_path, "binary": tmp_path / "c.toml"}
    names["file"].write_text("not a directory\n")
    names["binary"].write_bytes(b"\xff\xfe\x00[runtime]\n")
    values = {**{k: str(v) for k, v in names.items()}, "port": str(busy_port)}
    before = {name: _tree(path) for name, path in names.items() if name != "tmp"}
    result = cli(*(a.format(**values) for a in args), env={k: v.format(**values) for k, v in env.items()})
    assert_refused(result, code, *(n.format(**values) for n in needles))
    assert {name: _tree(path) for name, path in names.items() if name != "tmp"} == before


@pytest.mark.parametrize("sub", ["", "not-yet/created"], ids=["existing", "to-be-created"])
def test_a_data_dir_the_user_cannot_write_is_refused_before_anything_is_written(
    unwritable_parent: Path, sub: str
) -> None:
    data_dir = unwritable_parent / sub if sub else unwritable_parent
    result = _as_unprivileged(["run", "--demo", "--data-dir", str(data_dir)])
    assert_refused(result, 1, str(data_dir), "not writable")
    assert list(unwritable_parent.iterdir()) == []


@pytest.mark.parametrize("command", [["what-if"], ["replay"], ["audit"]])
def test_a_data_dir_the_user_cannot_read_is_named_not_called_empty(command: list[str]) -> None:
    """A log that is there but unreadable is not "no event log": the refusal says which it is."""
    top = Path(tempfile.mkdtemp(prefix="slotwise-unreadable-"))
    top.chmod(0o755)  # traversable by the unprivileged user the command may run as
    data_dir = top / "data"
    data_dir.mkdir()
    data_dir.chmod(0o000)
    try:
        result = _as_unprivileged([*command, "--data-dir", str(data_dir)])
    finally:
        data_dir.chmod(0o755)
        shutil.rmtree(top)
    assert_refused(result, 1, str(data_dir), "not readable")


def test_a_log_level_is_accepted_in_any_case(tmp_path: Path) -> None:
    """``warning`` means WARNING: loguru's own names are upper-case, people type either."""
    ran = cli("run", "--demo", "--duration", "0.5", "--log-level", "warning", "--data-dir", str(tmp_path / "data"))
    assert ran.returncode == 0, ran.stderr
    assert " INFO " not in ran.stderr
    asked = cli("status", "--data-dir", str(tmp_path / "data"), env={"SLOTWISE_LOG_LEVEL": "debug"})
    assert asked.returncode == 1  # no runtime runs there now: not a usage error (2)
    assert "no Slotwise runtime is running" in asked.stderr
