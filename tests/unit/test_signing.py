"""The signing key file: created owner-only by the code itself, whatever the process umask.

The runtime also sets a private umask (storage/permissions.py), which would
hide a key created with loose permissions; benchmarks and tools that create
a key through :func:`storage.signing.load_signer` do not, so the key's own
mode is checked here with the umask opened wide.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.signing import load_signer


@pytest.fixture
def open_umask() -> Iterator[None]:
    previous = os.umask(0)
    yield
    os.umask(previous)


@pytest.mark.usefixtures("open_umask")
def test_a_created_key_is_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    key = tmp_path / "config" / "slotwise" / "signing.key"
    signer = load_signer(key, create=True)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert load_signer(key).public_key == signer.public_key  # the same key is read back, not replaced
