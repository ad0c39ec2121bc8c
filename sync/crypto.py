"""Encryption at rest for OAuth tokens kept in the state database.

Tokens are sealed with Fernet (AES-128-CBC plus HMAC-SHA256, from ``cryptography``). The key never lives in
the database: it is given in the configuration (``secret_key``) or, for a single-host SQLite store, kept in
a key file next to the database that is created readable by its owner only.

``secret_key`` may hold several Fernet keys, newest first, separated by commas or newlines (so a secrets
file can hold one key per line): the first one encrypts, every one of them is tried to decrypt. That is how
a key is rotated: put the new key first, run ``ledgerbridge rotate-keys`` (:func:`rotate_stored_tokens`),
which re-encrypts every stored token with it, then drop the old key.

No message raised here ever contains a key or a token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from connectors.errors import ConfigError

if TYPE_CHECKING:
    from sync.state import StateStore

__all__ = [
    "KeyRotation",
    "TokenCipher",
    "TokenDecryptionError",
    "generate_key",
    "load_or_create_key_file",
    "rotate_stored_tokens",
    "split_keys",
]


class TokenDecryptionError(ConfigError):
    """A stored token cannot be decrypted: the secret key is not the one it was encrypted with."""


def generate_key() -> str:
    """A new random Fernet key (url-safe base64 text)."""
    return Fernet.generate_key().decode("ascii")


def split_keys(secret_key: str) -> list[str]:
    """The keys of a key setting, newest first: separated by commas, newlines or other whitespace."""
    return [p for p in re.split(r"[,\s]+", secret_key) if p]


def _parse_keys(secret_key: str) -> list[Fernet]:
    parts = split_keys(secret_key)
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


@dataclasses.dataclass(frozen=True)
class KeyRotation:
    """What :func:`rotate_stored_tokens` did: how many stored tokens it found and re-encrypted."""

    tokens: int
    rotated: int
    keys: int


def rotate_stored_tokens(store: StateStore, secret_key: str) -> KeyRotation:
    """Re-encrypt every token in ``store`` with the first key of ``secret_key`` (the others only decrypt).

    Each token is rotated under its connection's refresh lock and written back only if it is still the
    value that was read (a token refreshed meanwhile was already sealed by a daemon; it is read again),
    so running this while daemons refresh tokens loses nothing. The token itself and its generation are
    unchanged. Afterwards every token opens with the first key alone, which is checked before returning:
    the old keys can then be removed from the configuration.

    Raises :class:`TokenDecryptionError` when a stored token opens with none of the keys (nothing written
    for that token; the ones before it stay rotated, which is harmless).
    """
    import sqlalchemy as sa

    from sync.state import TOKENS

    keys = split_keys(secret_key)
    cipher = TokenCipher(secret_key)
    newest = Fernet(keys[0].encode("ascii"))
    with store.engine.connect() as conn:
        connections = [str(c) for c in conn.execute(sa.select(TOKENS.c.connection).order_by(TOKENS.c.connection))
                       .scalars()]
    rotated = 0
    for connection in connections:
        with store.token_lock(connection):
            while True:
                with store.engine.connect() as conn:
                    current = conn.execute(
                        sa.select(TOKENS.c.ciphertext).where(TOKENS.c.connection == connection)
                    ).scalar()
                if current is None:
                    break  # deleted meanwhile
                fresh = cipher.rotate(str(current))
                with store.engine.begin() as conn:
                    changed = conn.execute(
                        TOKENS.update()
                        .where(TOKENS.c.connection == connection, TOKENS.c.ciphertext == current)
                        .values(ciphertext=fresh)
                    ).rowcount
                if changed == 1:
                    rotated += 1
                    break
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(TOKENS.c.connection, TOKENS.c.ciphertext)).all()
    for connection, ciphertext in rows:
        try:
            newest.decrypt(str(ciphertext).encode("ascii"))
        except (InvalidToken, UnicodeEncodeError):
            raise TokenDecryptionError(
                f"the stored OAuth token of connection {connection!r} is not sealed with the newest key after "
                "rotation (was it saved meanwhile by a process that does not have the new key first?)"
            ) from None
    return KeyRotation(tokens=len(rows), rotated=rotated, keys=len(keys))
