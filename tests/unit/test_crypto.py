"""Key lists and key rotation of the stored OAuth tokens, on SQLite and PostgreSQL, and `ledgerbridge rotate-keys`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet, InvalidToken

from connectors.errors import ConfigError
from sync.crypto import TokenCipher, TokenDecryptionError, generate_key, rotate_stored_tokens, split_keys
from sync.state import TOKENS, StateStore
from tests.harness import run_cli, write_config
from tests.state.conftest import db_url

__all__ = ["db_url"]  # the fixture of tests/state, used here too

CANARY = "rt-CANARY-9d0c1b2a3f4e5d6c7b8a"


def _ciphertexts(store: StateStore) -> dict[str, tuple[str, int]]:
    with store.engine.connect() as conn:
        return {c: (t, g) for c, t, g in conn.execute(
            sa.select(TOKENS.c.connection, TOKENS.c.ciphertext, TOKENS.c.generation))}


def test_a_key_setting_lists_keys_by_commas_newlines_or_spaces() -> None:
    a, b, c = generate_key(), generate_key(), generate_key()
    assert split_keys(f"{a},{b}") == [a, b]
    assert split_keys(f"{a}\n{b}\n\n{c}\n") == [a, b, c]  # a secrets file with one key per line
    assert split_keys(f" {a} ,\n {b}\t") == [a, b]
    old = TokenCipher(b).encrypt("conn", {"refresh_token": CANARY})
    both = TokenCipher(f"{a}\n{b}\n")
    assert both.decrypt("conn", old) == {"refresh_token": CANARY}
    fresh = both.encrypt("conn", {"refresh_token": CANARY})
    assert TokenCipher(a).decrypt("conn", fresh) == {"refresh_token": CANARY}  # the first key encrypts
    with pytest.raises(TokenDecryptionError):
        TokenCipher(b).decrypt("conn", fresh)
    with pytest.raises(ConfigError, match="part 2 of 2") as err:
        TokenCipher(f"{a}\nnot-a-key")
    assert a not in str(err.value)
    with pytest.raises(ConfigError, match="empty"):
        TokenCipher(" ,\n")


@pytest.fixture
def stored(db_url: str) -> tuple[str, str]:
    """A database holding two tokens sealed with an old key; yields (url, old key)."""
    old = generate_key()
    store = StateStore.open(db_url, secret_key=old)
    try:
        store.save_token("xero:a", {"refresh_token": CANARY, "access_token": "at-1"})
        store.save_token("xero:a", {"refresh_token": CANARY + "-2", "access_token": "at-2"})
        store.save_token("qbo:b", {"refresh_token": "rt-b"})
    finally:
        store.close()
    return db_url, old


def test_rotation_reseals_every_token_with_the_newest_key_and_keeps_tokens_and_generations(
    stored: tuple[str, str]
) -> None:
    url, old = stored
    new = generate_key()
    store = StateStore(url, secret_key=f"{new},{old}")
    try:
        before = _ciphertexts(store)
        report = rotate_stored_tokens(store, f"{new},{old}")
        after = _ciphertexts(store)
    finally:
        store.close()
    assert (report.tokens, report.rotated, report.keys) == (2, 2, 2)
    assert set(after) == {"xero:a", "qbo:b"}
    for connection, (ciphertext, generation) in after.items():
        assert ciphertext != before[connection][0]
        assert generation == before[connection][1]  # a rotation is not a new token
        Fernet(new.encode()).decrypt(ciphertext.encode())
        with pytest.raises(InvalidToken):
            Fernet(old.encode()).decrypt(ciphertext.encode())
    only_new = StateStore(url, secret_key=new)
    try:
        assert only_new.load_token("xero:a") == {"refresh_token": CANARY + "-2", "access_token": "at-2"}
        assert only_new.load_token("qbo:b") == {"refresh_token": "rt-b"}
        assert only_new.token_generation("xero:a") == 2
    finally:
        only_new.close()


def test_rotation_without_the_old_key_fails_without_naming_a_key_or_a_token(stored: tuple[str, str]) -> None:
    url, old = stored
    new = generate_key()
    store = StateStore(url, secret_key=new)
    try:
        with pytest.raises(TokenDecryptionError) as err:
            rotate_stored_tokens(store, new)
        before = _ciphertexts(store)
    finally:
        store.close()
    for secret in (new, old, CANARY):
        assert secret not in str(err.value)
    reader = StateStore(url, secret_key=old)  # nothing was damaged
    try:
        assert reader.load_token("qbo:b") == {"refresh_token": "rt-b"}
        assert set(before) == {"xero:a", "qbo:b"}
    finally:
        reader.close()


def test_rotate_keys_command_on_sqlite_with_its_key_file(tmp_path: Path) -> None:
    """The key file beside a SQLite database takes the new key first; the command reseals; the old key can go."""
    db = tmp_path / "state.db"
    store = StateStore.open(f"sqlite:///{db}")  # creates state.db.key
    try:
        store.save_token("xero:main", {"refresh_token": CANARY})
    finally:
        store.close()
    key_file = db.with_name("state.db.key")
    old = key_file.read_text().strip()
    new = generate_key()
    key_file.write_text(f"{new}\n{old}\n")
    cfg = write_config(tmp_path / "lb.yaml", hubspot_url="http://127.0.0.1:9", xero_url="http://127.0.0.1:9",
                       refresh_token="r", state_url=f"sqlite:///{db}")

    done = run_cli("rotate-keys", "-c", str(cfg), "--json", timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"tokens": 1, "rotated": 1, "keys": 2}
    for secret in (new, old, CANARY):
        assert secret not in done.stdout + done.stderr

    key_file.write_text(new + "\n")
    reader = StateStore(f"sqlite:///{db}")
    try:
        assert reader.load_token("xero:main") == {"refresh_token": CANARY}
    finally:
        reader.close()

    key_file.write_text(generate_key() + "\n")  # a key that opens nothing: exit 1, a message, no traceback
    failed = run_cli("rotate-keys", "-c", str(cfg), timeout=60)
    assert failed.returncode == 1
    assert "cannot re-encrypt a stored OAuth token" in failed.stderr
    assert "Traceback" not in failed.stderr
