"""Alembic environment of the state database.

Migrations run through :meth:`sync.state.StateStore.migrate`, which opens a transaction (holding the
migration lock), puts its connection in ``config.attributes["connection"]`` and calls ``upgrade``. There is
no ``alembic.ini``: :func:`sync.state.alembic_config` builds the configuration in code.
"""

from __future__ import annotations

from alembic import context

from sync.state import METADATA, VERSION_TABLE

config = context.config
connection = config.attributes.get("connection")

if context.is_offline_mode():
    # SQL scripts for a DBA to apply by hand: `alembic upgrade head --sql` with a URL in the config.
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=METADATA,
        version_table=VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
elif connection is None:
    raise RuntimeError("state migrations run through StateStore.migrate(), which supplies the connection")
else:
    context.configure(
        connection=connection,
        target_metadata=METADATA,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
