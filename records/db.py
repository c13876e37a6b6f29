"""Engines, sessions and schema migrations. Sessions never commit on their own: callers do."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).with_name("migrations")


def make_engine(url: str, *, pre_ping: bool = True) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and foreign keys.

    ``pre_ping``: a server database's pooled connection is tested (one round trip) each time it is
    taken, so that one the server dropped is replaced unseen. The DICOM node turns it off: it would pay
    that round trip per instance received; it records an instance once more when the connection it
    took turns out dropped instead (``reception.receiver``).

    Statement values are hidden from SQLAlchemy's errors and logs: they hold patients' names and IDs.
    """
    if url.startswith("sqlite"):
        database = url.split("///", 1)[-1]
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself, below
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(connection) -> None:  # type: ignore[no-untyped-def]
            # Take the write lock at BEGIN: a read-then-write transaction in WAL mode would
            # otherwise fail with SQLITE_BUSY instead of waiting when another writer got in first.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=pre_ping, pool_size=10, max_overflow=20, hide_parameters=True)


def error_summary(exc: SQLAlchemyError) -> str:
    """A database error in one line, for a refusal's log line: its kind and the driver's first line.
    The rest (the statement, PostgreSQL's DETAIL quoting a refused row's values) is noise there;
    ``records.logs`` keeps the values out of every other log line."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (``expire_on_commit=False``): a caller returns what it
    committed without another query."""
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    """Alembic's configuration for ``url`` with the migrations shipped in ``records/migrations``: no alembic.ini needed;
    a ``%`` in the URL is escaped for Alembic's config parser."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (created if SQLite and absent)."""
    if url.startswith("sqlite"):
        make_engine(url).dispose()  # creates the folder
    command.upgrade(alembic_config(url), revision)
