"""The runtime's status asks every actor at once: it waits for the slowest, not for the sum of them."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pykka

from actors.config import load_config
from actors.messaging import Request
from runtime import Runtime
from storage.event_log import EventLog

PARTS = ("ib", "router", "queue", "worker", "positions")
NOT_ALL_ASKED = "answered before every part was asked"


class _Busy(pykka.ThreadingActor):
    """Answers only once every part holds its question (as at a demo's start, each busy with the connect).

    Asked one at a time, the first part would wait for the others in vain: the barrier gives up, and every
    part answers with an error that says so. The answer itself has none of the fields status reads.
    """

    def __init__(self, asked: threading.Barrier) -> None:
        super().__init__()
        self.asked = asked

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Request):
            try:
                self.asked.wait()
            except threading.BrokenBarrierError:
                message.reply.set_exception(TimeoutError(NOT_ALL_ASKED))
                return None
            message.reply.set(object())
        return None


def test_status_waits_for_the_slowest_part_not_the_sum(tmp_path: Path, event_log: EventLog) -> None:
    runtime = Runtime(load_config(environ={}, overrides={"runtime": {"data_dir": str(tmp_path / "data")}}))
    runtime.log = event_log
    asked = threading.Barrier(len(PARTS), timeout=2.0)
    runtime.refs = {name: _Busy.start(asked) for name in PARTS}
    status = runtime.status()
    # every part was asked before any answered, and each answer (with nothing usable) is reported
    assert status["ib"]["connected"] is False
    assert NOT_ALL_ASKED not in status["ib"]["state"], status["ib"]
    for error in ("router_error", "queue_error", "worker_error", "positions_error"):
        assert "Error(" in status[error]  # what reading a reply without the fields raised
        assert NOT_ALL_ASKED not in status[error], status[error]


def test_a_part_that_is_not_running_is_reported_and_the_rest_answer(tmp_path: Path, event_log: EventLog) -> None:
    runtime = Runtime(load_config(environ={}, overrides={"runtime": {"data_dir": str(tmp_path / "data")}}))
    runtime.log = event_log
    asked = threading.Barrier(len(PARTS) - 1, timeout=2.0)  # every part but the stopped one
    runtime.refs = {name: _Busy.start(asked) for name in PARTS if name != "queue"}
    stopped = _Busy.start(asked)
    stopped.stop()
    runtime.refs["queue"] = stopped
    status = runtime.status()
    assert "ActorDeadError" in status["queue_error"]
    assert "AttributeError" in status["router_error"]
