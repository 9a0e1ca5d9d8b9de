"""The single-writer lock on a data directory.

Two runtimes appending to one log would interleave seqs and fork the hash
chain. An exclusive ``flock`` on ``<data dir>/.slotwise.lock`` makes the
second opener fail at once; the file names the holder (pid, host, start
time) so the message can say who holds it. The kernel drops the lock when
the holder dies, even by SIGKILL, so a crash never leaves a stale lock.

Object storage has no such lock: there the log relies on its
compare-and-swap commit (``max_commit_retries=0``) to fence a second writer.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

__all__ = ["DataDirLocked", "DirectoryLock"]


class DataDirLocked(RuntimeError):
    """Another process holds the data directory."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(
            f"data directory {path.parent} is in use by another Slotwise process ({holder}); stop it first"
        )
        self.path = path
        self.holder = holder


class DirectoryLock:
    """An exclusive, non-blocking, crash-safe lock on one directory."""

    FILENAME = ".slotwise.lock"

    def __init__(self, directory: str | os.PathLike[str], purpose: str = "writer") -> None:
        self.path = Path(directory) / self.FILENAME
        self.purpose = purpose
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._describe_holder(fd)
            os.close(fd)
            raise DataDirLocked(self.path, holder) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "purpose": self.purpose,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    @staticmethod
    def _describe_holder(fd: int) -> str:
        try:
            raw = os.pread(fd, 4096, 0)
            info = json.loads(raw or b"{}")
            return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"
        except (OSError, ValueError):
            return "holder unknown"

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
