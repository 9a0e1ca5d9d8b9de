"""The supervisor in runtime.py: an actor that dies stops the runtime with an error, not silently."""

from __future__ import annotations

import threading
from pathlib import Path

from actors.config import load_config
from runtime import Runtime
from storage.verify import verify_log


def test_a_dead_actor_stops_the_runtime(tmp_path: Path) -> None:
    config = load_config(
        environ={},
        overrides={
            "runtime": {"data_dir": str(tmp_path / "data")},
            "demo": {"stocks": 5, "option_strategies": 2, "active_strategies": 1, "tick_interval_s": 0.1},
        },
    )
    runtime = Runtime(config, demo=True)
    runtime.start()
    try:
        killer = threading.Timer(0.3, runtime.refs["router"].stop)
        killer.start()
        runtime.run(duration=30, status_every=None)  # returns as soon as the supervisor notices
        killer.join()
        assert runtime.actor_failure is not None
        assert "router" in runtime.actor_failure
    finally:
        runtime.stop()
    report = verify_log(str(tmp_path / "data" / "events"))
    assert report.ok, report
    assert report.events > 0
