"""The operator's commands ``contracts`` and ``queue``: their arguments, their control-socket answers, their output.

    python runtime.py contracts [--json] [--path stream|queue|overflow|portfolio]
                                [--stale-over SECONDS] [--offline] [--data-dir DIR]
    python runtime.py queue dead-letters [--json] [--offline] [--data-dir DIR]
    python runtime.py queue requeue CONID [CONID ...] [--data-dir DIR]

Why a module apart from ``runtime.py``: the composition root wires actors;
what an operator reads and types here is its own concern. Argument parsing
uses the standard library only (``--help`` must work before ``pip install``);
everything else is imported where it is used.

Both sides of the control socket are here: :func:`answer_control` runs in
the runtime (the requests ``contracts`` and ``queue.dead_letters``, asking
the router, registry and queue), the ``cmd_*`` functions run in the CLI.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["CONTROL_REQUESTS", "add_parsers", "answer_control", "cmd_contracts", "cmd_queue"]

#: Control-socket request types this module answers (besides the msgspec commands).
CONTROL_REQUESTS = ("contracts", "queue.dead_letters")

EXIT_OK, EXIT_FAILED = 0, 1

CallRuntime = Callable[[str, dict[str, Any]], dict[str, Any] | None]


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number of seconds >= 0")
    return value


def _conid(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a contract id (a positive integer)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a contract id (a positive integer)")
    return value


def add_parsers(sub: Any, data_dir_arg: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``contracts`` and ``queue`` to the command line's subparsers."""
    contracts = sub.add_parser("contracts", help="one row per known contract: path, data type, quote age, last error")
    contracts.add_argument("--json", action="store_true", help="one JSON object with every row")
    contracts.add_argument("--path", choices=("stream", "queue", "overflow", "portfolio"), help="only contracts on this path")
    contracts.add_argument("--stale-over", type=_seconds, metavar="SECONDS", help="only contracts whose quote is older (or missing)")
    contracts.add_argument("--offline", action="store_true", help="read the tables instead of asking the running runtime (works with it stopped)")
    data_dir_arg(contracts)

    queue = sub.add_parser("queue", help="dead-lettered queue items: list them, put them back")
    queue_sub = queue.add_subparsers(dest="queue_command", required=True)
    dead = queue_sub.add_parser("dead-letters", help="items that failed max_attempts times and wait for an operator")
    dead.add_argument("--json", action="store_true")
    dead.add_argument("--offline", action="store_true", help="read the event log instead of asking the running runtime")
    data_dir_arg(dead)
    requeue = queue_sub.add_parser("requeue", help="put dead-lettered contracts back into the queue, attempts reset")
    requeue.add_argument("conids", nargs="+", type=_conid, metavar="CONID")
    data_dir_arg(requeue)


# ---------------------------------------------------------------------- runtime side


def answer_control(raw: Mapping[str, Any], refs: Mapping[str, Any]) -> dict[str, Any]:
    """Answer a ``contracts`` or ``queue.dead_letters`` request from the running actors."""
    from actors.messaging import ask
    from events.registry import ListActive
    from events.router import ContractsQuery

    if set(raw) - {"type"}:
        return _error("invalid", f"{raw['type']} takes no fields", sorted(set(raw) - {"type"})[0])
    if raw["type"] == "contracts":
        from actors.contracts_view import online_rows

        try:
            reply = ask(refs["router"], ContractsQuery(), timeout=10)
        except TypeError as exc:  # a router that does not know the query
            return _error("unsupported", f"the router does not answer contracts: {exc}")
        registry = ask(refs["registry"], ListActive(), timeout=10).registry
        return {"ok": True, "reply": online_rows(reply, registry)}
    summary = refs["queue"].proxy().summary(True).get(timeout=10)
    return {"ok": True, "reply": {"items": [item for item in summary["items"] if item["status"] == "FAILED"]}}


def _error(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if field:
        error["field"] = field
    return {"ok": False, "error": error}


# ---------------------------------------------------------------------- CLI side


def _ask(call_runtime: CallRuntime, data_dir: str, payload: dict[str, Any]) -> dict[str, Any] | None:
    """The reply, or None after saying on stderr why there is none."""
    answer = call_runtime(data_dir, payload)
    if answer is None:
        return None
    if not answer["ok"]:
        print(f"error: {answer['error']['message']}", file=sys.stderr)
        return None
    return answer["reply"]


def _offline_view(config: Any) -> dict[str, Any] | None:
    from storage.reader import table_exists
    from storage.tables import table_uri

    uri = table_uri(config.runtime.data_dir, "events")
    if not table_exists(uri):
        print(f"error: no event log at {uri}", file=sys.stderr)
        return None
    from actors.contracts_view import offline_rows

    fresh = config.freshness
    return offline_rows(config.runtime.data_dir, monitoring_s=fresh.monitoring_s, overflow_s=fresh.overflow_s)


def cmd_contracts(args: argparse.Namespace, config: Any, call_runtime: CallRuntime) -> int:
    """One row per known contract, from the running runtime or (``--offline``) the tables."""
    from actors.contracts_view import filter_rows, render_table

    view = _offline_view(config) if args.offline else _ask(call_runtime, config.runtime.data_dir, {"type": "contracts"})
    if view is None:
        return EXIT_FAILED
    rows = filter_rows(view["rows"], path=args.path, stale_over=args.stale_over)
    if args.json:
        print(json.dumps({**view, "rows": rows}, sort_keys=True))
        return EXIT_OK
    if view["source"] == "tables":
        print(f"from the tables, as of seq {view['seq']} ({view['as_of'] or 'empty log'}); ages are counted to now")
    for line in render_table(rows, len(view["rows"])):
        print(line)
    return EXIT_OK


def cmd_queue(args: argparse.Namespace, config: Any, call_runtime: CallRuntime) -> int:
    data_dir = config.runtime.data_dir
    if args.queue_command == "dead-letters":
        return _dead_letters(args, config, call_runtime)
    listing = _ask(call_runtime, data_dir, {"type": "queue.dead_letters"})
    if listing is None:
        return EXIT_FAILED
    dead = {item["conid"] for item in listing["items"]}
    unknown = [c for c in dict.fromkeys(args.conids) if c not in dead]
    if unknown:
        names = ", ".join(str(c) for c in unknown)
        print(f"error: no dead-lettered item for {names} ('queue dead-letters' lists them); nothing was requeued", file=sys.stderr)
        return EXIT_FAILED
    failed = 0
    for conid in dict.fromkeys(args.conids):
        reply = _ask(call_runtime, data_dir, {"type": "queue.requeue", "conid": conid, "reason": "operator requeue"})
        if reply is None:
            failed += 1
        elif reply["changed"]:
            print(f"{conid}: back in the queue, attempts reset")
        else:
            failed += 1
            print(f"error: {conid}: not requeued: {reply['ignored'].get(str(conid), 'unchanged')}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def _dead_letters(args: argparse.Namespace, config: Any, call_runtime: CallRuntime) -> int:
    if args.offline:
        view = _offline_dead_letters(config.runtime.data_dir)
    else:
        view = _ask(call_runtime, config.runtime.data_dir, {"type": "queue.dead_letters"})
    if view is None:
        return EXIT_FAILED
    items = view["items"]
    if args.json:
        print(json.dumps(items, sort_keys=True))
        return EXIT_OK
    for item in items:
        print(f"{item['conid']:>12}  item {item['item_id']}: failed after attempt {item['attempt']}: {item['last_error']}")
    print(f"{len(items)} dead letters" + (": 'queue requeue CONID ...' puts them back" if items else ""))
    return EXIT_OK


def _offline_dead_letters(data_dir: str) -> dict[str, Any] | None:
    from storage.reader import table_exists
    from storage.replay import replay
    from storage.tables import table_uri

    uri = table_uri(data_dir, "events")
    if not table_exists(uri):
        print(f"error: no event log at {uri}", file=sys.stderr)
        return None
    items = replay(data_dir).queue.summary(items=True)["items"]
    return {"items": [item for item in items if item["status"] == "FAILED"]}
