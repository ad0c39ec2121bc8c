"""Fixtures of the state-store tests: every test runs against SQLite and against PostgreSQL.

PostgreSQL tests are marked ``postgres`` and use the server at 127.0.0.1:5432 (database ``test``). Each
one gets a schema of its own (selected with ``search_path`` in the URL), dropped afterwards, so runs can
repeat and parallel CI jobs never share tables. When the server is unreachable the tests are skipped,
unless ``CI=true``, where they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

from sync.crypto import generate_key
from sync.state import StateStore

PG_SERVER = "postgresql://postgres@127.0.0.1:5432/test"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

_pg_error: list[str] = []


def _pg_unreachable() -> str | None:
    """Why the PostgreSQL test server cannot be used, or None (checked once per session)."""
    if not _pg_error:
        try:
            with psycopg.connect(PG_SERVER, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
            _pg_error.append("")
        except psycopg.Error as exc:
            _pg_error.append(f"PostgreSQL at {PG_SERVER} is unreachable: {type(exc).__name__}: {exc}")
    return _pg_error[0] or None


def _require_pg() -> None:
    reason = _pg_unreachable()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " (CI=true: PostgreSQL tests must run)")
        pytest.skip(reason)


def pg_schema_url(schema: str) -> str:
    """A URL whose connections all work in ``schema``."""
    return f"{PG_URL}?options={quote(f'-csearch_path={schema}')}"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh PostgreSQL schema that is dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    _require_pg()
    schema = f"lb_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(PG_SERVER, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield pg_schema_url(schema)
    finally:
        with psycopg.connect(PG_SERVER, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def secret_key() -> str:
    return generate_key()


@pytest.fixture
def store(db_url: str, secret_key: str) -> Iterator[StateStore]:
    """A migrated store on the fresh database."""
    s = StateStore.open(db_url, secret_key=secret_key)
    try:
        yield s
    finally:
        s.close()
