"""The operator's view through the command line: ``contracts``, ``queue dead-letters`` and ``queue requeue``.

One small demo runtime serves the module: six lines for more active legs
than that, so streams, overflow and queue all show, and one attempt before
a dead letter, so an unknown contract is dead-lettered at once. Every check
runs the CLI as a subprocess and waits on what it prints, with a deadline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.contracts_view import PATHS, ROW_FIELDS
from actors.fake_ib_demo import demo_positions
from tests.integration.test_end_to_end import RUNTIME, RuntimeProc, cli, wait_for

STOCKS, STRATEGIES, ACTIVE = 20, 5, 3
MAX_LINES = 6
#: A contract the simulated account does not know: IB answers 200 ("no security definition").
UNKNOWN_CONID = 265598
CONFIG = f"""
[runtime]
max_lines = {MAX_LINES}
max_attempts = 1
status_interval_s = 60.0
[demo]
stocks = {STOCKS}
option_strategies = {STRATEGIES}
active_strategies = {ACTIVE}
tick_interval_s = 0.2
default_duration_s = 0.0
[positions]
flush_interval_s = 0.2
"""
HELD = {p.conid for p in demo_positions(STOCKS, STRATEGIES, 7)}


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProc]:
    root = tmp_path_factory.mktemp("operator")
    config = root / "c.toml"
    config.write_text(CONFIG)
    rt = RuntimeProc(root / "data", config)
    try:
        rt.wait_connected()
        yield rt
    finally:
        rt.close()


def contracts(rt: RuntimeProc, *args: str) -> dict[str, Any]:
    result = cli("contracts", "--json", *args, *rt.dir_args())
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_rows(rt: RuntimeProc, what: str, check: Callable[[list[dict[str, Any]]], bool], *args: str) -> list[dict[str, Any]]:
    def rows() -> list[dict[str, Any]] | None:
        view = contracts(rt, *args)
        return view["rows"] if check(view["rows"]) else None

    return wait_for(rows, 60, what, interval=0.3)


def _every_path_priced(rows: list[dict[str, Any]]) -> bool:
    priced = {r["path"] for r in rows if r["age_s"] is not None}
    return {"stream", "overflow", "queue"} <= priced


def test_contracts_shows_every_contract_on_its_path_with_its_quote_age(running: RuntimeProc) -> None:
    rows = wait_rows(running, "streams, overflow and queue rows all priced", _every_path_priced)
    registry = json.loads(cli("registry", "list", "--json", *running.dir_args()).stdout)
    by_conid = {r["conid"]: r for r in rows}
    assert set(HELD) <= set(by_conid)
    for row in rows:
        assert set(row) == set(ROW_FIELDS), row
        assert row["path"] in PATHS
    for conid, strategies in registry.items():
        row = by_conid[int(conid)]
        assert row["active"] is True
        assert row["strategies"] == sorted(strategies)
        assert row["path"] in ("stream", "overflow", "portfolio")
    assert 0 < sum(r["path"] == "stream" for r in rows) < MAX_LINES
    for row in rows:
        if row["path"] == "queue":
            assert row["active"] is False
            assert row["strategies"] == []
        if row["age_s"] is not None:
            assert row["source"] in ("stream", "queue", "portfolio")
            assert row["data_type"]


def test_path_and_staleness_filters_and_the_table(running: RuntimeProc) -> None:
    wait_rows(running, "every path priced", _every_path_priced)
    streams = contracts(running, "--path", "stream")["rows"]
    assert streams
    assert {r["path"] for r in streams} == {"stream"}
    # an hour: only what was never priced, or priced longer ago than that
    stale = contracts(running, "--stale-over", "3600")["rows"]
    assert all(r["age_s"] is None or r["age_s"] > 3600 for r in stale)
    table = cli("contracts", "--path", "overflow", *running.dir_args())
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["CONID", "SYMBOL", "STRATEGY", "PATH"]
    body = lines[1:-1]
    assert body
    assert all(line.split()[0].isdigit() and " overflow " in line for line in body)
    assert lines[-1].startswith(f"{len(body)} of ")


def test_offline_reads_the_same_contracts_from_the_tables(running: RuntimeProc) -> None:
    online = {r["conid"]: r for r in wait_rows(running, "every path priced", _every_path_priced)}
    view = contracts(running, "--offline")
    assert view["source"] == "tables"
    assert view["seq"] > 0
    offline = {r["conid"]: r for r in view["rows"]}
    for row in offline.values():
        assert set(row) == set(ROW_FIELDS), row
    assert set(HELD) <= set(offline)
    for conid, row in online.items():
        if row["active"]:
            assert offline[conid]["active"] is True
            assert offline[conid]["strategies"] == row["strategies"]
    held_priced = [r for r in offline.values() if r["conid"] in HELD and r["age_s"] is not None]
    assert held_priced, "the positions table gives held contracts a quote time"
    assert all(r["symbol"] for r in held_priced)
    assert any(r["path"] == "stream" for r in offline.values())


# about a dozen CLI runs, each a cold Python start importing deltalake and pyarrow: 19 s in one suite run
# on a 2-core machine, 61 s in one with more load, half the suite's 120 s hang limit
@pytest.mark.timeout(300)
def test_a_dead_letter_is_listed_shown_and_requeued(running: RuntimeProc) -> None:
    added = cli("registry", "add", str(UNKNOWN_CONID), "--strategy", "spx-ic", *running.dir_args())
    assert added.returncode == 0, added.stderr

    def dead() -> list[dict[str, Any]] | None:
        result = cli("queue", "dead-letters", "--json", *running.dir_args())
        assert result.returncode == 0, result.stderr
        items = [i for i in json.loads(result.stdout) if i["conid"] == UNKNOWN_CONID]
        return items or None

    [item] = wait_for(dead, 60, f"{UNKNOWN_CONID} dead-lettered", interval=0.3)
    assert item["status"] == "FAILED"
    row = next(r for r in contracts(running)["rows"] if r["conid"] == UNKNOWN_CONID)
    assert row["last_error"], row
    assert row["strategies"] == ["spx-ic"]
    listing = cli("queue", "dead-letters", *running.dir_args())
    assert str(UNKNOWN_CONID) in listing.stdout
    offline = cli("queue", "dead-letters", "--offline", "--json", *running.dir_args())
    assert offline.returncode == 0, offline.stderr
    assert item["item_id"] in [i["item_id"] for i in json.loads(offline.stdout) if i["status"] == "FAILED"]

    def requeued_events() -> list[dict[str, Any]]:
        """The dead letter back: requeued, or (an item already waiting) merged into the waiting one."""
        audit = cli(
            "audit", "--conid", str(UNKNOWN_CONID), "--type", "queue.item_requeued", "--type", "queue.item_cancelled",
            "--format", "jsonl", *running.dir_args(),
        )  # fmt: skip
        events = [json.loads(line) for line in audit.stdout.splitlines()]
        return [e for e in events if e["type"] == "queue.item_requeued" or e["reason"].startswith("requeue: merged")]

    refused = cli("queue", "requeue", "424242", str(UNKNOWN_CONID), *running.dir_args())
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "error: no dead-lettered item for 424242 ('queue dead-letters' lists them); nothing was requeued"
    ]
    assert requeued_events() == []
    done = cli("queue", "requeue", str(UNKNOWN_CONID), *running.dir_args())
    assert done.returncode == 0, done.stderr
    assert f"{UNKNOWN_CONID}: back in the queue" in done.stdout
    [event] = wait_for(requeued_events, 30, "the requeue in the log")
    assert event["item_id"] == item["item_id"]


@pytest.mark.parametrize("args", [["registry", "list"], ["status"], ["contracts"], ["queue", "dead-letters"]])
def test_a_closed_stdout_is_not_an_error(running: RuntimeProc, args: list[str]) -> None:
    """``... | head``: the reader left; the command stops quietly with exit 0."""
    proc = subprocess.Popen(
        [sys.executable, str(RUNTIME), *args, *running.dir_args()],
        cwd=Path(RUNTIME).parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # before the command writes a byte: its first write meets a closed pipe
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err
    assert err.strip() == b"", err.decode()
