"""Many accounts under one root: find their data directories and read what their tables say.

One runtime serves one IB account and writes its own data directory; an
advisor's or a multi-account trader's directories sit side by side under one
root (``s3://bucket/`` or a local folder: ``<root>/<account>/events`` ...).
Everything here reads the Delta tables only, so it works with every runtime
stopped and never disturbs a running one. Folding the queue into a depth is
state, which lives above storage (``actors/fleet_view.py``).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pyarrow.fs as pafs
from deltalake.fs import DeltaStorageHandler

from storage.reader import max_seq, open_table, read_batches, table_exists
from storage.tables import is_local, table_uri

__all__ = ["LINE_LIMIT_LEARNED", "LINE_LIMIT_PROBED", "RUNTIME_STARTED", "AccountFacts", "NoAccounts", "account_facts", "find_accounts"]

#: Stored event tags read here (as JSON, so an event type this code has not imported still reads).
LINE_LIMIT_LEARNED = "router.line_limit_learned"
#: The learned limit raised by one line, to find out whether IB gives more now.
LINE_LIMIT_PROBED = "router.line_limit_probed"
RUNTIME_STARTED = "log.runtime_started"


class NoAccounts(ValueError):
    """The root holds no Slotwise data directory (or cannot be listed)."""


class AccountFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What one account's tables say, without replaying anything."""

    account: str
    data_dir: str
    last_seq: int
    #: Time of the last event (ISO-8601 UTC); None for an empty log.
    last_event_ts: str | None
    #: The newest learned line limit (``router.line_limit_learned``, or ``..._probed`` one line up), else the ``max_lines`` the newest
    #: runtime started with, else None.
    line_limit: int | None
    #: "learned" (IB's 101 said so), "configured" (no limit learned yet) or "unknown" (no runtime start logged).
    line_limit_source: str
    line_limit_reason: str = ""


def find_accounts(root: str) -> list[tuple[str, str]]:
    """``(account, data_dir)`` of every direct child of ``root`` holding an ``events`` table, by name."""
    root = root.rstrip("/") or root
    names: list[str] = []
    if is_local(root):
        base = Path(root.removeprefix("file://"))
        if not base.is_dir():
            raise NoAccounts(f"{root} is not a directory")
        names = [p.name for p in base.iterdir() if p.is_dir()]
    else:
        try:
            listing = pafs.PyFileSystem(DeltaStorageHandler(root)).get_file_info(pafs.FileSelector("", recursive=False))
        except (OSError, ValueError) as exc:
            raise NoAccounts(f"{root} cannot be listed: {_first_line(exc)}") from None
        names = [info.base_name for info in listing if info.type == pafs.FileType.Directory]
    found = []
    for name in sorted(names):
        data_dir = f"{root}/{name}"
        if table_exists(table_uri(data_dir, "events")):
            found.append((name, data_dir))
    if not found:
        raise NoAccounts(f"no Slotwise data directory (<account>/events) under {root}")
    return found


def account_facts(account: str, data_dir: str) -> AccountFacts:
    """Last seq, last event time and line limit of one account, from its events table."""
    dt = open_table(table_uri(data_dir, "events"))
    last = max_seq(dt)
    last_ts = None
    if last:
        for batch in read_batches(dt, from_seq=last, to_seq=last, columns=["ts"]):
            if batch.num_rows:
                last_ts = _iso(batch.column("ts")[0].as_py())
    learned: dict[str, object] | None = None
    started: dict[str, object] | None = None
    # the two event types are rare: the scan reads the type column of every file and little else
    wanted = [LINE_LIMIT_LEARNED, LINE_LIMIT_PROBED, RUNTIME_STARTED]
    for batch in read_batches(dt, types=wanted, columns=["type", "payload"]):
        for tag, payload in zip(batch.column("type").to_pylist(), batch.column("payload").to_pylist(), strict=True):
            fields = msgspec.json.decode(payload)
            if tag == LINE_LIMIT_PROBED:
                learned = {**fields, "reason": f"probed upward from {fields.get('previous')}"}
            elif tag == LINE_LIMIT_LEARNED:
                learned = fields
            else:
                started = fields
    if learned is not None:
        limit, source, reason = _int(learned.get("limit")), "learned", str(learned.get("reason") or "")
    elif started is not None:
        limit, source, reason = _int(started.get("max_lines")), "configured", ""
    else:
        limit, source, reason = None, "unknown", ""
    return AccountFacts(
        account=account,
        data_dir=data_dir,
        last_seq=last,
        last_event_ts=last_ts,
        line_limit=limit,
        line_limit_source=source,
        line_limit_reason=reason,
    )


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _iso(value: datetime) -> str:
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat(timespec="microseconds")


def _first_line(exc: BaseException) -> str:
    """delta-rs's object-store errors span many lines (ANSI arrows, XML): the first and the cause."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip(" \u21b3") for line in text.splitlines() if line.strip(" \u21b3")]
    if not lines:
        return type(exc).__name__
    message = re.search(r"<Message>(.*?)</Message>", text)
    cause = message.group(1) if message else lines[-1]
    return lines[0] if cause == lines[0] else f"{lines[0]}: {cause}"
