"""Fixtures of the object-storage tests: one real S3 API server for the session, a fresh bucket per test.

The server (moto's, serialised: see ``tests/support/s3_server.py``) runs in a
child process on a free loopback port. Every client here, delta-rs in this
process and the runtimes started as subprocesses alike, finds it through the
standard ``AWS_*`` environment variables, as a user's would find real S3.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.support.s3_server import S3Server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """``s3://<new bucket>``, with the ``AWS_*`` variables pointing at the loopback server."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server.create_bucket(f"slotwise-{uuid.uuid4().hex[:12]}")
