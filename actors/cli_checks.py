"""Checks of what an operator typed, made before anything is opened, bound or written.

Why a room of its own: a mistake must cost one clear line and a non-zero
exit, and leave the data directory as it was. So every check here runs
*before* the runtime opens the event log (refusing after the first append
would already have changed the log), and the argparse ``type=`` checks run
before the dependencies are imported (``--help`` works on a fresh clone).
Standard library only, for that second reason.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import socket
from pathlib import Path
from typing import NoReturn

__all__ = [
    "LOG_LEVELS",
    "OneLineParser",
    "data_dir_problem",
    "duration",
    "error_line",
    "log_file_problem",
    "log_level",
    "port_problem",
]

#: loguru's built-in levels; a name is accepted in any case (``warning`` means WARNING).
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")


def log_level(text: str) -> str:
    """argparse type of ``--log-level`` (and the check of ``SLOTWISE_LOG_LEVEL``): a loguru level name."""
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"log level {text!r} is not one of {', '.join(LOG_LEVELS)}")
    return level


def duration(text: str) -> float:
    """argparse type of ``--duration``: a finite number of seconds, 0 meaning "until stopped"."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds >= 0 (0: until stopped)")
    return value


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_line(exc: BaseException) -> str:
    """``exc``'s text on one line: delta-rs puts its chain of causes one a line, each after a coloured arrow."""
    causes = (_ANSI.sub("", line).strip().lstrip("↳").strip() for line in str(exc).splitlines())
    return ": ".join(cause.rstrip(".") for cause in causes if cause) or type(exc).__name__


def data_dir_problem(data_dir: str, *, write: bool) -> str | None:
    """Why ``data_dir`` (a local path) cannot be used, or None; URIs are left to delta-rs.

    ``write``: the runtime will create tables and a lock there, so the
    directory (or the nearest existing parent, which it would create the
    rest under) must be writable by this user. Readers only need it to be a
    directory they can read, when it exists.
    """
    if "://" in data_dir and not data_dir.startswith("file://"):
        return None
    path = Path(data_dir.removeprefix("file://"))
    if not data_dir.removeprefix("file://").strip():  # Path("") is ".": the directory we happen to be in
        return "the data directory is empty: give a path"
    if path.exists() and not path.is_dir():
        return f"data directory {path} is not a directory"
    if not write:
        # a log there but unreadable must not read as "no event log"
        if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
            return f"data directory {path} is not readable by this user"
        return None
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"data directory {path} cannot be created: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        return f"data directory {path} {what} by this user"
    return None


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on, or None: a quick bind, released at once.

    The metrics server binds again right after; this check exists so the
    refusal comes before the event log is opened, not after events were
    written.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"metrics host {host!r} cannot be resolved: {exc.strerror}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what the HTTP server sets too
        try:
            probe.bind(address)
        except OSError as exc:
            return f"metrics port {host}:{port} cannot be opened: {exc.strerror} (change [metrics] port, or enabled = false)"
    return None


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, with where to look for help.

    argparse's default prints the whole usage block before the error, and
    the line that says what went wrong drowns in it.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def log_file_problem(path: str) -> str | None:
    """Why the runtime cannot append its log to ``path``, or None (its directory is created if missing)."""
    target = Path(path)
    if target.is_dir():
        return f"log file {path} is a directory"
    if target.exists() and not os.access(target, os.W_OK):
        return f"log file {path} is not writable by this user"
    existing = target.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"log file {path} cannot be created: {existing} is not a directory"
    if not target.exists() and not os.access(existing, os.W_OK | os.X_OK):
        return f"log file {path} cannot be created: {existing} is not writable by this user"
    return None
