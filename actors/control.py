"""The control socket: JSON lines over a Unix socket in the data directory.

``python runtime.py registry ...`` and ``status`` talk to the running runtime
through it. One request a line, one answer a line:

    -> {"type": "registry.add_active", "conid": 265598, "strategy": "spx-ic"}
    <- {"ok": true, "reply": {"type": "registry.changed", ...}}
    <- {"ok": false, "error": {"code": "invalid", "message": "...", "field": "conid"}}

The socket is owner-only: 0600, in a directory that is ours alone (the data
directory, or for object-store data dirs :func:`storage.permissions.runtime_dir`;
see :func:`storage.permissions.private_dir`). The kernel tells the server who
connected (``SO_PEERCRED``): a client of another user (root excepted) is
refused even if a mode was loosened, and a client refuses a socket that
another user owns.
Bad input of every kind -- not JSON, not UTF-8, an unknown ``type``, wrong
field types, a line over ``MAX_LINE`` bytes -- gets an error answer and
changes nothing; an over-long line also closes that connection. At most
``MAX_CLIENTS`` connections are served at once (more are answered "busy" and
closed), and an idle connection is closed after ``IDLE_TIMEOUT_S``, so a
flood of clients cannot starve the runtime.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger

from storage.permissions import private_dir, runtime_dir

__all__ = ["ControlClient", "ControlServer", "ControlUnavailable", "peer_uid", "request"]

MAX_LINE = 64 * 1024
MAX_CLIENTS = 16
IDLE_TIMEOUT_S = 30.0

Handler = Callable[[bytes], dict[str, Any]]


class ControlUnavailable(ConnectionError):
    """No runtime answers on the control socket."""


class ControlServer:
    """Serves ``handler(line) -> answer dict`` on a Unix socket, one thread per client."""

    def __init__(self, path: str | os.PathLike[str], handler: Handler) -> None:
        self.path = Path(path)
        self.handler = handler
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self.refused = 0

    def start(self) -> ControlServer:
        """Bind and serve; raises ``UnsafePathError`` if the socket's directory is not ours alone."""
        # in /tmp (no XDG_RUNTIME_DIR) a planted link would redirect the socket: refuse one there
        private_dir(self.path.parent, allow_symlink=self.path.parent != runtime_dir())
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket of a crashed run (the log lock proved nobody else runs)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # no umask change here: it is per process and threads are running; the directory keeps others out
        # until the chmod, and the peer check below holds even if a mode is loosened later
        sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        sock.listen(64)
        sock.settimeout(0.5)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="control-socket", daemon=True)
        self._thread.start()
        logger.info("control socket at {}", self.path)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            uid = peer_uid(conn)
            if uid not in (os.geteuid(), 0):
                self.refused += 1
                logger.warning("control socket: refused a client of uid {} (only this user or root may connect)", uid)
                _send(conn, _error("forbidden", "only the user running Slotwise (or root) may use its control socket"))
                conn.close()
                continue
            if not self._slots.acquire(blocking=False):
                self.refused += 1
                _send(conn, {"ok": False, "error": {"code": "busy", "message": "too many control connections"}})
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="control-client", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(IDLE_TIMEOUT_S)
            buffer = b""
            while not self._stopping.is_set():
                newline = buffer.find(b"\n")
                if newline < 0:
                    if len(buffer) > MAX_LINE:
                        _send(conn, _error("too_large", f"a request line may hold at most {MAX_LINE} bytes"))
                        return
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                    continue
                line, buffer = buffer[:newline], buffer[newline + 1 :]
                if len(line) > MAX_LINE:
                    _send(conn, _error("too_large", f"a request line may hold at most {MAX_LINE} bytes"))
                    return
                if line.strip():
                    _send(conn, self._answer(line))
        except (TimeoutError, OSError):
            pass
        finally:
            conn.close()
            self._slots.release()

    def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            return _error("invalid", f"request is not UTF-8: {exc.reason} at byte {exc.start}")
        try:
            return self.handler(line)
        except Exception as exc:  # noqa: BLE001 - a handler bug must not kill the socket
            logger.exception("control request failed")
            return _error("internal", f"{type(exc).__name__}: {exc}")


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket, as the kernel saw it at connect."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _error(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        error["field"] = field
    return {"ok": False, "error": error}


def _send(conn: socket.socket, answer: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(answer, separators=(",", ":")).encode() + b"\n")


class ControlClient:
    """One connection to a runtime's control socket."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = 30.0) -> None:
        self.path = Path(path)
        with contextlib.suppress(FileNotFoundError):  # missing: the connect below says so
            owner = self.path.stat().st_uid
            if owner not in (os.geteuid(), 0):
                raise ControlUnavailable(
                    f"control socket {self.path} belongs to uid {owner}, not to this user: refusing to talk to it"
                )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise ControlUnavailable(f"no Slotwise runtime is running on {self.path.parent} (no control socket answers)") from exc
        self._sock = sock
        self._file = sock.makefile("rb")

    def call(self, payload: dict[str, Any]) -> dict[str, Any]:
        self._sock.sendall(json.dumps(payload).encode() + b"\n")
        line = self._file.readline()
        if not line:
            raise ControlUnavailable("the runtime closed the control connection")
        return json.loads(line)

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request(path: str | os.PathLike[str], payload: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    with ControlClient(path, timeout) as client:
        return client.call(payload)
