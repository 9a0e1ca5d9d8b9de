"""Owner-only by default: the data dir and its files, the control socket, its directory, and who may connect.

The tests run as root, so "another user" is uid 65534 (nobody): a forked
child switched to it (it cannot exec this checkout's Python, which lives
under root's home), or a path handed to it with ``chown``. Paths the child
must reach live in a fresh 0755 directory under ``/tmp``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from actors.control import ControlClient, ControlServer, ControlUnavailable
from storage.permissions import UnsafePathError, private_dir, runtime_dir
from tests.faults.runtime_proc import ROOT, RUNTIME

NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def as_nobody(fn: Callable[[], str]) -> str:
    """Run ``fn`` in a forked child switched to uid/gid nobody; its result, or its exception as text."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on, only os._exit
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = fn()
        except BaseException as exc:  # reported to the parent
            out = f"{type(exc).__name__}: {exc}"
        os.write(write_end, out.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        out = pipe.read().decode()
    os.waitpid(pid, 0)
    return out


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory other users can traverse (pytest's own tmp dirs are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="slotwise-perm-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_runtime_keeps_its_data_dir_and_every_file_to_its_user(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLOTWISE_")}
    run = subprocess.run(
        [sys.executable, str(RUNTIME), "run", "--demo", "--duration", "3", "--data-dir", str(data)],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert _mode(data) == 0o700
    loose = [
        f"{path.relative_to(data)} {_mode(path):04o}"
        for path in data.rglob("*")
        if _mode(path) & 0o077 and not path.is_symlink()
    ]
    assert not loose, f"readable or writable by others: {loose}"
    assert any(data.glob("events/*.parquet"))
    assert any(data.glob("snapshots/*.parquet"))


def test_an_existing_data_dir_of_ours_is_tightened(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    assert private_dir(data) == data
    assert _mode(data) == 0o700


def test_a_symlink_is_refused_where_links_are_not_allowed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / "slotwise-0"
    link.symlink_to(target)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        private_dir(link, allow_symlink=False)


@needs_root
def test_a_directory_of_another_user_is_refused(shared_tmp: Path) -> None:
    """As the planted ``/tmp/slotwise-<uid>`` of an object-store data dir would be."""
    planted = shared_tmp / "planted"
    planted.mkdir()
    planted.chmod(0o777)
    out = as_nobody(lambda: str(private_dir(planted)))
    assert out.startswith("UnsafePathError"), out
    assert f"belongs to uid 0, not to this user (uid {NOBODY})" in out
    assert _mode(planted) == 0o777, "the other user's directory was changed"


def test_object_store_sockets_go_to_the_users_runtime_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import runtime as runtime_module

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert runtime_module.control_socket_path("s3://bucket/a").parent == tmp_path / "slotwise"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert runtime_module.control_socket_path("s3://bucket/a").parent == Path(f"/tmp/slotwise-{os.geteuid()}")
    assert runtime_dir() == Path(f"/tmp/slotwise-{os.geteuid()}")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ControlServer]:
    control = ControlServer(tmp_path / "sock" / "slotwise.sock", lambda _line: {"ok": True}).start()
    yield control
    control.stop()


def test_the_socket_and_its_directory_are_owner_only(server: ControlServer) -> None:
    assert _mode(server.path) == 0o600
    assert _mode(server.path.parent) == 0o700
    with ControlClient(server.path) as client:
        assert client.call({"type": "status"}) == {"ok": True}


@needs_root
def test_a_client_of_another_user_is_refused_even_through_loosened_modes(shared_tmp: Path) -> None:
    control = ControlServer(shared_tmp / "sock" / "slotwise.sock", lambda _line: {"ok": True}).start()
    try:
        control.path.parent.chmod(0o755)  # an operator's mistake: the kernel's peer check still holds
        control.path.chmod(0o777)

        def ask_status() -> str:
            with socket.socket(socket.AF_UNIX) as conn:
                conn.settimeout(10)
                conn.connect(str(control.path))
                with contextlib.suppress(BrokenPipeError):  # a refusal may close before the request is sent
                    conn.sendall(b'{"type": "status"}\n')
                return conn.makefile().readline()

        out = as_nobody(ask_status)
        assert '"code":"forbidden"' in out, out
        assert control.refused == 1
    finally:
        control.stop()


@needs_root
def test_a_client_refuses_a_socket_another_user_owns(tmp_path: Path) -> None:
    path = tmp_path / "planted.sock"
    planted = socket.socket(socket.AF_UNIX)
    planted.bind(str(path))
    planted.listen(1)
    os.chown(path, NOBODY, NOBODY)
    try:
        with pytest.raises(ControlUnavailable, match=f"belongs to uid {NOBODY}"):
            ControlClient(path)
    finally:
        planted.close()
