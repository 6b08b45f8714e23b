"""Alembic's migrations of the call store: env.py and versions/, run programmatically by store/migrate.py
(never by an alembic.ini: the database to migrate is the one the store opens)."""
