"""Config: decoding, precedence, errors that name the key, and docs/operations.md kept in step."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import msgspec
import pytest

from actors.config import Config, ConfigError, load_config

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def _default(field: msgspec.structs.FieldInfo) -> object:
    """The default as the doc's JSON spells it (a tuple default reads as a list)."""
    value = field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
    return msgspec.json.decode(msgspec.json.encode(value))


def test_operations_doc_lists_every_config_field_with_its_default() -> None:
    rows = dict(re.findall(r"^\| `([a-z_]+\.[a-z_0-9]+)` \| `([^`]*)` \|", DOC.read_text(), flags=re.MULTILINE))
    expected = {
        f"{section.name}.{field.name}": _default(field)
        for section in msgspec.structs.fields(Config)
        for field in msgspec.structs.fields(section.type)
    }
    assert set(rows) == set(expected), f"missing in doc: {set(expected) - set(rows)}; stale in doc: {set(rows) - set(expected)}"
    for key, default in expected.items():
        assert json.loads(rows[key]) == default, f"{key}: doc says {rows[key]}, code says {default!r}"


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[runtime]\nmax_lines = 50\ndata_dir = "/from/file"\n[ib]\nport = 4001\n')
    config = load_config(path, environ={"SLOTWISE_IB_PORT": "4002", "SLOTWISE_DATA_DIR": "/from/env"}, overrides={"ib": {"port": 7496}})
    assert config.runtime.max_lines == 50
    assert config.runtime.data_dir == "/from/env"
    assert config.ib.port == 7496


@pytest.mark.parametrize(
    ("text", "environ", "message"),
    [
        ("[runtime]\nmax_line = 5\n", {}, "runtime.max_line"),
        ("[runtim]\n", {}, "[runtim]"),
        ("[runtime]\nmax_lines = 1\n", {}, "max_lines"),
        ("[runtime]\nmax_lines = 'many'\n", {}, "max_lines"),
        ("", {"SLOTWISE_NOPE_X": "1"}, "SLOTWISE_NOPE_X"),
        ("", {"SLOTWISE_IB_PORT": "99999"}, "ib.port"),
        ("not toml = = =", {}, "not valid TOML"),
        ("[ib]\nclient = 'ib_bogus'\n", {}, "ib.client = 'ib_bogus' is not one of 'ib_insync', 'ib_async'"),
        ("", {"SLOTWISE_IB_CLIENT": "ib-async"}, "'ib-async' is not one of 'ib_insync', 'ib_async' (from environment variable SLOTWISE_IB_CLIENT)"),
    ],
)
def test_bad_configuration_is_refused_naming_the_key(tmp_path: Path, text: str, environ: dict[str, str], message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path, environ=environ)


def test_an_ib_client_that_is_not_installed_is_refused_with_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ib_async" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=re.escape("ib.client = 'ib_async' but ib_async is not installed (pip install '.[ib_async]')")):
        load_config(environ={"SLOTWISE_IB_CLIENT": "ib_async"})


@pytest.mark.skipif(importlib.util.find_spec("ib_async") is None, reason="ib_async is not installed (the test extra installs it)")
def test_both_ib_clients_are_accepted() -> None:
    assert load_config(environ={}).ib.client == "ib_insync"
    assert load_config(environ={"SLOTWISE_IB_CLIENT": "ib_async"}).ib.client == "ib_async"


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


def test_defaults_match_the_design() -> None:
    config = load_config(environ={})
    assert (config.ib.host, config.ib.port, config.ib.client_id) == ("127.0.0.1", 7497, 1)
    assert (config.runtime.data_dir, config.runtime.max_lines) == ("./data", 100)
    fresh = config.freshness  # issue 11 replaced the poll/batch timers by targets and a message budget
    assert (fresh.monitoring_s, fresh.overflow_s, fresh.max_snapshot_msgs_per_s) == (60.0, 5.0, 10.0)
    assert (fresh.min_snapshot_lines, fresh.line_probe_s) == (2, 300.0)


def test_a_retired_timer_key_says_what_replaced_it(tmp_path: Path) -> None:
    path = tmp_path / "old.toml"
    path.write_text("[runtime]\npoll_interval_s = 5.0\n")
    with pytest.raises(ConfigError, match=r"runtime.poll_interval_s .*no longer used.*max_snapshot_msgs_per_s"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match=r"SLOTWISE_RUNTIME_SNAPSHOT_RESERVE.*min_snapshot_lines"):
        load_config(environ={"SLOTWISE_RUNTIME_SNAPSHOT_RESERVE": "5"})


def test_freshness_settings_come_from_the_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text("[freshness]\nmonitoring_s = 30\noverflow_s = 2.5\n")
    config = load_config(path, environ={"SLOTWISE_FRESHNESS_MONITORING_S": "20"})
    assert (config.freshness.monitoring_s, config.freshness.overflow_s) == (20.0, 2.5)


def test_the_log_level_variable_is_not_a_config_key() -> None:
    assert load_config(environ={"SLOTWISE_LOG_LEVEL": "DEBUG"}) == load_config(environ={})
