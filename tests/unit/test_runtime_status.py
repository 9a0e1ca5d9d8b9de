"""The runtime's status asks every actor at once: it waits for the slowest, not for the sum of them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pykka

from actors.config import load_config
from actors.messaging import Request
from runtime import Runtime
from storage.event_log import EventLog

#: How long each actor below takes to reach a status question (as at a demo's start, behind the connect's positions).
BUSY_S = 0.4
PARTS = ("ib", "router", "queue", "worker", "positions")


class _Busy(pykka.ThreadingActor):
    """Answers every request after ``BUSY_S``, with a reply that has none of the fields status reads."""

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Request):
            time.sleep(BUSY_S)
            message.reply.set(object())
        return None


def test_status_waits_for_the_slowest_part_not_the_sum(tmp_path: Path, event_log: EventLog) -> None:
    runtime = Runtime(load_config(environ={}, overrides={"runtime": {"data_dir": str(tmp_path / "data")}}))
    runtime.log = event_log
    runtime.refs = {name: _Busy.start() for name in PARTS}
    started = time.monotonic()
    status = runtime.status()
    took = time.monotonic() - started
    assert took < 2.5 * BUSY_S, f"status took {took:.2f} s for {len(PARTS)} parts busy {BUSY_S} s each"
    # every part was asked and answered (with nothing usable): each is reported, none is missing
    assert status["ib"]["connected"] is False
    for error in ("router_error", "queue_error", "worker_error", "positions_error"):
        assert "Error(" in status[error]  # what reading a reply without the fields raised


def test_a_part_that_is_not_running_is_reported_and_the_rest_answer(tmp_path: Path, event_log: EventLog) -> None:
    runtime = Runtime(load_config(environ={}, overrides={"runtime": {"data_dir": str(tmp_path / "data")}}))
    runtime.log = event_log
    runtime.refs = {name: _Busy.start() for name in PARTS if name != "queue"}
    stopped = _Busy.start()
    stopped.stop()
    runtime.refs["queue"] = stopped
    status = runtime.status()
    assert "ActorDeadError" in status["queue_error"]
    assert "AttributeError" in status["router_error"]
