"""Alembic migrations of the state database, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from sync.state import METADATA, VERSION_TABLE, StateStore, alembic_config


def _head() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def _schema_snapshot(store: StateStore) -> dict[str, Any]:
    with store.engine.connect() as conn:
        insp = sa.inspect(conn)
        return {
            table: {
                "columns": [(c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(table)],
                "pk": insp.get_pk_constraint(table)["constrained_columns"],
                "indexes": sorted((i["name"] or "", tuple(i["column_names"])) for i in insp.get_indexes(table)),
                "uniques": sorted(
                    (u["name"] or "", tuple(u["column_names"])) for u in insp.get_unique_constraints(table)
                ),
            }
            for table in sorted(insp.get_table_names())
        }


def _diff(store: StateStore) -> list[Any]:
    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "version_table": VERSION_TABLE})
        return list(compare_metadata(ctx, METADATA))


def test_migrate_from_empty_creates_the_tables_of_the_metadata(db_url: str, secret_key: str) -> None:
    """Upgrading an empty database creates exactly the model's tables, with no difference to the metadata."""
    store = StateStore(db_url, secret_key=secret_key)
    try:
        assert store.schema_revision() is None
        store.migrate()
        assert store.schema_revision() == _head()
        with store.engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
        assert tables == set(METADATA.tables) | {VERSION_TABLE}
        assert _diff(store) == []
    finally:
        store.close()


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_migration_runs_in_the_schema_of_the_search_path(store: StateStore) -> None:
    """On PostgreSQL the tables and the version table land in the connection's schema, not in public."""
    with store.engine.connect() as conn:
        schema = conn.scalar(sa.text("SELECT current_schema()"))
        assert schema is not None
        assert schema.startswith("lb_test_")
        rows = conn.execute(
            sa.text("SELECT table_schema, table_name FROM information_schema.tables WHERE table_name = ANY(:n)"),
            {"n": [*METADATA.tables, VERSION_TABLE]},
        ).all()
    assert {r.table_schema for r in rows if r.table_schema == schema} == {schema}
    assert {r.table_name for r in rows if r.table_schema == schema} == {*METADATA.tables, VERSION_TABLE}


def test_migrate_twice_is_a_no_op(store: StateStore, db_url: str, secret_key: str) -> None:
    """A second upgrade, in place or by reopening, changes neither the schema, the revision nor the data."""
    run_id = store.start_run("p1")
    before = _schema_snapshot(store)
    store.migrate()
    StateStore.open(db_url, secret_key=secret_key).close()
    assert _schema_snapshot(store) == before
    assert store.schema_revision() == _head()
    assert [r.id for r in store.recent_runs()] == [run_id]
    assert _diff(store) == []


def test_concurrent_migrations_of_an_empty_database_both_succeed(db_url: str, secret_key: str) -> None:
    """Two stores racing to migrate the same empty database both finish without error, at head."""
    stores = [StateStore(db_url, secret_key=secret_key) for _ in range(2)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(stores))

    def migrate(s: StateStore) -> None:
        try:
            barrier.wait(timeout=10)
            s.migrate()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(s,)) for s in stores]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert errors == []
        assert all(s.schema_revision() == _head() for s in stores)
        assert _diff(stores[0]) == []
    finally:
        for s in stores:
            s.close()
