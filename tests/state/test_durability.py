"""Durability: SQLite connection settings, and committed state surviving a killed process."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from connectors.interfaces import Cursor
from sync.state import SQLITE_BUSY_TIMEOUT_MS, StateStore

REPO = Path(__file__).resolve().parents[2]

KILLED_AFTER_COMMIT = textwrap.dedent(
    """
    import datetime as dt, os, signal, sys
    from connectors.interfaces import Cursor
    from sync.state import Confirmed, IntentData, StateStore

    url, key = sys.argv[1], sys.argv[2]
    store = StateStore.open(url, secret_key=key)
    run = store.start_run("p")
    i = IntentData("p", "invoice", "D1", 1, "key-D1", "LB-D1", "fp-1")
    store.add_intents([i])
    store.record_outcomes(
        "p", run,
        confirmed=[Confirmed("key-D1", "D1", "inv-1", "INV-0001", "LB-D1", "fp-1", 1)],
        failed=[],
        cursor=("deals", Cursor(dt.datetime(2024, 7, 1, 12, 0, 0, 42, tzinfo=dt.UTC), "D1")),
    )
    store.token_store().save("xero-main", {"refresh_token": "rotated"})
    os.kill(os.getpid(), signal.SIGKILL)
    """
)

HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from sync.state import StateStore

    store = StateStore.open(sys.argv[1], secret_key=sys.argv[2])
    with store.token_lock("xero-main"):
        print("locked", flush=True)
        time.sleep(0.6)
        store.token_store().save("xero-main", {"refresh_token": "from-child"})
    print("released", flush=True)
    """
)


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sqlite_connections_use_wal_full_sync_and_busy_timeout(store: StateStore) -> None:
    """Every SQLite connection runs in WAL mode with synchronous=FULL, foreign keys and a busy timeout."""
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == SQLITE_BUSY_TIMEOUT_MS


def test_committed_outcomes_survive_sigkill(db_url: str, secret_key: str) -> None:
    """A process SIGKILLed right after record_outcomes and a token save returns leaves all of it behind."""
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_COMMIT, db_url, secret_key],
        cwd=REPO,
        env=_child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -9, proc.stderr
    store = StateStore.open(db_url, secret_key=secret_key)
    try:
        (intent,) = store.open_intents("p", "invoice", ("confirmed",))
        assert intent.ledger_id == "inv-1"
        assert store.links("p", "deal")["D1"].ledger_number == "INV-0001"
        assert store.get_cursor("p", "deals") == Cursor(dt.datetime(2024, 7, 1, 12, 0, 0, 42, tzinfo=dt.UTC), "D1")
        assert [e.action for e in store.audit_events("p")] == ["invoice.created"]
        assert store.token_store().load("xero-main") == {"refresh_token": "rotated"}
        (run,) = store.recent_runs(pipeline="p")
        assert run.status == "running"  # the killed run never finished
        with store.engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT count(*) FROM links")) == 1
    finally:
        store.close()


def test_token_lock_excludes_another_process(db_url: str, secret_key: str) -> None:
    """A second process waits for the token lock a first process holds, then reads the token it saved."""
    StateStore.open(db_url, secret_key=secret_key).close()  # migrate before the child starts
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, db_url, secret_key],
        cwd=REPO,
        env=_child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    store = StateStore(db_url, secret_key=secret_key)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "locked"
        start = time.monotonic()
        with store.token_lock("xero-main"):
            waited = time.monotonic() - start
            token = store.token_store().load("xero-main")
        assert waited >= 0.3
        assert token == {"refresh_token": "from-child"}
        out, err = child.communicate(timeout=30)
        assert child.returncode == 0, err
        assert out.strip() == "released"
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
        store.close()
