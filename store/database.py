"""Opening the store's database: SQLite (the embedded default) or PostgreSQL, by SQLAlchemy URL.

SQLite is set up for a server that writes while a CLI or the JSON API reads: WAL (readers never block
the writer, nor it them), a busy timeout (two writers, serve and `callbot calls import`, wait for each
other instead of failing), synchronous=NORMAL (in WAL a committed transaction survives the process
being killed; only a power cut may lose the last ones, never corrupt the file) and foreign keys on.
Python's sqlite3 opens a transaction lazily at the first write, so a transaction that reads first and
writes later could find the database changed under it and fail at once instead of waiting; here the
driver's own transaction handling is off and every transaction begins explicitly: BEGIN IMMEDIATE for
writes (the write lock taken up front, so the busy timeout applies), plain BEGIN for reads.
"""
from __future__ import annotations

import os
import pathlib

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

BUSY_TIMEOUT_MS = 10_000
CONNECT_TIMEOUT_S = 5
DEFAULT_FILE = "calls.db"  # the default store: beside the recordings (<recordings_dir>/calls.db)
BACKENDS = ("sqlite", "postgresql")


class StoreError(Exception):
    """A store problem, worded as the one line a user gets (a bad URL, a database that cannot be
    reached, a schema newer than this program)."""


def sqlite_url(path: str | os.PathLike) -> str:
    """The SQLAlchemy URL of an SQLite file."""
    return "sqlite:///" + os.path.abspath(os.fspath(path))


def default_url(recordings_dir: str | os.PathLike) -> str:
    return sqlite_url(pathlib.Path(recordings_dir) / DEFAULT_FILE)


def check_url(url: str) -> str | None:
    """What is wrong with a store URL, or None: an SQLAlchemy URL of SQLite or PostgreSQL."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return f"{url!r} is not a database URL (sqlite:///FILE or postgresql+psycopg://USER@HOST/DB)"
    if parsed.get_backend_name() not in BACKENDS:
        return f"{parsed.get_backend_name()!r} is not a supported database: sqlite or postgresql"
    if parsed.get_backend_name() == "sqlite" and not parsed.database:
        return "an SQLite store needs a file (sqlite:///FILE), not an in-memory database"
    return None


def open_engine(url: str, *, create_dir: bool = True) -> Engine:
    """An Engine for the store's URL, SQLite set up as the module docstring says; StoreError if the
    URL is not one the store takes. Nothing is connected yet."""
    problem = check_url(url)
    if problem is not None:
        raise StoreError(problem)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if create_dir:
            folder = os.path.dirname(os.path.abspath(parsed.database))
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as err:
                raise StoreError(f"store {parsed.database!r}: cannot create its folder ({err.strerror})") from None
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
        _explicit_sqlite_transactions(engine)
        return engine
    if parsed.drivername == "postgresql":  # psycopg 3, not psycopg2 (SQLAlchemy's default for a bare URL)
        parsed = parsed.set(drivername="postgresql+psycopg")
    # a server that does not answer (a host gone, a firewall dropping packets) is given up after
    # CONNECT_TIMEOUT_S, not after the TCP stack's minutes: serve's writer says so and goes on
    return create_engine(parsed, pool_pre_ping=True, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})


def _explicit_sqlite_transactions(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _setup(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # the driver opens no transaction of its own
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        write = conn.get_execution_options().get("store_write", True)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def reading(engine: Engine):
    """A connection for reads only (on SQLite: no write lock taken); use as a context manager."""
    return engine.connect().execution_options(store_write=False)
