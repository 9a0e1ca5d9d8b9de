"""Hashing the event log's data files from the first moment of a start, while the interpreter still imports.

The start-up check compares every data file the newest signed checkpoint
lists with its signed size and sha256 (``storage.attest.verify_start``): on
a million-event log that is ~220 MB to read and hash, the longest step of
a start. Which files those are is only known once the checkpoints table is
read, and reading it needs pyarrow and deltalake, whose imports (with the
rest of the runtime's) take 0.3-0.5 s before anything else can happen. But
hashing needs nothing but the standard library, and hashlib releases the
GIL: so ``runtime.py run`` starts hashing every data file it finds in the
events table's directory before its imports, on a core the imports leave
idle, and the check later takes the results of the files it lists (and
cancels the rest; see :class:`EarlyHashes`).

Nothing here decides anything. The check still compares every listed file
with its signature, only with bytes read earlier in the same start (before
the log's lock, as :meth:`storage.checkpoints.FileHasher.prefetch` already
does: Delta never rewrites a file in place). This module imports only the
standard library, so that it can run before the others are imported.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

__all__ = ["EarlyHashes", "measure_local", "start_for_run"]

#: Environment values the configuration reads as false (``actors.config``'s boolean parsing).
_FALSE = {"0", "false", "no", "off"}


def measure_local(path: str | os.PathLike[str]) -> tuple[int, str]:
    """Size and sha256 of a local file, read through one buffer; raises FileNotFoundError if it is gone.

    One reused buffer, unbuffered reads: no new bytes object per MB (~12% of
    the CPU of hashing a million-event log's files). Not mmap, which would be
    cheaper still: a file truncated under it kills the process (SIGBUS)
    instead of failing the check with a size that differs.
    """
    digest = hashlib.sha256()
    size = 0
    buffer = memoryview(bytearray(1 << 20))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(buffer[:n])
            size += n
    return size, digest.hexdigest()


class EarlyHashes:
    """Every ``*.parquet`` file of ``events_dir``, being hashed in the background, largest first.

    Largest first: they are most of the work, and almost always listed. The
    directory may also hold files that compaction replaced and vacuum has
    not yet deleted (a day by default); small ones come last, so most of
    them are cancelled before they are read once the list is known.
    """

    def __init__(self, events_dir: Path, workers: int) -> None:
        self.events_dir = events_dir
        self._futures: dict[str, Future[tuple[int, str]]] = {}
        sizes = {e.name: e.stat().st_size for e in os.scandir(events_dir) if e.name.endswith(".parquet") and e.is_file()}
        names = sorted(sizes, key=lambda name: (-sizes[name], name))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="early-hash")
        for name in names:
            self._futures[name] = pool.submit(measure_local, events_dir / name)
        pool.shutdown(wait=False)  # the threads end with the queue; nothing waits for them

    def serves(self, events_dir: str | os.PathLike[str]) -> bool:
        """Whether these are the files of ``events_dir`` (the directory the runtime resolved in the end)."""
        try:
            return Path(str(events_dir).removeprefix("file://")).resolve() == self.events_dir.resolve()
        except OSError:
            return False

    def take(self, paths: Iterable[str]) -> dict[str, Future[tuple[int, str]]]:
        """The hashes begun for ``paths`` (others are hashed as usual); files not asked for are cancelled if not begun."""
        wanted = set(paths)
        for name, future in self._futures.items():
            if name not in wanted:
                future.cancel()  # e.g. files compaction replaced, waiting for vacuum: not worth a read
        return {name: future for name, future in self._futures.items() if name in wanted}


def start_for_run(data_dir_flag: str | None, config_flag: str | None, environ: Mapping[str, str]) -> EarlyHashes | None:
    """Begin hashing for ``runtime.py run`` if its data directory is already clear, else None.

    The data directory is known without the configuration module when it
    comes from ``--data-dir``, from the environment, or is the default with
    no config file named; a start that resolves it otherwise simply does not
    use these hashes (:meth:`EarlyHashes.serves`). Only a local log that has
    signed checkpoints, with start-up verification and signing not switched
    off in the environment, is hashed.
    """
    if environ.get("SLOTWISE_RUNTIME_VERIFY_ON_START", "").strip().lower() in _FALSE:
        return None
    if environ.get("SLOTWISE_AUDIT_SIGN", "").strip().lower() in _FALSE:
        return None
    data_dir = data_dir_flag or environ.get("SLOTWISE_DATA_DIR") or environ.get("SLOTWISE_RUNTIME_DATA_DIR")
    if data_dir is None:
        if config_flag is not None:
            return None
        data_dir = "./data"
    if "://" in data_dir and not data_dir.startswith("file://"):
        return None  # an object store: FileHasher reads it through delta-rs
    root = Path(data_dir.removeprefix("file://"))
    if not (root / "checkpoints").is_dir() or not (root / "events").is_dir():
        return None
    try:
        # leave a core to the imports this runs beside: on two cores, one hashing thread
        return EarlyHashes(root / "events", workers=max(1, min(8, (os.cpu_count() or 2) - 1)))
    except OSError:
        return None  # unreadable: the check reports it in its own words
