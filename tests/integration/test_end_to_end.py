"""End to end: ``python runtime.py`` as a subprocess, exactly as an operator starts it.

Everything is observed from outside the process, through the same doors an
operator uses: ``status --json`` and ``registry`` over the control socket,
``audit``/``replay`` on the event log, and the Delta ``positions`` table.
Every wait polls one of those for a condition with a deadline; nothing
sleeps to synchronise. A small TOML config keeps each run to a few seconds
(fast polls, a small demo account).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from deltalake import DeltaTable

from actors.control import ControlUnavailable, request
from actors.fake_ib_demo import demo_positions
from tests.simulator import SimConfig, TwsSimulator
from tests.support.collector import wait_until

ROOT = Path(__file__).resolve().parents[2]
RUNTIME = str(ROOT / "runtime.py")

POLL_S = 0.5
FLUSH_S = 0.2
DEMO_STOCKS, DEMO_STRATEGIES, DEMO_ACTIVE = 20, 5, 3


def write_config(path: Path, **sections: dict[str, Any]) -> Path:
    """A TOML config: fast polls and flushes, a small demo; ``sections`` override or add keys."""
    values: dict[str, dict[str, Any]] = {
        "runtime": {"max_lines": 30, "status_interval_s": 60.0},
        "freshness": {"min_snapshot_lines": 5, "max_snapshot_msgs_per_s": 20.0, "monitoring_s": 3600.0},
        "demo": {
            "stocks": DEMO_STOCKS,
            "option_strategies": DEMO_STRATEGIES,
            "active_strategies": DEMO_ACTIVE,
            "tick_interval_s": 0.2,
            "default_duration_s": 0.0,
        },
        "positions": {"flush_interval_s": FLUSH_S},
    }
    for name, extra in sections.items():
        values.setdefault(name, {}).update(extra)
    lines = []
    for name, table in values.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in table.items())
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(*args: str, timeout: float = 60.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run one ``runtime.py`` client command and capture its output (``env`` is added to the environment)."""
    return subprocess.run(
        [sys.executable, RUNTIME, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )


@contextmanager
def gateway_run(tmp: Path, universe: SimConfig, **sections: dict[str, Any]) -> Iterator[tuple[TwsSimulator, RuntimeProc]]:
    """``runtime.py run`` (the real IB actor, not the demo) behind the TWS simulator, connected, with the config
    ``sections`` in ``tmp/c.toml`` and its data in ``tmp/data``; at the end of the block stopped by SIGTERM, which
    must exit 0."""
    sim = TwsSimulator(universe)
    port = sim.start()
    rt = RuntimeProc(tmp / "data", write_config(tmp / "c.toml", **sections), "--ib-port", str(port), demo=False)
    try:
        rt.wait_connected()
        yield sim, rt
        assert rt.terminate() == 0, rt.log_tail()
    finally:
        rt.close()
        sim.stop()


def what_if_json(data_dir: Path, config: Path, *args: str) -> dict[str, Any]:
    """``what-if --json`` on a recorded data directory with the config it ran with: its report, which must succeed."""
    result = cli("what-if", "--data-dir", str(data_dir), "--config", str(config), "--json", *args, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``condition`` until it returns something truthy (returned), or fail naming ``what``."""
    return wait_until(condition, timeout, interval, what=what)


class RuntimeProc:
    """One ``runtime.py run`` subprocess; stderr goes to a file a failing test prints."""

    def __init__(self, data_dir: Path, config: Path, *extra: str, demo: bool = True) -> None:
        self.data_dir = data_dir
        self.config = config
        self.stderr_path = data_dir.parent / f"runtime-{time.monotonic_ns()}.log"
        self._stderr = self.stderr_path.open("w")
        argv = [sys.executable, RUNTIME, "run", "--data-dir", str(data_dir), "--config", str(config), *extra]
        argv += ["--log-level", "INFO"]
        if demo:
            argv.append("--demo")
        # no SLOTWISE_* from the developer's shell: the config file alone decides
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLOTWISE_")}
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self._stderr, env=env)

    def dir_args(self) -> list[str]:
        return ["--data-dir", str(self.data_dir)]

    def status(self) -> dict[str, Any] | None:
        """``status --json``, or None while the runtime does not answer (yet)."""
        result = cli("status", "--json", *self.dir_args(), timeout=30)
        if result.returncode != 0:
            assert self.proc.poll() is None, f"runtime exited with {self.proc.returncode}:\n{self.log_tail()}"
            return None
        return json.loads(result.stdout)

    def socket_status(self) -> dict[str, Any] | None:
        """What ``status --json`` prints, read from the control socket it reads: for polling, which would
        otherwise start an interpreter per poll (the CLI itself is run by ``status`` and tests/integration/test_runtime_cli.py)."""
        try:
            answer = request(self.data_dir / "slotwise.sock", {"type": "status"}, timeout=30)
        except (ControlUnavailable, OSError, ValueError):
            answer = {"ok": False}
        if not answer["ok"]:
            assert self.proc.poll() is None, f"runtime exited with {self.proc.returncode}:\n{self.log_tail()}"
            return None
        return answer["reply"]

    def wait_status(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            status = self.socket_status()
            return status if status is not None and predicate(status) else None

        return wait_for(check, timeout, what)

    def wait_connected(self, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_status(lambda s: s["ib"]["connected"], timeout, "the runtime to connect to IB")

    def terminate(self, timeout: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> int:
        self.proc.kill()
        return self.proc.wait(30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._stderr.close()

    def log_tail(self, n: int = 40) -> str:
        self._stderr.flush()
        return "\n".join(self.stderr_path.read_text().splitlines()[-n:])


@pytest.fixture
def runtimes(tmp_path: Path) -> Iterator[Callable[..., RuntimeProc]]:
    """Start runtimes with ``runtimes(data_dir, config, *args)``; any still running is killed at the end."""
    started: list[RuntimeProc] = []

    def start(data_dir: Path, config: Path, *extra: str, demo: bool = True) -> RuntimeProc:
        proc = RuntimeProc(data_dir, config, *extra, demo=demo)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()


def positions_rows(data_dir: Path) -> list[dict[str, Any]]:
    path = data_dir / "positions"
    if not (path / "_delta_log").exists():
        return []
    return DeltaTable(str(path)).to_pyarrow_table(columns=["conid", "source", "ts"]).to_pylist()


def audit(data_dir: Path, *args: str) -> list[dict[str, Any]]:
    result = cli("audit", "--data-dir", str(data_dir), "--format", "jsonl", *args)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def replay(data_dir: Path) -> dict[str, Any]:
    result = cli("replay", "--data-dir", str(data_dir), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def registry_list(rt: RuntimeProc) -> dict[str, list[str]]:
    result = cli("registry", "list", "--json", *rt.dir_args())
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


DEMO_CONIDS = {p.conid for p in demo_positions(DEMO_STOCKS, DEMO_STRATEGIES, 7)}
DEMO_STOCK_CONIDS = sorted(p.conid for p in demo_positions(DEMO_STOCKS, DEMO_STRATEGIES, 7) if p.sec_type == "STK")


# ---------------------------------------------------------------------- the demo, end to end


def test_every_contract_is_served_by_its_path(tmp_path: Path, runtimes: Any) -> None:
    data_dir = tmp_path / "data"
    rt = runtimes(data_dir, write_config(tmp_path / "c.toml"))
    rt.wait_connected()
    active = {int(c) for c in registry_list(rt)}
    assert active
    assert active < DEMO_CONIDS

    def served() -> dict[int, set[str]] | None:
        by_conid: dict[int, set[str]] = {}
        for row in positions_rows(data_dir):
            by_conid.setdefault(row["conid"], set()).add(row["source"])
        # the portfolio floor prices every position first; each must also be served by its own path
        done = all(("stream" if c in active else "queue") in by_conid.get(c, ()) for c in DEMO_CONIDS)
        return by_conid if done else None

    by_conid = wait_for(served, 30, "a stream or queue row for every demo contract")
    status = rt.status()
    assert status is not None
    for conid in DEMO_CONIDS:
        expected = "stream" if conid in active else "queue"
        assert expected in by_conid[conid], (conid, by_conid[conid])
    assert not any("stream" in by_conid[c] for c in DEMO_CONIDS - active)
    assert status["streams"] == len(active)
    assert status["lines_in_use"] <= status["max_lines"]
    assert rt.terminate() == 0, rt.log_tail()
    assert cli("verify", "--data-dir", str(data_dir)).returncode == 0


def test_activation_moves_a_contract_to_a_stream_and_deactivation_back(tmp_path: Path, runtimes: Any) -> None:
    data_dir = tmp_path / "data"
    rt = runtimes(data_dir, write_config(tmp_path / "c.toml"))
    first = rt.wait_connected()
    conid = DEMO_STOCK_CONIDS[0]
    wait_for(
        lambda: any(r["conid"] == conid and r["source"] == "queue" for r in positions_rows(data_dir)), 20, "a queue row"
    )

    added = cli("registry", "add", str(conid), "--strategy", "e2e", *rt.dir_args())
    assert added.returncode == 0, added.stderr
    assert "activated" in added.stdout
    rt.wait_status(lambda s: s["streams"] == first["streams"] + 1, 20, "one more stream")
    wait_for(
        lambda: any(r["conid"] == conid and r["source"] == "stream" for r in positions_rows(data_dir)),
        20,
        "a stream row",
    )

    removed = cli("registry", "remove", str(conid), "--strategy", "e2e", *rt.dir_args())
    assert removed.returncode == 0, removed.stderr
    rt.wait_status(lambda s: s["streams"] == first["streams"], 20, "the stream to stop")

    def story() -> list[str] | None:
        types = [e["type"] for e in audit(data_dir, "--conid", str(conid))]
        return types if "router.stream_stopped" in types and types.count("queue.item_enqueued") >= 2 else None

    types = wait_for(story, 20, "the contract's way back to the queue in the log")
    # queued first, then streamed (its waiting item cancelled), then queued again
    start = types.index("router.stream_started")
    assert types.index("registry.contract_activated") < start < types.index("router.stream_stopped")
    assert "queue.item_enqueued" in types[:start]
    assert "queue.item_enqueued" in types[types.index("router.stream_stopped") :]
    assert rt.terminate() == 0, rt.log_tail()


def test_sigkill_mid_run_and_restart_lose_no_queue_work(tmp_path: Path, runtimes: Any) -> None:
    """Many lines and slow snapshots keep many items PROCESSING long enough to kill the runtime."""
    data_dir = tmp_path / "data"
    config = write_config(
        tmp_path / "c.toml",
        demo={"stocks": 50, "snapshot_latency_s": 0.5, "snapshot_latency_max_s": 0.5},
        runtime={"max_lines": 400},
    )
    rt = runtimes(data_dir, config)
    rt.wait_status(lambda s: s.get("queue", {}).get("processing", 0) > 10, 60, "many snapshots in flight")
    assert rt.kill() == -signal.SIGKILL

    assert cli("verify", "--data-dir", str(data_dir)).returncode == 0
    durable = replay(data_dir)
    queue = durable["queue"]
    in_flight = {i["conid"] for i in queue["items"] if i["status"] == "PROCESSING"}
    waiting = {i["conid"] for i in queue["items"] if i["status"] == "PENDING"}
    assert len(in_flight) == queue["processing"] > 0
    # replay is a pure function of the log: a second read gives the same state
    assert replay(data_dir) == durable
    owed = in_flight | waiting
    seq_at_kill = durable["seq"]

    rt2 = runtimes(data_dir, config)
    rt2.wait_connected()

    def events_after_kill() -> list[dict[str, Any]]:
        types = ("--type", "queue.item_retry_scheduled", "--type", "queue.item_succeeded")
        return [e for e in audit(data_dir, *types) if e["seq"] > seq_at_kill]

    # the queue never empties (each refresh owes the next one): wait until every owed contract was served
    wait_for(
        lambda: owed <= {e["conid"] for e in events_after_kill() if e["type"] == "queue.item_succeeded"},
        90,
        "the restarted runtime to serve every owed refresh",
    )
    after = events_after_kill()
    # PROCESSING at the kill came back PENDING, with the attempt counted (a contract that crashes the process
    # must eventually dead-letter)
    crashed = {e["conid"] for e in after if e["type"] == "queue.item_retry_scheduled" and "runtime died" in e["error"]}
    assert crashed == in_flight
    succeeded = {e["conid"] for e in after if e["type"] == "queue.item_succeeded"}
    assert owed <= succeeded  # ...and every owed refresh was served by the new process
    assert rt2.terminate() == 0, rt2.log_tail()
    assert cli("verify", "--data-dir", str(data_dir)).returncode == 0


# ---------------------------------------------------------------------- the real IB actor


def test_real_ib_actor_against_the_tws_simulator(tmp_path: Path, runtimes: Any) -> None:
    from tests.simulator import TwsSimulator, default_universe

    universe = default_universe(n_stocks=12, n_option_strikes=2)
    conids = {p.conid for p in universe.positions}
    sim = TwsSimulator(universe)
    port = sim.start()
    try:
        data_dir = tmp_path / "data"
        config = write_config(tmp_path / "c.toml", ib={"min_stream_age_s": 0.05, "snapshot_timeout_s": 5.0})
        rt = runtimes(data_dir, config, "--ib-port", str(port), demo=False)
        rt.wait_connected()

        def all_rows() -> bool:
            return {r["conid"] for r in positions_rows(data_dir)} >= conids

        wait_for(all_rows, 60, "a positions row for every simulated position")
        assert {r["source"] for r in positions_rows(data_dir)} == {"queue"}

        option = 900001
        added = cli("registry", "add", str(option), "--strategy", "sim", *rt.dir_args())
        assert added.returncode == 0, added.stderr
        status = rt.wait_status(lambda s: s["streams"] == 1 and s["lines_in_use"] >= 1, 30, "one stream at IB")
        assert status["mode"] == "run"
        wait_for(
            lambda: any(r["conid"] == option and r["source"] == "stream" for r in positions_rows(data_dir)),
            30,
            "a streamed row from the simulator",
        )
        assert sim.stats().streams == 1
        assert sim.stats().peak_lines <= 30
        assert rt.terminate() == 0, rt.log_tail()
        # a clean stop cancels the stream at IB
        wait_for(lambda: sim.stats().streams == 0, 10, "the simulator to see the cancel")
    finally:
        sim.stop()


def test_a_data_directory_too_deep_for_a_socket_path_still_runs_and_answers(
    tmp_path: Path, runtimes: Callable[..., RuntimeProc]
) -> None:
    """<data dir>/slotwise.sock past AF_UNIX's 107 bytes refused the start ("AF_UNIX path too long"): the
    socket then lives in the user's runtime dir, under a name both the runtime and the CLI derive."""
    data_dir = tmp_path / ("deep-" * 12) / ("deeper-" * 10) / "data"
    assert len(os.fsencode(data_dir / "slotwise.sock")) > 107
    data_dir.parent.mkdir(parents=True)  # where the test keeps the runtime's stderr
    config = write_config(tmp_path / "slotwise.toml")
    proc = runtimes(data_dir, config)
    status = wait_for(proc.status, 60, "the runtime in a deep data directory to answer status")
    assert status["ib"]["connected"] in (True, False)
    assert not (data_dir / "slotwise.sock").exists()
    assert proc.terminate() == 0, proc.log_tail()
