"""Engines, sessions and migrations for SQLite (embedded default) and PostgreSQL.

SQLite runs in WAL mode with foreign keys on, a busy timeout, and `BEGIN IMMEDIATE`
transactions so that concurrent writers queue on the lock instead of failing on upgrade.
`synchronous=NORMAL` (the default here) is durable against a crash of the process (kill -9
included: the WAL is in the OS's cache) but not against a power loss or an OS crash, which
can lose the last commits (never corrupt the file); pass `sqlite_synchronous="FULL"` where
that matters (each commit then waits for an fsync).

PostgreSQL connections get `lock_timeout` once, when they are opened (not per transaction),
and are recycled after `POOL_RECYCLE_S`. One-statement writes (ratings, comparisons, turns)
run on an autocommit twin of the engine whose connections are never pinged at checkout: the
store retries such a write once when it finds its connection dropped. Reads and longer
transactions, which cannot be replayed that way, keep the ping. `synchronous_commit` is left at
the server's setting (on by default): an acknowledged write is on disk.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.exc import DatabaseError as SADatabaseError
from sqlalchemy.orm import Session, sessionmaker

from agent.errors import ConfigError, DatabaseError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
POOL_RECYCLE_S = 1800
"""PostgreSQL: replace pooled connections older than this (seconds) at checkout."""
LOCK_TIMEOUT = "30s"
"""PostgreSQL: a statement waiting longer than this for a row lock fails instead of hanging."""
SQLITE_SYNCHRONOUS = ("NORMAL", "FULL")
AUTOCOMMIT = "rlchat_autocommit"
"""Execution option: on SQLite, begin no transaction (each statement commits on its own; the
driver is always in autocommit here, SQLAlchemy's BEGIN is ours)."""
READ_ONLY = "rlchat_read_only"
"""Execution option: on SQLite, begin a plain (deferred) transaction that takes no write lock."""


def make_engine(
    url: str, busy_timeout_ms: int = 30_000, sqlite_synchronous: str = "NORMAL"
) -> Engine:
    """An engine for `url`, with SQLite pragmas set; errors name the URL and the fix."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"database_url: cannot parse {url!r}: {exc}") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        if sqlite_synchronous not in SQLITE_SYNCHRONOUS:
            raise ConfigError(
                f"sqlite_synchronous: {sqlite_synchronous!r} is not one of "
                f"{', '.join(SQLITE_SYNCHRONOUS)}"
            )
        engine = create_engine(url, connect_args={"timeout": busy_timeout_ms / 1000})
        _configure_sqlite(engine, busy_timeout_ms, sqlite_synchronous)
        return engine
    if backend == "postgresql":
        if parsed.drivername == "postgresql":  # plain postgresql:// means psycopg 3 here
            parsed = parsed.set(drivername="postgresql+psycopg")
            url = parsed.render_as_string(hide_password=False)
        if parsed.get_driver_name() != "psycopg":
            raise ConfigError(
                f"database_url: use the psycopg 3 driver, e.g. "
                f"postgresql+psycopg://{parsed.host or 'localhost'}/..., not {parsed.drivername}"
            )
        # Reads and multi-statement transactions keep the ping (they cannot be replayed);
        # one-statement writes use `autocommit_engine`, which has none and retries instead.
        engine = create_engine(
            url,
            pool_pre_ping=True,
            pool_recycle=POOL_RECYCLE_S,
            connect_args={"connect_timeout": 10},
        )
        event.listen(engine, "connect", _on_postgres_connect)
        return engine
    raise ConfigError(
        f"database_url: unsupported database {backend!r}; use sqlite:///FILE or "
        "postgresql+psycopg://USER@HOST:PORT/DB"
    )


def autocommit_engine(engine: Engine) -> Engine:
    """A twin of PostgreSQL `engine` whose connections stay in autocommit, for one-statement
    writes: its own pool, so no isolation switch at each checkout and no reset at checkin."""
    twin = create_engine(
        engine.url,
        isolation_level="AUTOCOMMIT",
        pool_reset_on_return=None,  # autocommit: there is never a transaction to roll back
        pool_recycle=POOL_RECYCLE_S,
        connect_args={"connect_timeout": 10},
    )
    event.listen(twin, "connect", _on_postgres_connect)
    return twin


def _on_postgres_connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
    """Session settings, once per connection (a plain SET outlives the transaction)."""
    with dbapi_connection.cursor() as cursor:
        cursor.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
    dbapi_connection.commit()


def _configure_sqlite(engine: Engine, busy_timeout_ms: int, synchronous: str) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None  # let SQLAlchemy's BEGIN below take over
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # type: ignore[no-untyped-def]
        # Long reads (exports, dataset snapshots) must not hold the write lock; a statement
        # in autocommit takes the lock itself, only for as long as it runs.
        options = conn.get_execution_options()
        if options.get(AUTOCOMMIT, False):
            return
        conn.exec_driver_sql("BEGIN" if options.get(READ_ONLY, False) else "BEGIN IMMEDIATE")


def alembic_config(engine: Engine) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = engine
    return cfg


def check_connection(engine: Engine) -> None:
    """Connect once; a wrong or unreachable URL becomes a `DatabaseError` naming the URL."""
    try:
        with engine.connect():
            pass
    except (OperationalError, SADatabaseError) as exc:
        shown = engine.url.render_as_string(hide_password=True)
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise DatabaseError(
            f"cannot connect to database {shown}: {reason}. Check database_url "
            f"(or RLCHAT_DATABASE_URL) and that the server is running."
        ) from exc


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision(engine: Engine) -> str | None:
    return ScriptDirectory.from_config(alembic_config(engine)).get_current_head()


def upgrade(engine: Engine, revision: str = "head") -> None:
    command.upgrade(alembic_config(engine), revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    command.downgrade(alembic_config(engine), revision)


def ensure_schema(engine: Engine) -> None:
    """Bring SQLite to head automatically; on PostgreSQL require `rlchat db upgrade` first."""
    check_connection(engine)
    current, head = current_revision(engine), head_revision(engine)
    if current == head:
        return
    if engine.dialect.name == "sqlite":
        log.info("migrating SQLite database %s to %s", engine.url.database, head)
        upgrade(engine)
        return
    raise DatabaseError(
        f"database schema is at {current or 'nothing'}, this code needs {head}; "
        "run `rlchat db upgrade`"
    )


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
