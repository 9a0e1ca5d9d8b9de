"""One writer per data directory on object storage, where no lock file reaches.

On a local disk the ``flock`` of :mod:`storage.lock` refuses a second
runtime at once. S3, GCS and Azure have no such lock; what they have is
Delta's conditional commit (``If-None-Match: *`` on S3): a writer whose
table moved under it cannot commit (``max_commit_retries=0``), so two
writers never interleave one history. That alone would let a newcomer win
and stop the runtime that was there first, at its next commit. So opening
the log also looks at the table's newest commit:

* written by a writer that then released the table (an empty commit tagged
  ``slotwise.op = release``, made by :func:`release` at a clean close): free;
* written by another writer less than ``takeover_after_s`` ago: refused with
  :class:`DataDirInUse`, naming that writer and how long ago it committed;
* older: its writer is taken to be dead (a SIGKILL leaves no release) and the
  table is taken over. Should it be alive after all, only idle, its next
  commit fails the conditional commit and it stops with ``LogFencedError``:
  one history either way, and the refusal is only the courteous first line.

Ages come from the commit's timestamp (the writer's clock): hosts sharing a
bucket need their clocks within a small fraction of ``takeover_after_s``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError
from deltalake.transaction import CommitProperties

from storage.lock import DataDirLocked
from storage.maintenance import WRITER_KEY

__all__ = ["OP_KEY", "RELEASE", "DataDirInUse", "refuse_live_writer", "release"]

#: Commit metadata key naming what a Slotwise commit did besides appending events.
OP_KEY = "slotwise.op"
RELEASE = "release"


class DataDirInUse(DataDirLocked):
    """Another writer committed to this object-storage log recently."""

    def __init__(self, data_dir: str, holder: str, takeover_after_s: float) -> None:
        RuntimeError.__init__(
            self,
            f"data directory {data_dir} is in use by another Slotwise writer ({holder}); stop it first "
            f"(a writer that died is taken over {takeover_after_s:g} s after its last commit: log.takeover_after_s)",
        )
        self.path = Path(data_dir)
        self.holder = holder


def refuse_live_writer(
    dt: DeltaTable, data_dir: str, writer_id: str, takeover_after_s: float, now_s: float | None = None
) -> None:
    """Raise :class:`DataDirInUse` if another writer committed to ``dt`` within ``takeover_after_s``."""
    history = dt.history(limit=1)
    if not history:
        return
    newest = history[0]
    holder = newest.get(WRITER_KEY)
    if holder is None or holder == writer_id or newest.get(OP_KEY) == RELEASE:
        return
    age_s = (time.time() if now_s is None else now_s) - int(newest.get("timestamp", 0)) / 1000
    if age_s < takeover_after_s:
        raise DataDirInUse(data_dir, f"writer {holder}, last commit {max(age_s, 0.0):.1f} s ago", takeover_after_s)


def release(dt: DeltaTable, writer_id: str, schema: pa.Schema) -> bool:
    """Commit "released by ``writer_id``" (no rows) so the next writer need not wait; False if fenced.

    A conditional commit like every other one of the writer: if someone else
    committed since, the table is no longer ours to release.
    """
    try:
        write_deltalake(
            dt,
            schema.empty_table(),
            mode="append",
            commit_properties=CommitProperties(
                max_commit_retries=0, custom_metadata={WRITER_KEY: writer_id, OP_KEY: RELEASE}
            ),
        )
    except CommitFailedError:
        return False
    return True
