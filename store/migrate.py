"""Schema migrations of the call store, run by the program itself (Alembic, no alembic.ini).

`upgrade(url)` brings a database to the newest revision this program knows: an empty one gets the whole
schema, an older one the revisions it lacks (data kept). A database at a revision this program does not
know (written by a newer callbot) is refused with one line: an older program must not write into a
schema it does not understand. Revisions live in store/migrations/versions/, one file each.
"""
from __future__ import annotations

import contextlib
import fcntl

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from callbot.store.database import StoreError, open_engine

SCRIPT_LOCATION = "callbot.store:migrations"
MIGRATION_LOCK = 0x63616C6C  # PostgreSQL advisory lock key held while migrating ("call")


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    return cfg


def head() -> str:
    """The newest revision this program knows."""
    return ScriptDirectory.from_config(_config()).get_current_head()


def current(engine: Engine) -> str | None:
    """The database's revision (None: no schema yet)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(target: str | Engine, revision: str = "head") -> str:
    """Migrates the database at `target` (a URL or an Engine) up to `revision`; returns the revision it
    is at. StoreError when it cannot be reached or holds a newer schema than this program knows."""
    engine = open_engine(target) if isinstance(target, str) else target
    try:
        with _sqlite_file_lock(engine):
            return _upgrade(engine, revision)
    except SQLAlchemyError as err:
        raise StoreError(f"store {engine.url.render_as_string(hide_password=True)}: "
                         f"{_first_line(err)}") from None
    finally:
        if isinstance(target, str):
            engine.dispose()


@contextlib.contextmanager
def _sqlite_file_lock(engine: Engine):
    """Several processes (serve workers, `callbot calls import`) opening one SQLite file at once: one
    migrates while the others wait on a lock file beside it (flock: Linux and macOS). Within SQLite,
    switching to WAL and Alembic's first reads can fail "database is locked" at once rather than wait
    for the busy timeout (seen with three openers)."""
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:":
        yield
        return
    with open(f"{path}.migrate-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _upgrade(engine: Engine, revision: str) -> str:
    cfg = _config()
    scripts = ScriptDirectory.from_config(cfg)
    at = current(engine)
    if at is not None and at not in {s.revision for s in scripts.walk_revisions()}:
        raise StoreError(f"the store's schema is at revision {at}, newer than this callbot knows "
                         f"(up to {scripts.get_current_head()}): upgrade callbot, or use another store")
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # several serve workers starting on one database: one migrates, the others wait and find
            # it done (SQLite's BEGIN IMMEDIATE does the same there)
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return current(engine) or ""


def _first_line(err: BaseException) -> str:
    text = str(getattr(err, "orig", None) or err).strip()
    return text.splitlines()[0] if text else type(err).__name__
