"""Encryption at rest for OAuth tokens kept in the state database.

Tokens are sealed with Fernet (AES-128-CBC plus HMAC-SHA256, from ``cryptography``). The key never lives in
the database: it is given in the configuration (``secret_key``) or, for a single-host SQLite store, kept in
a key file next to the database that is created readable by its owner only.

``secret_key`` may hold several Fernet keys separated by commas: the first one encrypts, every one of them
is tried to decrypt. That is how a key is rotated: put the new key first, keep the old one until every
token has been saved again.

No message raised here ever contains a key or a token.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from connectors.errors import ConfigError

__all__ = ["TokenCipher", "TokenDecryptionError", "generate_key", "load_or_create_key_file"]


class TokenDecryptionError(ConfigError):
    """A stored token cannot be decrypted: the secret key is not the one it was encrypted with."""


def generate_key() -> str:
    """A new random Fernet key (url-safe base64 text)."""
    return Fernet.generate_key().decode("ascii")


def _parse_keys(secret_key: str) -> list[Fernet]:
    parts = [p.strip() for p in secret_key.split(",") if p.strip()]
    if not parts:
        raise ConfigError("the state secret key is empty")
    fernets: list[Fernet] = []
    for index, part in enumerate(parts, start=1):
        try:
            fernets.append(Fernet(part.encode("ascii")))
        except (ValueError, UnicodeEncodeError):
            # The key itself must not appear in the message, nor in a chained exception.
            raise ConfigError(
                f"the state secret key (part {index} of {len(parts)}) is not a valid Fernet key: "
                "expected 32 url-safe base64-encoded bytes"
            ) from None
    return fernets


def load_or_create_key_file(path: Path) -> str:
    """Read the key in ``path``, creating the file (mode 0600) with a new key if it does not exist.

    Creation is atomic: the key is written to a private temporary file and hard-linked into place, so two
    processes starting at once agree on one key and never read a half-written file.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".key-", dir=path.parent)  # mkstemp creates it 0600
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (generate_key() + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp_name, path)
        except FileExistsError:
            pass  # another process won the race; use its key
        finally:
            os.unlink(tmp_name)
        with contextlib.suppress(OSError):  # make the new directory entry durable too
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    try:
        key = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the state key file {path}: {type(exc).__name__}") from None
    _parse_keys(key)
    return key


class TokenCipher:
    """Seals and opens token dictionaries; the connection name is bound into the sealed payload."""

    def __init__(self, secret_key: str) -> None:
        self._fernet = MultiFernet(_parse_keys(secret_key))

    def __repr__(self) -> str:
        return "TokenCipher(<hidden>)"

    def encrypt(self, connection: str, token: dict[str, Any]) -> str:
        """Encrypt ``token`` (JSON types only) for ``connection``; returns url-safe text."""
        try:
            plain = json.dumps({"connection": connection, "token": token}, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"token for {connection!r} must hold JSON values only: {exc}") from None
        return self._fernet.encrypt(plain.encode("utf-8")).decode("ascii")

    def decrypt(self, connection: str, ciphertext: str) -> dict[str, Any]:
        """Open a token sealed by :meth:`encrypt` for the same ``connection``."""
        try:
            plain = self._fernet.decrypt(ciphertext.encode("ascii"))
        except (InvalidToken, UnicodeEncodeError):
            raise TokenDecryptionError(
                f"cannot decrypt the stored OAuth token of connection {connection!r}: the state secret key "
                "is not the key it was encrypted with (or the stored value is damaged)"
            ) from None
        payload = json.loads(plain)
        if not isinstance(payload, dict) or payload.get("connection") != connection:
            raise TokenDecryptionError(
                f"the stored OAuth token of connection {connection!r} was sealed for another connection"
            )
        token = payload.get("token")
        if not isinstance(token, dict):
            raise TokenDecryptionError(f"the stored OAuth token of connection {connection!r} is malformed")
        return token

    def rotate(self, ciphertext: str) -> str:
        """Re-encrypt ``ciphertext`` with the first (current) key."""
        try:
            return self._fernet.rotate(ciphertext.encode("ascii")).decode("ascii")
        except (InvalidToken, UnicodeEncodeError):
            raise TokenDecryptionError(
                "cannot re-encrypt a stored OAuth token: none of the state secret keys opens it"
            ) from None
