"""Shared fixtures: a fresh data directory, an open event log, and no actor left behind."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pykka
import pytest
from hypothesis import settings as hypothesis_settings

from storage.event_log import EventLog
from storage.snapshots import SnapshotStore
from storage.tables import LogConfig

# Property tests explore new random examples on every local run, but CI runs them on hypothesis's fixed
# derandomized sequence: a counterexample must be found on a developer's machine and kept as a test, never
# turn up at random in a CI run that then throws the change away. (Profiles set in conftest apply to the
# settings the test modules build at import, which come later.)
hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    hypothesis_settings.load_profile("ci")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", default=False, help="run the long soak/fault rounds")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="soak test: run with --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _signing_key_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Runtimes started by tests (in process or as subprocesses, which inherit the environment) create and
    use their signing key under a temporary config directory, never the real ~/.config.

    Session-scoped, so it is in place before any module-scoped fixture starts a runtime.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.getbasetemp() / "xdg-config"))
        patch.delenv("SLOTWISE_AUDIT_SIGNING_KEY", raising=False)
        yield


@pytest.fixture(autouse=True)
def _stop_all_actors() -> Iterator[None]:
    yield
    pykka.ActorRegistry.stop_all(timeout=10)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


#: Fast settings for tests: short flush, maintenance off unless a test turns it on.
TEST_LOG_CONFIG = LogConfig(flush_ms=2.0, maintenance=False)


@pytest.fixture
def event_log(data_dir: Path) -> Iterator[EventLog]:
    log = EventLog.open(data_dir, config=TEST_LOG_CONFIG)
    yield log
    log.close()


@pytest.fixture
def log_factory(data_dir: Path) -> Iterator[Callable[[], EventLog]]:
    """Opens the test's event log (again, if a test closed it); all are closed after the actors have stopped."""
    logs: list[EventLog] = []

    def open_log() -> EventLog:
        log = EventLog.open(data_dir, config=TEST_LOG_CONFIG)
        logs.append(log)
        return log

    yield open_log
    pykka.ActorRegistry.stop_all(timeout=10)
    for log in logs:
        log.close()


@pytest.fixture
def snapshot_store(data_dir: Path) -> SnapshotStore:
    return SnapshotStore(str(data_dir))
