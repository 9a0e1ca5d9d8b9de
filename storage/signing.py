"""The signing key of the event log's checkpoints: Ed25519, kept outside the data directory.

The hash chain proves that rows fit together, not who wrote them: anyone
who can write the data directory can edit a row and recompute every hash
after it (``storage/hashing.py`` is public). A signature by a key that
lives elsewhere (``~/.config/slotwise/signing.key`` by default) is what such
an insider cannot produce, so signed checkpoints and exported digests hold
against them.

Library: ``cryptography`` (PyCA). It reads and writes the key as standard
PKCS#8 PEM, so ``openssl pkey -in signing.key -pubout`` and any other tool
can inspect, back up or convert it, and it was already installed with the
test dependencies. PyNaCl has no standard key-file format of its own.

Every problem with a key (missing, not a key, not Ed25519, encrypted,
readable by others) is a :class:`SigningKeyError` with one line that names
the file: a runtime never falls back to unsigned checkpoints by itself.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from loguru import logger

__all__ = [
    "Signer",
    "SigningKeyError",
    "default_key_path",
    "fingerprint",
    "load_signer",
    "resolve_key_path",
    "signature_valid",
]


class SigningKeyError(ValueError):
    """The signing key cannot be used; the message is one line naming the file."""


def default_key_path() -> Path:
    """``$XDG_CONFIG_HOME/slotwise/signing.key``, else ``~/.config/slotwise/signing.key``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "slotwise" / "signing.key"


def resolve_key_path(configured: str) -> Path:
    """The configured path (``~`` expanded), or the default when none is configured."""
    return Path(configured).expanduser() if configured else default_key_path()


def fingerprint(public_key_hex: str) -> str:
    """sha256 of the raw 32-byte public key, hex: what an auditor compares by eye."""
    return hashlib.sha256(bytes.fromhex(public_key_hex)).hexdigest()


def signature_valid(public_key_hex: str, message: bytes, signature_hex: str) -> bool:
    """Whether ``signature_hex`` is ``public_key_hex``'s Ed25519 signature of ``message``.

    Malformed hex or a key of the wrong length is simply "not valid": the
    inputs come from tables and files an attacker may have written.
    """
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
        key.verify(bytes.fromhex(signature_hex), message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


class Signer:
    """An Ed25519 private key and what others need to check its signatures."""

    def __init__(self, key: Ed25519PrivateKey, path: Path) -> None:
        self._key = key
        self.path = path
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public_key = raw.hex()
        self.fingerprint = fingerprint(self.public_key)

    def sign(self, message: bytes) -> str:
        return self._key.sign(message).hex()


def load_signer(path: Path, *, create: bool = False) -> Signer:
    """Load the key at ``path``; with ``create``, make a new one there first if there is none.

    A key readable by group or others is refused, as ssh refuses such a
    key: a signature proves nothing once the key may have been copied.
    """
    if create and not path.exists():
        _create(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise SigningKeyError(
            f"signing key {path} does not exist (restore it from its backup, or see docs/operations.md)"
        ) from None
    except OSError as exc:
        raise SigningKeyError(f"signing key {path} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise SigningKeyError(f"signing key {path} is not a regular file")
    if mode & 0o077:
        raise SigningKeyError(
            f"signing key {path} is readable by others (mode {stat.S_IMODE(mode):04o}): run chmod 600 {path}"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"signing key {path} cannot be read: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SigningKeyError(f"signing key {path} is encrypted; Slotwise needs an unencrypted PKCS#8 key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise SigningKeyError(f"signing key {path} is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "")
        raise SigningKeyError(f"signing key {path} is a {kind} key, not Ed25519")
    return Signer(key, path)


def _create(path: Path) -> None:
    """A new key, written owner-only and fsynced (file and directory) before it is used."""
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # another process made it first: use theirs
    except OSError as exc:
        raise SigningKeyError(f"signing key {path} cannot be created: {exc.strerror}") from None
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    logger.warning("created a new signing key {}: back it up (docs/operations.md, 'The signing key')", path)
