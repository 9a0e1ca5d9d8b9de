"""A stored event an actor cannot apply: recovery stops at its seq, named, and nothing is changed or skipped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from actors.base import RecoveryError
from actors.messaging import ask
from actors.queue import QueueActor
from events.queue import Enqueue, ItemSucceeded, QueueStats
from storage.event_log import EventLog
from tests.conftest import TEST_LOG_CONFIG
from tests.faults.runtime_proc import ROOT, RUNTIME

POISON = "queue cannot recover: event seq 1 (queue.item_succeeded) does not apply"


def _poison(data_dir: Path) -> None:
    """Seq 1: an ack of an item the queue never had (as a bug in an older version could have stored)."""
    with EventLog.open(data_dir, config=TEST_LOG_CONFIG) as log:
        log.append(ItemSucceeded(item_id=99, conid=1), stream="queue", key="1").wait(10)


def test_an_actor_that_cannot_recover_refuses_everything_and_writes_nothing(data_dir: Path) -> None:
    _poison(data_dir)
    with EventLog.open(data_dir, config=TEST_LOG_CONFIG) as log:
        ref = QueueActor.start(log)
        assert str(ref.proxy().recovery_error.get(timeout=10)).startswith(POISON)
        with pytest.raises(RecoveryError, match="event seq 1"):
            ask(ref, Enqueue(conid=5))
        with pytest.raises(RecoveryError):
            ask(ref, QueueStats())
        ref.stop(timeout=10)
        assert log.last_seq == 1, "a half-recovered queue stored something"


def test_the_runtime_stops_on_a_log_it_cannot_replay_naming_the_seq(data_dir: Path) -> None:
    _poison(data_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLOTWISE_")}
    run = subprocess.run(
        [sys.executable, str(RUNTIME), "run", "--demo", "--duration", "30", "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT, env=env,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr[-3000:]
    assert POISON in run.stderr
    assert "Traceback" not in run.stderr
    assert "slotwise running" not in run.stderr, "the runtime went on without its queue"
