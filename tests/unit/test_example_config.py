"""slotwise.example.toml holds every config key with its default and a comment, in step with the structs.

The expected keys and defaults come from the config structs themselves, so
whoever adds, removes or changes a field must update the example too.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import msgspec

from actors.config import Config, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "slotwise.example.toml"


def _defaults() -> dict[str, dict[str, object]]:
    """Section -> key -> default, as TOML would spell it, read from the structs."""
    out: dict[str, dict[str, object]] = {}
    for section in msgspec.structs.fields(Config):
        out[section.name] = {}
        for field in msgspec.structs.fields(section.type):
            value = field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
            out[section.name][field.encode_name] = msgspec.json.decode(msgspec.json.encode(value))  # tuples as lists
    return out


def test_every_section_and_key_is_there_with_its_default() -> None:
    example = tomllib.loads(EXAMPLE.read_text())
    expected = _defaults()
    assert list(example) == list(expected), "sections (in the order of Config)"
    for section, keys in expected.items():
        assert set(example[section]) == set(keys), (
            f"[{section}] missing: {set(keys) - set(example[section])}; stale: {set(example[section]) - set(keys)}"
        )
        for key, default in keys.items():
            assert example[section][key] == default, f"{section}.{key}: example says {example[section][key]!r}, code says {default!r}"


def test_every_key_has_a_one_line_comment_above_it() -> None:
    lines = EXAMPLE.read_text().splitlines()
    keys = [(i, m.group(1)) for i, line in enumerate(lines) if (m := re.match(r"^([a-z_0-9]+) = ", line))]
    assert keys
    for i, key in keys:
        assert re.match(r"^# \S.{8,}", lines[i - 1]), f"{key}: no comment line above it"


def test_the_example_loads_as_the_defaults() -> None:
    assert load_config(EXAMPLE, environ={}) == Config()
