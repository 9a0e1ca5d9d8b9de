"""The operator commands of DESIGN.md section 5, run as an operator runs them: subprocesses on a real log.

One demo run per module writes the log (with two contracts the fake IB
refuses, so there are retries and dead letters to audit) and serves
``status`` and the Prometheus endpoint while it runs; every other command
reads what it left. Two more logs are made by hand: a tampered copy (one
payload edited inside a Parquet file of the events table, the Delta log left
pointing at it) and a log written under the version-1 schema of the queue's
failure events, which ``replay`` and ``audit`` must show in today's shape.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

from events.codec import encode_event
from events.queue import ItemClaimed, ItemEnqueued
from events.registry import ContractActivated, LegAdded
from storage.hashing import GENESIS_HASH, row_hash
from storage.tables import EVENTS_SCHEMA
from tests.support.collector import CollectorTimeout, wait_until

ROOT = Path(__file__).resolve().parents[2]
#: Stocks of the demo account the fake IB answers with an error that no retry can help (no contract, no
#: subscription): they are dead-lettered at their first failure.
REFUSED = {100003: 200, 100011: 354}

#: The demo, with the fake IB refusing REFUSED. The runtime has no flag for injected faults, so the
#: settings class is wrapped before ``runtime.main`` builds the graph (it imports it at start).
DEMO = f"""
import sys
import actors.fake_ib as fake
_settings = fake.FakeIbSettings
def settings(**kw):
    kw.setdefault("errors", {REFUSED!r})
    return _settings(**kw)
fake.FakeIbSettings = settings
import runtime
sys.exit(runtime.main(sys.argv[1:]))
"""


def cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "runtime.py"), *args, "--data-dir", str(data_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def jsonl(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@dataclass
class Demo:
    data_dir: Path
    status_json: dict[str, Any]
    status_text: str
    metrics: str
    metrics_content_type: str
    live_replay: dict[str, Any]
    rc: int
    stderr: str
    events: list[dict[str, Any]]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    tmp = tmp_path_factory.mktemp("audit")
    data_dir = tmp / "data"
    log_file = tmp / "slotwise.log"
    config = tmp / "small.toml"
    # port 0: the runtime binds a free port itself and logs which (a port picked here and released
    # could be taken by another process before the runtime bound it)
    config.write_text(
        "[runtime]\nmax_attempts = 2\nretry_backoff_s = 0.2\n"
        "status_interval_s = 2.0\nsnapshot_every = 200\n\n"
        "[metrics]\nenabled = true\nport = 0\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            DEMO,
            "--demo",
            "--data-dir",
            str(data_dir),
            "--config",
            str(config),
            "--log-file",
            str(log_file),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        status: dict[str, Any] = {}

        def dead_lettered() -> bool:
            if (data_dir / "slotwise.sock").exists():
                answer = cli("status", "--json", data_dir=data_dir)
                if answer.returncode == 0:
                    status.update(json.loads(answer.stdout))
            return status.get("dead_letters") == len(REFUSED)

        with contextlib.suppress(CollectorTimeout):
            wait_until(dead_lettered, 60, 0.3, what="the refused contracts to be dead-lettered")
        assert status.get("dead_letters") == len(REFUSED), status
        status_text = cli("status", data_dir=data_dir).stdout
        served = re.search(r"metrics at (http://\S+/metrics)", log_file.read_text())  # logged before it serves status
        assert served, log_file.read_text()[-3000:]
        with urllib.request.urlopen(served[1], timeout=10) as response:
            metrics, content_type = response.read().decode(), response.headers["Content-Type"]
        live = cli("replay", "--json", data_dir=data_dir)
        assert live.returncode == 0, live.stderr
        # stopped once asked, not after a fixed --duration: on a loaded machine a run of a few seconds
        # could end before the status and metrics above were read
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    everything = cli("audit", "--format", "jsonl", data_dir=data_dir)
    assert everything.returncode == 0, everything.stderr
    return Demo(
        data_dir=data_dir,
        status_json=status,
        status_text=status_text,
        metrics=metrics,
        metrics_content_type=content_type,
        live_replay=json.loads(live.stdout),
        rc=proc.returncode,
        stderr=stderr,
        events=jsonl(everything.stdout),
    )


# ---------------------------------------------------------------------- status and metrics (while running)


def test_the_demo_ran_and_stopped_cleanly(demo: Demo) -> None:
    assert demo.rc == 0, demo.stderr[-2000:]
    assert [e["seq"] for e in demo.events] == list(range(1, len(demo.events) + 1))


def test_status_json_from_the_running_runtime(demo: Demo) -> None:
    s = demo.status_json
    assert s["max_lines"] == 100
    assert 0 < s["lines_in_use"] <= s["max_lines"]
    assert s["streams"] <= s["stream_budget"] == 98  # 100 lines less the 2 always kept for snapshots
    assert s["line_limit"] == 100
    assert s["freshness"]["ages"]["stream"]["count"] == s["streams"]
    assert set(s["queue"]) >= {"pending", "processing", "failed"}
    assert s["dead_letters"] == s["queue"]["failed"] == len(REFUSED)
    assert s["last_seq"] > 0
    assert s["ib"]["connected"] is True
    assert isinstance(s["events_per_s"], float)
    assert s["uptime_s"] > 0


def test_status_text(demo: Demo) -> None:
    text = demo.status_text
    for label in ("uptime", "IB", "lines in use", "queue", "dead letters", "event log"):
        assert label in text
    assert "of 100" in text
    assert "age stream" in text


def test_status_without_a_runtime_says_so(demo: Demo) -> None:
    answer = cli("status", data_dir=demo.data_dir)
    assert answer.returncode == 1
    assert "error:" in answer.stderr
    assert "Traceback" not in answer.stderr


def test_the_runtime_served_prometheus_metrics(demo: Demo) -> None:
    assert demo.metrics_content_type.startswith("text/plain; version=0.0.4")
    samples = dict(line.rsplit(" ", 1) for line in demo.metrics.splitlines() if not line.startswith("#"))
    assert float(samples["slotwise_lines_budget"]) == 100
    assert float(samples["slotwise_dead_letters"]) == len(REFUSED)
    assert float(samples['slotwise_queue_items{status="failed"}']) == len(REFUSED)
    assert float(samples["slotwise_ib_connected"]) == 1
    assert float(samples["slotwise_events_appended_total"]) > 0
    assert "# TYPE slotwise_events_appended_total counter" in demo.metrics


def test_replay_of_the_live_log(demo: Demo) -> None:
    live = demo.live_replay
    assert 0 < live["seq"] <= len(demo.events)
    assert live["queue"]["failed"] == len(REFUSED)


# ---------------------------------------------------------------------- replay


def _counts(queue: dict[str, Any]) -> tuple[int, int, int]:
    by_status = [i["status"] for i in queue["items"]]
    return by_status.count("PENDING"), by_status.count("PROCESSING"), by_status.count("FAILED")


def test_replay_json_now(demo: Demo) -> None:
    answer = cli("replay", "--json", data_dir=demo.data_dir)
    assert answer.returncode == 0, answer.stderr
    [line] = answer.stdout.splitlines()  # one JSON object
    state = json.loads(line)
    assert state["seq"] == len(demo.events)
    activated = {e["key"] for e in demo.events if e["type"] == "registry.contract_activated"}
    assert set(state["registry"]) == activated
    assert all(isinstance(v, list) and v for v in state["registry"].values())
    queue = state["queue"]
    assert (queue["pending"], queue["processing"], queue["failed"]) == _counts(queue)
    dead = {i["conid"]: i for i in queue["items"] if i["status"] == "FAILED"}
    assert {c: i["code"] for c, i in dead.items()} == REFUSED
    assert all(i["failures"] == 1 for i in dead.values())  # terminal: no retry storm


def test_replay_readable(demo: Demo) -> None:
    answer = cli("replay", data_dir=demo.data_dir)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.startswith(f"state after seq {len(demo.events)} ")
    assert "active contracts" in answer.stdout
    for conid, code in REFUSED.items():
        assert f"dead letter {conid} " in answer.stdout
        assert f"(IB {code})" in answer.stdout


def test_replay_seq(demo: Demo) -> None:
    first_dead = next(e["seq"] for e in demo.events if e["type"] == "queue.item_dead_lettered")
    before = json.loads(cli("replay", "--json", "--seq", str(first_dead - 1), data_dir=demo.data_dir).stdout)
    after = json.loads(cli("replay", "--json", "--seq", str(first_dead), data_dir=demo.data_dir).stdout)
    assert (before["seq"], after["seq"]) == (first_dead - 1, first_dead)
    assert after["queue"]["failed"] == before["queue"]["failed"] + 1
    past = cli("replay", "--seq", str(len(demo.events) + 1), data_dir=demo.data_dir)
    assert past.returncode == 1
    assert f"ends at seq {len(demo.events)}" in past.stderr


def test_replay_as_of(demo: Demo) -> None:
    claimed = next(e for e in demo.events if e["type"] == "queue.item_claimed")
    expected = max(e["seq"] for e in demo.events if e["ts"] <= claimed["ts"])
    state = json.loads(cli("replay", "--json", "--as-of", claimed["ts"], data_dir=demo.data_dir).stdout)
    assert state["seq"] == expected
    assert state["queue"]["processing"] >= 1  # the log says claimed at that time, so does replay
    early = json.loads(cli("replay", "--json", "--as-of", "2001-01-01T00:00:00Z", data_dir=demo.data_dir).stdout)
    assert (early["seq"], early["registry"]) == (0, {})
    bad = cli("replay", "--as-of", "yesterday", data_dir=demo.data_dir)
    assert bad.returncode == 2
    assert "ISO-8601" in bad.stderr


# ---------------------------------------------------------------------- audit


def test_audit_jsonl_of_one_contract(demo: Demo) -> None:
    conid = next(iter(REFUSED))
    answer = cli("audit", "--conid", str(conid), "--format", "jsonl", data_dir=demo.data_dir)
    assert answer.returncode == 0, answer.stderr
    rows = jsonl(answer.stdout)
    assert rows == [e for e in demo.events if e["key"] == str(conid)]
    assert {r["key"] for r in rows} == {str(conid)}
    assert all({"seq", "ts", "type", "key", "conid"} <= set(r) for r in rows)
    types = [r["type"] for r in rows]
    assert types[0] == "queue.item_enqueued"
    assert types[-1] == "queue.item_dead_lettered"
    assert "queue.item_retry_scheduled" not in types  # no subscription: retrying cannot help
    assert rows[-1]["code"] == REFUSED[conid]
    assert rows[-1]["failures"] == 1


def test_audit_of_an_active_contract_says_why_it_streams_or_waits(demo: Demo) -> None:
    activated = [e for e in demo.events if e["type"] == "registry.contract_activated"]
    overflowed = {e["key"] for e in demo.events if e["type"] == "router.overflow_queued"}
    streamed = {e["key"] for e in demo.events if e["type"] == "router.stream_started"}
    for event in (activated[0], next(e for e in activated if e["key"] in overflowed)):
        rows = jsonl(cli("audit", "--conid", event["key"], "--format", "jsonl", data_dir=demo.data_dir).stdout)
        types = [r["type"] for r in rows]
        assert "registry.contract_activated" in types
        assert ("router.stream_started" in types) == (event["key"] in streamed)
        assert ("router.overflow_queued" in types) == (event["key"] in overflowed)


def test_audit_type_and_time_filters(demo: Demo) -> None:
    claims = [e for e in demo.events if e["type"] == "queue.item_claimed"]
    mid = claims[len(claims) // 4]["ts"]
    until = claims[len(claims) * 3 // 4]["ts"]
    answer = cli(
        "audit", "--type", "queue.item_claimed", "--type", "queue.item_succeeded", "--since", mid, "--until", until,
        "--format", "jsonl", data_dir=demo.data_dir,
    )  # fmt: skip
    assert answer.returncode == 0, answer.stderr
    expected = [
        e
        for e in demo.events
        if e["type"] in ("queue.item_claimed", "queue.item_succeeded") and mid <= e["ts"] <= until
    ]
    assert expected
    assert jsonl(answer.stdout) == expected


def test_audit_csv_and_table_hold_the_same_events(demo: Demo) -> None:
    conid = str(list(REFUSED)[1])
    rows = [e for e in demo.events if e["key"] == conid]
    as_csv = cli("audit", "--conid", conid, "--format", "csv", data_dir=demo.data_dir)
    parsed = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [int(r["seq"]) for r in parsed] == [e["seq"] for e in rows]
    assert [r["type"] for r in parsed] == [e["type"] for e in rows]
    assert json.loads(parsed[-1]["payload"])["code"] == REFUSED[int(conid)]
    table = cli("audit", "--conid", conid, data_dir=demo.data_dir).stdout.splitlines()
    assert table[0].split()[:3] == ["seq", "ts", "(UTC)"]
    assert [int(line.split()[0]) for line in table[1:]] == [e["seq"] for e in rows]


def test_audit_refuses_filters_that_would_silently_match_nothing(demo: Demo) -> None:
    typo = cli("audit", "--type", "queue.item_deadlettered", data_dir=demo.data_dir)
    assert typo.returncode == 2
    assert "unknown event type queue.item_deadlettered" in typo.stderr
    missing = cli("audit", data_dir=demo.data_dir / "nope")
    assert missing.returncode == 1
    assert "no event log" in missing.stderr


def test_audit_into_a_closed_pipe_is_not_an_error(demo: Demo) -> None:
    cmd = f"{sys.executable} {ROOT / 'runtime.py'} audit --data-dir {demo.data_dir} --format jsonl | head -1"
    answer = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=60, check=False)
    assert len(answer.stdout.splitlines()) == 1
    assert "Traceback" not in answer.stderr


# ---------------------------------------------------------------------- verify


def test_verify_intact(demo: Demo) -> None:
    answer = cli("verify", data_dir=demo.data_dir)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert answer.stdout.startswith(f"ok: {len(demo.events)} events, seq 1..{len(demo.events)}")
    assert "snapshots agree" in answer.stdout


def test_verify_catches_a_payload_edited_inside_a_parquet_file(demo: Demo, tmp_path: Path) -> None:
    tampered = tmp_path / "tampered"
    shutil.copytree(demo.data_dir, tampered, ignore=shutil.ignore_patterns("slotwise.sock", "*.lock"))
    events_dir = tampered / "events"
    dt = DeltaTable(str(events_dir))
    adds = pa.table(dt.get_add_actions(flatten=True)).to_pylist()
    # a file in the middle of the log with several rows; edit a row that is not its first
    target = sorted((a for a in adds if a["max.seq"] - a["min.seq"] >= 3), key=lambda a: a["min.seq"])[0]
    path = events_dir / target["path"]
    table = pq.read_table(path)
    payloads = table.column("payload").to_pylist()
    row = 2
    edited_seq = table.column("seq")[row].as_py()
    payloads[row] = (
        payloads[row].replace('"conid":', '"conid": ', 1) if '"conid":' in payloads[row] else payloads[row] + " "
    )
    table = table.set_column(table.schema.get_field_index("payload"), "payload", pa.array(payloads, pa.string()))
    pq.write_table(table, path)
    assert DeltaTable(str(events_dir)).get_add_actions(flatten=True)  # the Delta log still lists the file

    answer = cli("verify", data_dir=tampered)
    assert answer.returncode == 1
    assert f"BROKEN at seq {edited_seq}:" in answer.stdout
    assert "hash chain broken" in answer.stdout
    assert target["path"] in answer.stdout
    # the other readers refuse clearly too, and send the operator to verify
    for command in (["replay"], ["audit", "--format", "jsonl"]):
        other = cli(*command, data_dir=tampered)
        assert "Traceback" not in other.stderr
        if other.returncode != 0:
            assert other.returncode == 1
            assert "verify" in other.stderr


# ---------------------------------------------------------------------- an older schema version


def _write_v1_log(data_dir: Path) -> None:
    """A log as an older writer left it: ``queue.item_retry_scheduled`` and ``..._dead_lettered`` at v1.

    v1 of both stored ``attempt`` where v2 stores ``failures``; every other
    event is unchanged. The rows are written with the hash chain an older
    writer computed over exactly these bytes.
    """
    us = 1_790_000_000_000_000
    current = [
        ("registry", "500", LegAdded(conid=500, strategy="put-spread-iwm", source="cli")),
        ("registry", "500", ContractActivated(conid=500, strategy="put-spread-iwm")),
        ("queue", "777", ItemEnqueued(item_id=1, conid=777, priority=2, reason="new position", enqueued_us=us)),
        ("queue", "777", ItemClaimed(item_id=1, conid=777, attempt=1, lease_until_us=us + 60_000_000)),
    ]
    rows: list[tuple[str, str, str, int, bytes]] = [
        (type(e).__struct_config__.tag, stream, key, 1, encode_event(e)) for stream, key, e in current
    ]
    old = [
        {"type": "queue.item_retry_scheduled", "item_id": 1, "conid": 777, "attempt": 1,
         "not_before_us": us + 2_000_000, "error": "no_contract: unknown conid", "code": 200},
        {"type": "queue.item_claimed", "item_id": 1, "conid": 777, "attempt": 2, "lease_until_us": us + 90_000_000,
         "worker": "worker"},
        {"type": "queue.item_dead_lettered", "item_id": 1, "conid": 777, "attempt": 2,
         "error": "no_contract: unknown conid", "code": 200},
    ]  # fmt: skip
    rows += [(p["type"], "queue", "777", 1, json.dumps(p, separators=(",", ":")).encode()) for p in old]
    prev, columns = GENESIS_HASH, {name: [] for name in EVENTS_SCHEMA.names}
    for seq, (tag, stream, key, v, payload) in enumerate(rows, start=1):
        ts = us + seq * 1000
        prev = row_hash(prev, seq, ts, tag, stream, key, v, payload)
        for name, value in zip(
            EVENTS_SCHEMA.names, (seq, ts, tag, stream, key, payload.decode(), v, prev), strict=True
        ):
            columns[name].append(value)
    table = pa.table(
        {n: pa.array(columns[n], pa.int64() if n == "ts" else EVENTS_SCHEMA.field(n).type) for n in columns}
    )
    table = table.set_column(1, "ts", table.column("ts").cast(pa.timestamp("us", tz="UTC"))).cast(EVENTS_SCHEMA)
    write_deltalake(str(data_dir / "events"), table, mode="append")


def test_v1_rows_are_read_in_todays_shape(tmp_path: Path) -> None:
    data_dir = tmp_path / "old"
    data_dir.mkdir()
    _write_v1_log(data_dir)

    verify = cli("verify", data_dir=data_dir)
    assert verify.returncode == 0, verify.stdout + verify.stderr

    rows = jsonl(cli("audit", "--conid", "777", "--format", "jsonl", data_dir=data_dir).stdout)
    failures = [r for r in rows if r["type"] in ("queue.item_retry_scheduled", "queue.item_dead_lettered")]
    assert [r["v"] for r in failures] == [1, 1]  # stored under v1...
    assert [r["failures"] for r in failures] == [1, 2]  # ...printed in v2's shape
    assert all("attempt" not in r for r in failures)
    table = cli("audit", "--type", "queue.item_dead_lettered", data_dir=data_dir).stdout
    assert "failures=2" in table
    assert "attempt=" not in table

    state = json.loads(cli("replay", "--json", data_dir=data_dir).stdout)
    assert state["seq"] == 7
    assert state["registry"] == {"500": ["put-spread-iwm"]}
    [item] = state["queue"]["items"]
    assert (item["status"], item["failures"], item["code"]) == ("FAILED", 2, 200)
    assert (
        json.loads(cli("replay", "--json", "--seq", "5", data_dir=data_dir).stdout)["queue"]["items"][0]["failures"]
        == 1
    )
