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
from collections.abc import MutableMapping

import msgspec

__all__ = ["StorageSettings", "export_storage_settings"]


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
