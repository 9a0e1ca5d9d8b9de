"""Owner-only by default: the process umask, the data directory, and the control socket's directory.

The event log and the positions table hold the account's whole history and
its P&L; the control socket changes what the runtime streams. None of it is
for other local users. Three rules:

* :func:`set_private_umask` once at start-up, before any thread exists:
  the umask is per process, so changing it later (as the control socket
  once did around its ``bind``) races every thread creating files then.
  With ``077`` every file delta-rs writes is 0600 and every directory 0700.
* :func:`private_dir` makes a directory ours alone: created 0700, an
  existing one of ours tightened to 0700, and one owned by anybody else (or
  a symbolic link, where an attacker could point it) refused.
* :func:`runtime_dir` is where the socket of an object-store data dir goes:
  ``$XDG_RUNTIME_DIR/slotwise`` (a per-user 0700 tmpfs), else
  ``/tmp/slotwise-<uid>``, which :func:`private_dir` refuses if someone else
  created it first.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["PRIVATE_UMASK", "UnsafePathError", "private_dir", "runtime_dir", "set_private_umask"]

PRIVATE_UMASK = 0o077


class UnsafePathError(PermissionError):
    """A path another user controls, where this process would put private data."""


def set_private_umask() -> None:
    """Files 0600, directories 0700 from now on: the first thing ``runtime.main`` does, before any thread.

    Set once and never restored: a umask changed and changed back while
    threads run gives whatever they create meanwhile the wrong mode.
    """
    os.umask(PRIVATE_UMASK)


def private_dir(path: Path, *, allow_symlink: bool = True) -> Path:
    """Create ``path`` 0700, or check an existing one is ours and tighten it to 0700.

    ``allow_symlink=False`` for directories in shared places (``/tmp``),
    where a link planted by another user would redirect what we create.
    Root may use a directory of another user (an operator's maintenance);
    anyone else may not.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        if not allow_symlink:
            raise UnsafePathError(f"{path} is a symbolic link; refusing to keep private files behind it")
        info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePathError(f"{path} is not a directory")
    me = os.geteuid()
    if info.st_uid != me:
        if me == 0:
            return path
        raise UnsafePathError(f"{path} belongs to uid {info.st_uid}, not to this user (uid {me}); refusing it")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


def runtime_dir() -> Path:
    """The per-user directory for sockets that cannot live in the data dir (object-store data dirs)."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "slotwise"
    return Path("/tmp") / f"slotwise-{os.geteuid()}"  # made 0700 and ownership-checked by private_dir
