"""The control socket of a real runtime under bad input: every request answered or closed, nothing harmed.

One ``runtime.py --demo`` subprocess serves the whole module. Each test
sends something a broken or hostile client could send and then checks that
the runtime still answers ``status`` and that the registry did not change.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actors.control import MAX_CLIENTS
from storage.verify import verify_data_dir
from tests.faults.runtime_proc import RuntimeProcess, registry_listing
from tests.support.collector import CollectorTimeout, wait_until


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuntimeProcess]:
    data_dir = tmp_path_factory.mktemp("control") / "data"
    data_dir.mkdir()
    proc = RuntimeProcess(data_dir, "--demo", "--duration", "600", name="control")
    try:
        assert proc.wait_ready(60), proc.stderr()[-3000:]
        yield proc
        assert proc.terminate(60) == 0, proc.stderr()[-3000:]
    finally:
        proc.cleanup()
    report = verify_data_dir(str(data_dir))
    assert report.ok, report


@pytest.fixture
def healthy(runtime: RuntimeProcess) -> Iterator[RuntimeProcess]:
    """Snapshot the registry before the test; afterwards the runtime must answer and the registry be unchanged."""
    before = registry_listing(runtime)
    yield runtime
    assert runtime.proc.poll() is None, runtime.stderr()[-3000:]
    assert _status_when_free(runtime)["ok"]
    assert registry_listing(runtime) == before


def _status_when_free(runtime: RuntimeProcess, timeout: float = 10.0) -> dict[str, Any]:
    """``status``, retried while a test's clients still hold every slot ("busy")."""
    answers: list[dict[str, Any]] = []

    def not_busy() -> bool:
        answers.append(runtime.call({"type": "status"}))
        return answers[-1]["ok"] or answers[-1]["error"]["code"] != "busy"

    with contextlib.suppress(CollectorTimeout):
        wait_until(not_busy, timeout, 0.05, what="a free control slot")
    return answers[-1]


def _raw(path: Path, data: bytes, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Send raw bytes on one connection; return every answer line until the server closes or goes quiet."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    return [json.loads(line) for line in b"".join(chunks).splitlines() if line.strip()]


def _error_code(answer: dict[str, Any]) -> str:
    assert answer["ok"] is False, answer
    assert answer["error"]["message"], answer
    return answer["error"]["code"]


def test_invalid_json(healthy: RuntimeProcess) -> None:
    answers = _raw(healthy.socket, b'{"type": "registry.add_active", "conid": \n[1, 2\n"just a string"\n')
    assert [_error_code(a) for a in answers] == ["invalid"] * 3


def test_unknown_and_forbidden_command_types(healthy: RuntimeProcess) -> None:
    lines = [
        {"type": "no.such.command"},
        {"no_type": 1},
        {"type": 17},
        {"type": "queue.claim", "n": 5},  # exists, but only the worker may claim
    ]
    answers = _raw(healthy.socket, b"".join(json.dumps(x).encode() + b"\n" for x in lines))
    assert len(answers) == len(lines)
    assert all(_error_code(a) in ("invalid", "forbidden") for a in answers), answers


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"type": "registry.add_active", "conid": "265598", "strategy": "x"}, "conid"),
        ({"type": "registry.add_active", "conid": 265598, "strategy": 5}, "strategy"),
        ({"type": "registry.add_active", "conid": -1, "strategy": "x"}, "conid"),
        ({"type": "registry.add_active", "conid": 1.5, "strategy": "x"}, "conid"),
        ({"type": "registry.add_active", "strategy": "x"}, "conid"),
        ({"type": "registry.add_active_many", "items": "not a list"}, "items"),
        ({"type": "registry.add_active", "conid": 265598, "strategy": "x", "surprise": True}, "surprise"),
        ({"type": "status", "verbose": True}, "verbose"),
    ],
)
def test_wrong_field_types(healthy: RuntimeProcess, payload: dict[str, Any], field: str) -> None:
    (answer,) = _raw(healthy.socket, json.dumps(payload).encode() + b"\n")
    assert _error_code(answer) == "invalid"
    assert field in (answer["error"].get("field") or "") + answer["error"]["message"], answer


def test_five_megabyte_line(healthy: RuntimeProcess) -> None:
    huge = b'{"type": "registry.add_active", "conid": 1, "strategy": "' + b"x" * (5 * 1024 * 1024) + b'"}\n'
    answers = _raw(healthy.socket, huge, timeout=30)
    assert [_error_code(a) for a in answers] == ["too_large"]  # answered once, then closed


def test_invalid_utf8(healthy: RuntimeProcess) -> None:
    answers = _raw(healthy.socket, b'{"type": "registry.list", "x": "\xff\xfe"}\n\xc3\x28\n')
    assert [_error_code(a) for a in answers] == ["invalid", "invalid"]


def test_a_good_request_after_bad_ones_on_the_same_connection(healthy: RuntimeProcess) -> None:
    answers = _raw(healthy.socket, b'nonsense\n\xff\n{"type": "status"}\n')
    assert [a["ok"] for a in answers] == [False, False, True]


def test_flood_of_connections(healthy: RuntimeProcess) -> None:
    """200 clients at once: each gets an answer (status or "busy") or a closed socket; none hangs."""
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    start = threading.Barrier(200)

    def client() -> None:
        outcome = "closed"
        try:
            start.wait(30)
            answers = _raw(healthy.socket, b'{"type": "status"}\n', timeout=30)
            if answers:
                outcome = "ok" if answers[0]["ok"] else answers[0]["error"]["code"]
        except (BlockingIOError, ConnectionRefusedError, ConnectionResetError, BrokenPipeError):
            outcome = "refused"  # the kernel's listen backlog was full (EAGAIN on a Unix socket)
        with lock:
            outcomes[outcome] += 1

    threads = [threading.Thread(target=client) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a flooding client hung"
    assert sum(outcomes.values()) == 200
    assert set(outcomes) <= {"ok", "busy", "closed", "refused"}, outcomes
    assert outcomes["ok"] >= MAX_CLIENTS // 2, outcomes


def test_idle_connections_do_not_lock_out_status(healthy: RuntimeProcess) -> None:
    """Clients that connect and say nothing hold slots; status from a new client is answered or told busy, fast."""
    idle = []
    try:
        for _ in range(MAX_CLIENTS + 4):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(healthy.socket))
            idle.append(s)
        answers = _raw(healthy.socket, b'{"type": "status"}\n', timeout=10)
        assert answers, "no answer while idle clients held the slots"
        assert answers[0]["ok"] or answers[0]["error"]["code"] == "busy"
    finally:
        for s in idle:
            s.close()
