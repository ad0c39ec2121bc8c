"""OAuth tokens: encrypted at rest, key handling, and the refresh lock, on SQLite and PostgreSQL."""

from __future__ import annotations

import stat
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from connectors.errors import ConfigError
from sync.crypto import TokenDecryptionError, generate_key
from sync.state import StateStore

CANARY = "rt-CANARY-5f1d0c9a7e3b"


def _raw_token_rows(store: StateStore) -> list[tuple[object, ...]]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text("SELECT * FROM oauth_tokens"))]


def test_tokens_are_encrypted_at_rest(store: StateStore, db_url: str) -> None:
    """The saved token reads back through load(), but no column (nor the SQLite files) holds it in clear."""
    tokens = store.token_store()
    assert tokens.load("xero-main") is None
    tokens.save("xero-main", {"refresh_token": CANARY, "access_token": "at-1", "expires_at": 1_700_000_000})
    assert tokens.load("xero-main") == {"refresh_token": CANARY, "access_token": "at-1", "expires_at": 1_700_000_000}
    rows = _raw_token_rows(store)
    assert len(rows) == 1
    assert all(CANARY not in str(value) and "at-1" not in str(value) for value in rows[0])
    if store.dialect == "sqlite":
        db = Path(sa.make_url(db_url).database or "")
        for path in (db, db.with_name(db.name + "-wal")):
            if path.exists():
                assert CANARY.encode() not in path.read_bytes()


def test_save_bumps_the_generation_and_replaces_the_token(store: StateStore) -> None:
    """Each save replaces the token and increments the row's generation."""
    tokens = store.token_store()
    assert store.token_generation("qbo") == 0
    tokens.save("qbo", {"refresh_token": "one"})
    tokens.save("qbo", {"refresh_token": "two"})
    assert tokens.load("qbo") == {"refresh_token": "two"}
    assert store.token_generation("qbo") == 2
    assert tokens.load("other") is None


def test_a_wrong_key_cannot_decrypt(store: StateStore, db_url: str, secret_key: str) -> None:
    """Another key fails with a clear error that carries neither key nor token."""
    store.token_store().save("xero-main", {"refresh_token": CANARY})
    other_key = generate_key()
    other = StateStore(db_url, secret_key=other_key)
    try:
        with pytest.raises(TokenDecryptionError, match="xero-main") as info:
            other.token_store().load("xero-main")
    finally:
        other.close()
    message = str(info.value)
    assert "secret key" in message
    for secret in (CANARY, secret_key, other_key):
        assert secret not in message
        assert secret not in repr(info.value)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_key_rotation_with_several_keys(store: StateStore, db_url: str, secret_key: str) -> None:
    """A comma-separated key list decrypts with any of its keys and encrypts with the first."""
    store.token_store().save("xero-main", {"refresh_token": CANARY})
    new_key = generate_key()
    rotated = StateStore(db_url, secret_key=f"{new_key},{secret_key}")
    try:
        assert rotated.token_store().load("xero-main") == {"refresh_token": CANARY}
        rotated.token_store().save("xero-main", {"refresh_token": "after-rotation"})
    finally:
        rotated.close()
    only_new = StateStore(db_url, secret_key=new_key)
    try:
        assert only_new.token_store().load("xero-main") == {"refresh_token": "after-rotation"}
    finally:
        only_new.close()


def test_an_invalid_key_is_a_config_error_without_the_key(tmp_path: Path) -> None:
    """A malformed secret key is rejected at construction, and the message does not repeat it."""
    bad = "not-a-fernet-key-but-still-secret"
    with pytest.raises(ConfigError) as info:
        StateStore(f"sqlite:///{tmp_path / 's.db'}", secret_key=bad)
    assert bad not in str(info.value)
    assert info.value.__cause__ is None


def test_postgresql_needs_a_secret_key() -> None:
    """A PostgreSQL store without secret_key is a configuration error (key files are for SQLite only)."""
    with pytest.raises(ConfigError, match="secret_key"):
        StateStore("postgresql+psycopg://postgres@127.0.0.1:5432/test")


def test_sqlite_key_file_is_private_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """open() on a relative SQLite URL creates <db>.key (0600) beside the database and reuses it later."""
    monkeypatch.chdir(tmp_path)
    store = StateStore.open("sqlite:///data/state.db")
    try:
        store.token_store().save("xero-main", {"refresh_token": CANARY})
    finally:
        store.close()
    key_file = tmp_path / "data" / "state.db.key"
    assert (tmp_path / "data" / "state.db").exists()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert CANARY not in key_file.read_text()
    monkeypatch.chdir(tmp_path / "data")  # the path was resolved when the store was first opened
    again = StateStore.open(f"sqlite:///{tmp_path / 'data' / 'state.db'}")
    try:
        assert again.token_store().load("xero-main") == {"refresh_token": CANARY}
    finally:
        again.close()


@pytest.mark.parametrize("same_store", [True, False], ids=["one-store", "two-stores"])
def test_token_lock_serialises_two_threads(db_url: str, secret_key: str, same_store: bool) -> None:
    """While one thread holds a connection's token lock, another waits, then sees the token it saved."""
    first = StateStore.open(db_url, secret_key=secret_key)
    second = first if same_store else StateStore(db_url, secret_key=secret_key)
    events: list[str] = []
    seen: list[object] = []
    holding = threading.Event()
    waited: list[float] = []

    def holder() -> None:
        with first.token_lock("xero-main"):
            events.append("A in")
            holding.set()
            time.sleep(0.4)
            first.token_store().save("xero-main", {"refresh_token": "rotated-by-A"})
            events.append("A saved")
            time.sleep(0.1)
            events.append("A out")

    def waiter() -> None:
        holding.wait(timeout=10)
        start = time.monotonic()
        with second.token_lock("xero-main"):
            waited.append(time.monotonic() - start)
            events.append("B in")
            seen.append(second.token_store().load("xero-main"))
        with second.token_lock("other-connection"):  # other connections are not blocked
            pass

    threads = [threading.Thread(target=holder), threading.Thread(target=waiter)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert events == ["A in", "A saved", "A out", "B in"]
        assert waited
        assert waited[0] >= 0.4
        assert seen == [{"refresh_token": "rotated-by-A"}]
    finally:
        first.close()
        second.close()


def test_token_lock_is_reentrant_and_does_not_block_saves(store: StateStore, db_url: str, secret_key: str) -> None:
    """Inside the lock, the same thread may re-enter it, and a save is durable (seen by another store) at once."""
    other = StateStore(db_url, secret_key=secret_key)
    try:
        with store.token_lock("xero-main"), store.token_lock("xero-main"):
            store.token_store().save("xero-main", {"refresh_token": CANARY})
            assert other.token_store().load("xero-main") == {"refresh_token": CANARY}
    finally:
        other.close()
