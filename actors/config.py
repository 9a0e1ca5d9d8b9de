"""The runtime's settings: one TOML file decoded by msgspec into frozen structs.

Precedence, lowest first: defaults here, the TOML file (``--config``),
environment variables ``SLOTWISE_<SECTION>_<FIELD>`` (e.g.
``SLOTWISE_IB_PORT=4002``, ``SLOTWISE_RUNTIME_MAX_LINES=200``; plus the
shortcut ``SLOTWISE_DATA_DIR``), then command-line flags. Unknown keys are
errors that name the key, so a typo never silently falls back to a default.
``docs/operations.md`` lists every field; a test keeps the two in step.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import msgspec

from actors.ib_client import client_problem
from events.ib import IbSettings
from storage.object_store import StorageSettings
from storage.positions_table import PositionsConfig
from storage.tables import LogConfig

__all__ = ["AuditSettings", "Config", "ConfigError", "DemoSettings", "FreshnessSettings", "MetricsSettings", "RuntimeSettings", "load_config"]

Seconds = Annotated[float, msgspec.Meta(gt=0, le=86_400)]


class RuntimeSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The hybrid stream/queue policy (DESIGN.md sections 2 and 4)."""

    #: Where the Delta tables live: a directory or a delta-rs URI (s3://, az://, gs://).
    data_dir: str = "./data"
    #: The most market data lines Slotwise will use (IB's default is 100; booster packs add more). Only a
    #: ceiling: the account's true count is learned from IB's 101 and kept across restarts ([freshness]).
    max_lines: Annotated[int, msgspec.Meta(ge=2, le=100_000)] = 100
    #: A claimed item returns to the queue if not acknowledged within this.
    lease_s: Seconds = 60.0
    #: Failed snapshots are retried with exponential backoff up to this many attempts, then dead-lettered.
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5
    retry_backoff_s: Seconds = 2.0
    retry_backoff_cap_s: Seconds = 300.0
    #: A dead letter whose failures may pass by themselves (timeouts, no data: a closed or quiet market, a farm
    #: down) is requeued this long after it failed for good; 0: only an operator requeues. Not those IB refused
    #: for good (354 no subscription, 200 no such contract), nor one in flight whenever the runtime died.
    dead_letter_retry_s: Annotated[float, msgspec.Meta(ge=0, le=604_800)] = 900.0
    #: Events between snapshots of the registry and the queue.
    snapshot_every: Annotated[int, msgspec.Meta(ge=100)] = 50_000
    #: Status line period for --demo and the log.
    status_interval_s: Seconds = 5.0
    #: Verify the whole hash chain before appending (a broken chain refuses to start).
    verify_on_start: bool = True


class FreshnessSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What "fresh" means, and what the scheduler may spend on it (docs/architecture.md, "Freshness").

    There is no refresh timer: the queue hands out the contracts furthest past
    these targets first, and the worker keeps as many snapshots open as the
    line ledger allows, within the message budget.
    """

    #: Target age (s) of a non-active contract's price.
    monitoring_s: Seconds = 60.0
    #: Target age (s) of an active contract's price while it has no line (overflow).
    overflow_s: Seconds = 5.0
    #: Snapshot requests per second at most: the share of IB's 50 messages/s snapshots may use. Each snapshot
    #: answered before IB ends it is also cancelled (one more message), so at most 20: both fit the 45/s pacer.
    max_snapshot_msgs_per_s: Annotated[float, msgspec.Meta(gt=0, le=20)] = 10.0
    #: Lines streams never take, so snapshots always have some.
    min_snapshot_lines: Annotated[int, msgspec.Meta(ge=1, le=1_000)] = 2
    #: After IB's 101 taught a lower limit, try one line more this often (s).
    line_probe_s: Seconds = 300.0
    #: A stream keeps its line at least this long (s) before a better-ranked contract may take it.
    min_dwell_s: Seconds = 30.0
    #: At equal priority and expiry, a waiting contract needs this many times the risk to take a line.
    risk_factor: Annotated[float, msgspec.Meta(ge=1, le=1_000)] = 2.0


class MetricsSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Prometheus text endpoint; off by default, loopback only."""

    enabled: bool = False
    host: str = "127.0.0.1"
    #: 0 takes any free port, named in the log's ``metrics at http://host:port/metrics`` line (tests use it:
    #: a port picked, released and then passed here could be taken by another process in between).
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9464


class DemoSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The built-in simulated account of ``--demo``."""

    stocks: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 240
    option_strategies: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 60
    #: How many of the option strategies are registered active (their legs stream).
    active_strategies: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 50
    seed: int = 7
    tick_interval_s: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.5
    #: Seconds a demo runs when --duration is not given (0 = until stopped).
    default_duration_s: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    #: A simulated snapshot takes between these many seconds (IB's take up to ~11 s; each holds a line meanwhile).
    snapshot_latency_s: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.05
    snapshot_latency_max_s: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.5
    #: Lines the simulated account really has (0: as many as max_lines); fewer shows the limit being learned.
    true_lines: Annotated[int, msgspec.Meta(ge=0, le=100_000)] = 0
    #: The account's portfolio updates (a price for every position, no line) this often (0: none).
    portfolio_interval_s: Annotated[float, msgspec.Meta(ge=0, le=3_600)] = 30.0
    #: The simulated gateway drops the connection this often (0: never), as a gateway restart does ...
    disconnect_every_s: Annotated[float, msgspec.Meta(ge=0, le=86_400)] = 0.0
    #: ... and takes this long to come back (the streams are resubmitted, open snapshots come back failed).
    disconnect_for_s: Annotated[float, msgspec.Meta(ge=0, le=3_600)] = 3.0


class AuditSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Signed checkpoints of the event log (storage/checkpoints.py; docs/operations.md, "The signing key")."""

    #: Sign checkpoints. false: no checkpoints, and start-up re-reads the whole chain as before.
    sign: bool = True
    #: The Ed25519 key (PKCS#8 PEM, mode 0600); empty: $XDG_CONFIG_HOME or ~/.config, slotwise/signing.key.
    signing_key: str = ""
    #: A signed checkpoint every this many events, and one at every clean stop.
    checkpoint_every: Annotated[int, msgspec.Meta(ge=100)] = 10_000
    #: Remember each signed data file's hash with its identity (inode, size, mtime, ctime), signed: a start does not
    #: read a file again that is unchanged since (storage/file_hashes.py). false: every start hashes every signed file.
    hash_cache: bool = True
    #: Public keys (hex, as `digest` prints them) of retired signing keys: their checkpoints stay trusted.
    trusted_keys: tuple[Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")], ...] = ()


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    runtime: RuntimeSettings = RuntimeSettings()
    freshness: FreshnessSettings = FreshnessSettings()
    ib: IbSettings = IbSettings()
    log: LogConfig = LogConfig()
    positions: PositionsConfig = PositionsConfig()
    metrics: MetricsSettings = MetricsSettings()
    demo: DemoSettings = DemoSettings()
    audit: AuditSettings = AuditSettings()
    storage: StorageSettings = StorageSettings()


class ConfigError(ValueError):
    """A config file, variable or flag that cannot be used; the message names it."""


#: Keys of earlier versions, and what replaced them (an old config file gets told, not just refused).
_RETIRED = {
    ("runtime", "poll_interval_s"): "the worker keeps snapshots open continuously ([freshness] max_snapshot_msgs_per_s)",
    ("runtime", "batch_size"): "the worker takes as many contracts as lines are free ([freshness] max_snapshot_msgs_per_s)",
    ("runtime", "refresh_interval_s"): "use [freshness] monitoring_s, the target age of a non-active contract's price",
    ("runtime", "snapshot_reserve"): "use [freshness] min_snapshot_lines; every line not streaming serves snapshots",
    ("runtime", "line_cap_hold_s"): "the line limit is learned from IB's 101 and re-probed ([freshness] line_probe_s)",
}

_SECTIONS: dict[str, Any] = {f.name: f.type for f in msgspec.structs.fields(Config)}
_SHORTCUTS = {"SLOTWISE_DATA_DIR": ("runtime", "data_dir")}


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Defaults <- TOML file <- SLOTWISE_* environment <- ``overrides`` (the flags)."""
    data: dict[str, dict[str, Any]] = {}
    #: (section, key) -> where its value came from, so an error names the variable or flag to fix
    origin: dict[tuple[str, str], str] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a directory, not a TOML file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise ConfigError(f"config file {path}: top-level key {section!r} must be a [table]")
            data[section] = dict(values)
    for name, value in (os.environ if environ is None else environ).items():
        target = _env_target(name)
        if target is not None:
            data.setdefault(target[0], {})[target[1]] = _env_value(value)
            origin[target] = f"environment variable {name}"
    for section, values in (overrides or {}).items():
        for key, value in values.items():
            if value is not None:
                data.setdefault(section, {})[key] = value
                origin[(section, key)] = "the command line"
    for section, values in data.items():
        if section not in _SECTIONS:
            raise ConfigError(f"unknown config section [{section}] (known: {', '.join(_SECTIONS)})")
        known = {f.encode_name for f in msgspec.structs.fields(_SECTIONS[section])}
        for key in values:
            if key not in known:
                where = f" (from {origin[(section, key)]})" if (section, key) in origin else ""
                if (section, key) in _RETIRED:
                    raise ConfigError(f"config key {section}.{key}{where} is no longer used: {_RETIRED[(section, key)]}")
                raise ConfigError(f"unknown config key {section}.{key}{where} (known: {', '.join(sorted(known))})")
    _check_client(data, origin)
    try:
        config = msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as exc:
        found = re.search(r"`\$\.(\w+)\.(\w+)", str(exc))
        source = origin.get((found.group(1), found.group(2))) if found else None
        raise ConfigError(f"invalid configuration: {exc}{f' (from {source})' if source else ''}") from None
    _check_relations(config, origin)
    return config


#: Keys each valid alone but not together: (smaller, larger, may they be equal, what would happen otherwise).
_RELATIONS = (
    (("freshness", "min_snapshot_lines"), ("runtime", "max_lines"), False, "streams would get no line"),
    (("runtime", "retry_backoff_s"), ("runtime", "retry_backoff_cap_s"), True, "the first retry would already pass the cap"),
)


def _check_relations(config: Config, origin: Mapping[tuple[str, str], str]) -> None:
    for low, high, equal_ok, why in _RELATIONS:
        a, b = (getattr(getattr(config, section, None), key, None) for section, key in (low, high))
        if a is None or b is None or a < b or (equal_ok and a == b):
            continue
        sources = [f"{'.'.join(k)} from {origin[k]}" for k in (low, high) if k in origin]
        where = f" ({'; '.join(sources)})" if sources else ""
        relation = "at most" if equal_ok else "below"
        raise ConfigError(f"{'.'.join(low)} = {a} must be {relation} {'.'.join(high)} = {b}: {why}{where}")


def _check_client(data: Mapping[str, Mapping[str, Any]], origin: Mapping[tuple[str, str], str]) -> None:
    """``[ib] client``: a library Slotwise knows, and installed here (found, not imported)."""
    if "client" not in data.get("ib", {}):
        return  # the default, ib_insync, is a base dependency
    problem = client_problem(str(data["ib"]["client"]))
    if problem is not None:
        where = f" (from {origin[('ib', 'client')]})" if ("ib", "client") in origin else ""
        raise ConfigError(f"{problem}{where}")


#: SLOTWISE_* variables that are not config keys (read elsewhere).
_NOT_CONFIG = frozenset({"SLOTWISE_LOG_LEVEL"})


def _env_target(name: str) -> tuple[str, str] | None:
    if name in _NOT_CONFIG:
        return None
    if name in _SHORTCUTS:
        return _SHORTCUTS[name]
    if not name.startswith("SLOTWISE_"):
        return None
    rest = name[len("SLOTWISE_") :].lower()
    for section in _SECTIONS:
        if rest.startswith(section + "_"):
            return section, rest[len(section) + 1 :]
    raise ConfigError(f"environment variable {name}: unknown section (expected SLOTWISE_<{'|'.join(_SECTIONS).upper()}>_<FIELD>)")


def _env_value(value: str) -> Any:
    """Environment values are text; TOML scalars (numbers, true/false) are understood."""
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value
