"""``python runtime.py fleet --root ROOT [--json]``: every account under a root, from its tables.

    python runtime.py fleet --root s3://bucket/ [--json]
    python runtime.py fleet --root /srv/slotwise [--json]

One runtime per IB account, each with its own data directory under one root
(DESIGN.md section 6). This lists every account there with its last seq,
the time of its last event, its line limit (learned from IB's 101, else the
configured one) and its queue depth, with no runtime running and none
disturbed. The table facts come from :mod:`storage.fleet`; the queue depth
is a replay of the queue's events through the queue's own state class,
which is why this lives above storage. Argument parsing needs the standard
library only (``--help`` works before ``pip install``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_parser", "cmd_fleet", "fleet_rows"]

EXIT_OK, EXIT_FAILED = 0, 1


def add_parser(sub: Any) -> None:
    """Add ``fleet`` to the command line's subparsers."""
    fleet = sub.add_parser("fleet", help="every account under a root: last seq, last event, line limit, queue depth")
    fleet.add_argument("--root", required=True, help="folder or delta-rs URI holding one data directory per account")
    fleet.add_argument("--json", action="store_true", help="one JSON object: root and a row per account")


def fleet_rows(root: str) -> list[dict[str, Any]]:
    """One row per account under ``root``; an account whose tables cannot be read gets an ``error``."""
    from storage.fleet import account_facts, find_accounts
    from storage.replay import replay

    rows = []
    for account, data_dir in find_accounts(root):
        try:
            facts = account_facts(account, data_dir)
            queue = replay(data_dir, seq=facts.last_seq).to_json(items=False)["queue"]
        except Exception as exc:  # noqa: BLE001 - one damaged account must not hide the others
            rows.append({"account": account, "data_dir": data_dir, "error": _one_line(exc)})
            continue
        row = {f: getattr(facts, f) for f in facts.__struct_fields__}
        row["queue"] = {k: queue[k] for k in ("pending", "processing", "failed")}
        rows.append(row)
    return rows


def cmd_fleet(args: argparse.Namespace, _config: Any = None) -> int:
    """Print the fleet; exit 1 (after printing the rest) if the root is empty or an account is unreadable."""
    from storage.fleet import NoAccounts

    try:
        rows = fleet_rows(args.root)
    except NoAccounts as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps({"root": args.root, "accounts": rows}, sort_keys=True))
    else:
        print(f"{'account':20} {'last seq':>10}  {'last event (UTC)':27} {'line limit':>18}  {'queue pending/processing/failed'}")
        for row in rows:
            if "error" in row:
                print(f"{row['account']:20} unreadable: {row['error']}")
                continue
            limit = "?" if row["line_limit"] is None else str(row["line_limit"])
            q = row["queue"]
            print(
                f"{row['account']:20} {row['last_seq']:>10}  {(row['last_event_ts'] or '-')[:26]:27} "
                f"{limit + ' (' + row['line_limit_source'] + ')':>18}  {q['pending']}/{q['processing']}/{q['failed']}"
            )
    broken = [row["account"] for row in rows if "error" in row]
    if broken:
        print(f"error: {len(broken)} account(s) could not be read: {', '.join(broken)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
