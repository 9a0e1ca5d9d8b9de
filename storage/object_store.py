"""Where an ``s3://`` data directory's endpoint and credentials come from: ``[storage]`` or ``AWS_*``.

delta-rs (and DuckDB, Polars, boto3) find S3 through the standard ``AWS_*``
environment variables. ``[storage]`` in the config file is the same set of
settings for a runtime started by a service manager with a config file and
nothing else: at start-up each non-empty key is put into this process's
environment, where every table open (events, snapshots, positions,
checkpoints, every reader) and every child process find it. That is one
place instead of ``storage_options`` threaded through every table class.
A key left empty leaves the environment as it was; a key that is set wins
over the environment, since it was written for Slotwise on purpose.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping
from pathlib import Path

import msgspec

__all__ = [
    "StorageSettings",
    "configuration_problem",
    "export_storage_settings",
    "is_s3",
    "reach_problem",
    "store_error",
]


class StorageSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """S3-compatible object storage (config file table ``[storage]``); empty means "from the environment"."""

    #: ``AWS_ENDPOINT_URL``: an S3-compatible server (MinIO, Ceph, ...); empty for AWS itself.
    endpoint_url: str = ""
    #: ``AWS_REGION``.
    region: str = ""
    #: ``AWS_ALLOW_HTTP``: allow a plain-http endpoint (a server on loopback or a private network).
    allow_http: bool = False
    #: ``AWS_ACCESS_KEY_ID``.
    access_key_id: str = ""
    #: ``AWS_SECRET_ACCESS_KEY`` (a config file holding it must be readable by the runtime's user only).
    secret_access_key: str = ""


_VARIABLES = {
    "endpoint_url": "AWS_ENDPOINT_URL",
    "region": "AWS_REGION",
    "access_key_id": "AWS_ACCESS_KEY_ID",
    "secret_access_key": "AWS_SECRET_ACCESS_KEY",
}


def export_storage_settings(settings: StorageSettings, environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Put the non-empty ``[storage]`` keys into ``environ`` (the process environment); returns the names set."""
    env = os.environ if environ is None else environ
    exported = []
    for field, variable in _VARIABLES.items():
        value = getattr(settings, field)
        if value:
            env[variable] = value
            exported.append(variable)
    if settings.allow_http:
        env["AWS_ALLOW_HTTP"] = "true"
        exported.append("AWS_ALLOW_HTTP")
    return exported


# ---------------------------------------------------------------------- checks before a table is opened
#
# delta-rs's answer to a missing credential or an unreachable endpoint is an OSError whose text
# is a chain of Rust errors ("Operation not supported", "Generic S3 error ↳ ..."), after up to
# 10 retries over 3 minutes. An operator deserves one line naming what to set, before anything
# is opened: so the configuration is checked first without a network call, then one listing
# of the data dir's events folder is made with a short retry budget.

_S3_SCHEMES = ("s3://", "s3a://")
#: The probe's budget: a refused connection fails in well under a second, a black hole in ~10 s.
_PROBE_OPTIONS = {"max_retries": "2", "retry_timeout": "10s", "connect_timeout": "3s", "timeout": "10s"}
_CREDENTIALS_HINT = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or [storage] in the config"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TIMED_OUT = re.compile(r"timed out|timeout occurred|deadline has elapsed", re.IGNORECASE)


def is_s3(uri: str) -> bool:
    return uri.startswith(_S3_SCHEMES)


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _on_ec2(root: Path) -> bool:
    """Whether this machine is an EC2 instance, from local files only (its instance role is then a credential)."""
    for name, mark in (("sys/class/dmi/id/sys_vendor", "amazon ec2"), ("sys/hypervisor/uuid", "ec2")):
        try:
            if (root / name).read_text().strip().lower().startswith(mark):
                return True
        except OSError:
            continue
    return False


def configuration_problem(uri: str, environ: Mapping[str, str] | None = None, *, root: Path = Path("/")) -> str | None:
    """Why ``uri`` (an ``s3://`` URI) cannot be reached as configured, or None; no network call.

    Only what certainly fails is refused. A credential may come from the
    ``AWS_*`` variables (``[storage]`` is exported there first), a profile
    or the shared ``~/.aws`` files, a web identity (EKS), a container
    endpoint (ECS), or an EC2 instance role: with any of those present this
    says nothing and the probe (:func:`reach_problem`) has the last word.
    """
    if not is_s3(uri):
        return None
    env = os.environ if environ is None else environ

    def given(name: str) -> bool:
        return bool(env.get(name, "").strip())

    home = Path(env.get("HOME") or "~").expanduser()
    shared = [
        Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials"),
        Path(env.get("AWS_CONFIG_FILE") or home / ".aws" / "config"),
    ]
    files = any(path.is_file() for path in shared)
    ec2 = not _true(env.get("AWS_EC2_METADATA_DISABLED")) and _on_ec2(root)
    keys = [given("AWS_ACCESS_KEY_ID"), given("AWS_SECRET_ACCESS_KEY")]
    if any(keys) and not all(keys):
        present, missing = (
            ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
            if keys[0]
            else ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
        )
        return f"{uri}: {present} is set but {missing} is not ({_CREDENTIALS_HINT})"
    other_sources = (
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    )
    if not (all(keys) or _true(env.get("AWS_SKIP_SIGNATURE")) or files or ec2 or any(given(n) for n in other_sources)):
        return f"{uri}: no AWS credentials ({_CREDENTIALS_HINT})"
    endpoint = any(given(n) for n in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT"))
    # AWS itself needs the bucket's region; an S3-compatible endpoint (MinIO, Ceph) does without
    if not (endpoint or given("AWS_REGION") or given("AWS_DEFAULT_REGION") or files or ec2):
        return f"{uri}: no AWS region (set AWS_REGION, or region in [storage] of the config)"
    return None


def _endpoint(environ: Mapping[str, str]) -> str:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"):
        if environ.get(name, "").strip():
            return environ[name].strip()
    region = environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    return f"https://s3.{region}.amazonaws.com" if region else "AWS S3"


def store_error(uri: str, exc: BaseException, environ: Mapping[str, str] | None = None) -> str | None:
    """One line saying why the object store refused, from a delta-rs error; None if ``exc`` is not that.

    delta-rs raises these as a bare ``OSError`` (or a ``DeltaError`` for a
    table open) whose text is the Rust error chain, one cause a line.
    """
    env = os.environ if environ is None else environ
    text = _ANSI.sub("", str(exc))
    causes = [line.strip().lstrip("↳").strip() for line in text.splitlines() if line.strip()]
    if not is_s3(uri) or not causes:
        return None
    if "169.254.169.254" in text or "credential" in text.lower():
        return f"{uri}: no AWS credentials ({_CREDENTIALS_HINT})"
    if "NoSuchBucket" in text:
        bucket = uri.split("://", 1)[1].split("/", 1)[0]
        return f"{uri}: bucket {bucket!r} does not exist at {_endpoint(env)}"
    if "URL scheme is not allowed" in text:
        return f"{uri}: {_endpoint(env)} is plain http: set AWS_ALLOW_HTTP=true, or allow_http = true in [storage]"
    for code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken"):
        if code in text:
            return f"{uri}: the object store at {_endpoint(env)} refused the credentials ({code})"
    timed_out = _TIMED_OUT.search(text) is not None  # not "retry_timeout", which every retried error names
    if "error sending request" in text or timed_out:
        reason = next((c for c in reversed(causes) if c[0].isalpha()), causes[-1])
        if "Connection refused" in text:
            reason = "connection refused (nothing listens there)"
        elif "dns error" in text:
            reason = "the host name does not resolve"
        elif timed_out:
            reason = "timed out"
        return f"{uri}: cannot reach the object store at {_endpoint(env)}: {reason}"
    if "Generic S3 error" not in text and "Object Store" not in text:
        return None
    status = next((c for c in causes if c[:3].isdigit()), None)
    return f"{uri}: the object store at {_endpoint(env)} answered {status or causes[-1][:200]}"


def reach_problem(uri: str) -> str | None:
    """Why ``uri`` (an ``s3://`` URI) cannot be used, or None: the configuration, then one listing.

    The listing is of the events table's log folder (what every command
    opens first), with a short retry budget so an unreachable endpoint is
    reported in seconds rather than after delta-rs's three minutes of retries.
    """
    problem = configuration_problem(uri)
    if problem is not None or not is_s3(uri):
        return problem
    from deltalake import DeltaTable

    try:
        DeltaTable.is_deltatable(f"{uri.rstrip('/')}/events", storage_options=dict(_PROBE_OPTIONS))
    except Exception as exc:  # noqa: BLE001 - delta-rs raises OSError, DeltaError or its subclasses alike
        return (
            store_error(uri, exc)
            or f"{uri}: the object store cannot be read: {_ANSI.sub('', str(exc)).splitlines()[0]}"
        )
    return None
