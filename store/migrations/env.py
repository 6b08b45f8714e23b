"""Alembic's environment for the call store: always online, on the connection store/migrate.py hands it
(config.attributes["connection"]), so a migration runs inside the same transaction discipline as the
store's writes (SQLite: BEGIN IMMEDIATE, see store/database.py)."""
from __future__ import annotations

from alembic import context

from callbot.store.schema import metadata

connection = context.config.attributes["connection"]
# render_as_batch: SQLite alters a table by copying it (Alembic's batch mode); PostgreSQL alters in place
context.configure(connection=connection, target_metadata=metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
