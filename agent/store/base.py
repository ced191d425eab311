"""The store's connection handling: engines, sessions, and how one write or a batch runs.

`StoreBase` holds what every part of `Store` shares; `api.Store` is what callers use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Self, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from agent.config import Settings
from agent.errors import ValidationError
from agent.store import db
from agent.store.models import Base
from agent.store.writes import Refused, Writer

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741


class StoreBase:
    """Engine, sessions and the write runner shared by every part of `Store`."""

    def __init__(self, engine: Engine, max_text_chars: int = 32_000) -> None:
        self.engine = engine
        self.max_text_chars = max_text_chars
        self.sessions = db.session_factory(engine)
        self.writer = Writer(engine.dialect)
        # A one-statement write runs in autocommit: no BEGIN/COMMIT round trips on PostgreSQL,
        # and on SQLite the write lock is held for that statement only.
        if self.writer.postgres:
            self._autocommit = db.autocommit_engine(engine)
        else:  # not SQLAlchemy's AUTOCOMMIT: resetting it would turn the driver's own BEGIN on
            self._autocommit = engine.execution_options(**{db.AUTOCOMMIT: True})
        self._reader = engine.execution_options(**{db.READ_ONLY: True})

    @classmethod
    def open(cls, settings: Settings, migrate: bool = True) -> Self:
        """Connect (failing fast with a clear error) and make sure the schema is current."""
        engine = db.make_engine(settings.database_url, settings.sqlite_busy_timeout_ms)
        if migrate:
            db.ensure_schema(engine)
        else:
            db.check_connection(engine)
        return cls(engine, settings.max_text_chars)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self.sessions.begin() as session:
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for long reads (exports, dataset snapshots) that blocks no writer."""
        with Session(self._reader, expire_on_commit=False) as session, session.begin():
            yield session

    def close(self) -> None:
        self._autocommit.dispose()
        self.engine.dispose()

    def _insert(self, model: type[Base]) -> Any:
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(model)

    def _write(self, work: Callable[[Connection], T], one_statement: bool = False) -> T:
        """Run `work` in one transaction, or in autocommit when it is `one_statement`.

        A connection found dropped (server restart, idle timeout) is retried once on a fresh
        one: that is what replaces a ping at every checkout. (A connection lost after the
        server committed but before its reply arrived looks the same: an upsert is then
        simply applied again; an appended message could be stored twice.) A refused write
        is explained by a look-up after the rollback.
        """
        for attempt in (1, 2):
            try:
                if one_statement:
                    with self._autocommit.connect() as conn:
                        return work(conn)
                with self.engine.begin() as conn:
                    return work(conn)
            except Refused as refused:
                with self._reader.connect() as conn:
                    raise self.writer.explain(conn, refused) from refused.__cause__
            except DBAPIError as exc:
                if attempt == 2 or not exc.connection_invalidated:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _lean(self, work: Callable[[Any], T]) -> T:
        """Run `work` on the DBAPI cursor of an autocommit connection: the writer's one-statement
        path. A dropped connection is retried once on a fresh one; a refused write is
        explained; any other driver error surfaces as SQLAlchemy's, as `_write`'s do."""
        dialect = self._autocommit.dialect
        for attempt in (1, 2):
            pooled = self._autocommit.raw_connection()
            cursor = pooled.cursor()
            try:
                return work(cursor)
            except Refused as refused:
                with self._reader.connect() as conn:
                    raise self.writer.explain(conn, refused) from refused.__cause__
            except dialect.loaded_dbapi.Error as exc:
                dropped = dialect.is_disconnect(exc, pooled.dbapi_connection, cursor)
                if dropped:
                    pooled.invalidate(exc)
                if attempt == 2 or not dropped:
                    raise DBAPIError.instance(
                        None,
                        None,
                        exc,
                        dialect.loaded_dbapi.Error,
                        connection_invalidated=dropped,
                        dialect=dialect,
                    ) from exc
            finally:
                cursor.close()
                pooled.close()
        raise AssertionError("unreachable")  # pragma: no cover

    def _checked(
        self, name: str, items: Sequence[I], check: Callable[[I, int], dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Every item's bind parameters, or a `ValidationError` naming the first bad item."""
        out = []
        for i, item in enumerate(items):
            try:
                out.append(check(item, self.max_text_chars))
            except ValidationError as exc:
                raise ValidationError(f"{name}[{i}].{exc}") from None
        return out

    def _batch(
        self,
        name: str,
        params: list[dict[str, Any]],
        write: Callable[[Any, dict[str, Any], str], int],
        order: Callable[[dict[str, Any]], Any],
    ) -> list[int]:
        """All of `params` in one transaction, rows taken in `order` (so that two batches
        over the same rows lock them in the same order: no deadlock); ids in input order."""
        if not params:
            return []

        def work(conn: Connection) -> list[int]:
            ids = [0] * len(params)
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            for i in sorted(range(len(params)), key=lambda i: order(params[i])):
                ids[i] = write(cursor, params[i], f"{name}[{i}].")
            cursor.close()
            return ids

        return self._write(work)
