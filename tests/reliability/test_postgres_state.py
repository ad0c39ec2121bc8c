"""A full `run --once` sync on a PostgreSQL state store: exactly once, and no OAuth token in clear.

Uses the server at 127.0.0.1:5432 (database ``test``), like the state-store tests: each test works in a
schema of its own, chosen through the URL (``?options=-csearch_path%3D<schema>``) and dropped afterwards.
When the server is unreachable the test is skipped, unless ``CI=true``, where it fails.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql

from connectors.hubspot.sandbox import HubSpotSandbox
from connectors.sandboxkit import SandboxServer, serve
from connectors.seedbook import generate_book
from connectors.xero.sandbox import XeroSandbox
from sync.crypto import generate_key
from tests.harness import run_cli, write_config

pytestmark = pytest.mark.postgres

PG_SERVER = "postgresql://postgres@127.0.0.1:5432/test"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
HUBSPOT_TOKEN = "pat-eu1-PGSTATEhubspot0a1b2c3d4e5f60718293a4b5c6d7e8f9"
XERO_SECRET = "PGSTATExeroClientSecret9f8e7d6c5b4a39281706"


def _require_pg() -> None:
    try:
        with psycopg.connect(PG_SERVER, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        reason = f"PostgreSQL at {PG_SERVER} is unreachable: {type(exc).__name__}: {exc}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " (CI=true: PostgreSQL tests must run)")
        pytest.skip(reason)


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh, empty schema, dropped afterwards."""
    _require_pg()
    schema = f"lb_sync_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(PG_SERVER, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield schema
    finally:
        with psycopg.connect(PG_SERVER, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def vendors() -> Iterator[tuple[HubSpotSandbox, XeroSandbox, str, str]]:
    hs = HubSpotSandbox(seed=21, access_tokens=(HUBSPOT_TOKEN,))
    hs.load_book(generate_book(21, companies=20, deals=40, won_share=0.5))
    xero = XeroSandbox(seed=21, client_secret=XERO_SECRET)
    servers: list[SandboxServer] = [serve(hs), serve(xero)]
    try:
        yield hs, xero, servers[0].url, servers[1].url
    finally:
        for s in servers:
            s.stop()


def _issued_tokens(xero: XeroSandbox) -> list[str]:
    """Every access and refresh token the Xero sandbox handed out."""
    with xero._auth_lock:
        return [*xero._refresh, *xero._access]


def _rows_as_text(schema: str) -> dict[str, list[str]]:
    """Every row of every table of ``schema``, each rendered as PostgreSQL's text form of the row."""
    with psycopg.connect(PG_SERVER) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s AND table_type = 'BASE TABLE'",
            (schema,),
        )]
        return {t: [r[0] for r in conn.execute(
            sql.SQL("SELECT t::text FROM {}.{} AS t").format(sql.Identifier(schema), sql.Identifier(t))
        )] for t in tables}


def test_run_once_on_postgresql_invoices_each_won_deal_once_and_stores_tokens_encrypted(
    pg_schema: str, vendors: tuple[HubSpotSandbox, XeroSandbox, str, str], tmp_path: Path
) -> None:
    """One invoice per won deal, none on a second run, and no token or secret in clear in any table."""
    hs, xero, hs_url, xero_url = vendors
    initial_refresh = xero.issue_tokens()["refresh_token"]
    state_url = f"{PG_URL}?options={quote(f'-csearch_path={pg_schema}')}"
    cfg = write_config(tmp_path / "lb.yaml", hubspot_url=hs_url, xero_url=xero_url, refresh_token=initial_refresh,
                       state_url=state_url)
    # The Fernet key that encrypts stored tokens comes from a secrets file, as in production.
    (tmp_path / "state.key").write_text(generate_key() + "\n")
    text = cfg.read_text()
    cfg.write_text(text.replace(f"  url: {state_url}\n", f"  url: {state_url}\n  secret_key_file: state.key\n", 1))
    env = {"HUBSPOT_TOKEN": HUBSPOT_TOKEN, "XERO_CLIENT_SECRET": XERO_SECRET}

    won = {f"LB-main:{d['hs_object_id']}" for d in hs.deals_snapshot() if d.get("hs_is_closed_won") == "true"}
    assert len(won) >= 10

    first = run_cli("run", "--once", "--json", "-c", str(cfg), env=env, timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    counts = json.loads(first.stdout)["main"]["counts"]
    assert counts["created"] == len(won)
    refs = sorted(i["Reference"] for i in xero.invoices())
    assert refs == sorted(won)

    second = run_cli("run", "--once", "--json", "-c", str(cfg), env=env, timeout=120)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads(second.stdout)["main"]["counts"].get("created", 0) == 0
    assert sorted(i["Reference"] for i in xero.invoices()) == refs

    # Everything lives in the test's own schema, the tokens included (encrypted).
    rows = _rows_as_text(pg_schema)
    assert len(rows["runs"]) == 2
    assert rows["oauth_tokens"], "the rotated Xero token set was not stored"
    secrets = [HUBSPOT_TOKEN, XERO_SECRET, initial_refresh, *_issued_tokens(xero)]
    assert len(secrets) > 4  # the sandbox issued tokens beyond the initial refresh token
    for table, lines in rows.items():
        dump = "\n".join(lines)
        for secret in secrets:
            assert secret not in dump, f"a secret ({secret[:8]}...) is stored in clear in {table}"
    for secret in secrets:
        assert secret not in first.stdout + first.stderr + second.stdout + second.stderr
