"""The lean write path for feedback and chat turns: one statement per write, built once.

A rating, a comparison or an appended message is one `INSERT … SELECT … ON CONFLICT …
RETURNING`: the SELECT reads only the ids and roles it needs, so a row comes back exactly
when the write is valid. When none comes back (or a foreign key refuses the row), and only
then, `explain` looks up which reference is wrong and says so. On PostgreSQL the rating's
annotation-lease clean-up (and a first user turn's conversation title) are folded into the
same statement as data-modifying CTEs, so a write is one round trip in autocommit. SQLite
has no such CTEs: it runs the same INSERT in autocommit too (holding the write lock for that
one statement only, instead of across several Python calls), then, only when a keyed read
finds one, the lease clean-up or the title as a second statement. A crash between the two
leaves a lease that expires on its own, or an untitled conversation; batches run all of it
in one `BEGIN IMMEDIATE` transaction.

Validation that needs no database (ranges, kinds, text limits) happens in `inputs.check_*`
before anything is sent, and batches check every item before the first write.

Each statement is compiled by SQLAlchemy once per dialect (`Compiled`) and run on the DBAPI
cursor of a pooled connection, with SQLAlchemy's own bind processors (JSON, dates) applied:
per write this skips the compiled-cache look-up, parameter construction and result
wrapping, which were most of the client's CPU with 8 writers on 2 cores. Reads, and the
look-ups that explain a refusal, stay ordinary SQLAlchemy.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import (
    BindParameter,
    Connection,
    Dialect,
    Executable,
    and_,
    bindparam,
    delete,
    exists,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from agent.errors import NotFoundError, RLChatError, ValidationError
from agent.store.models import (
    AnnotationLease,
    Comparison,
    Conversation,
    Message,
    ModelVersion,
    Rating,
    User,
)


class Refused(Exception):
    """A write the database did not take; `Writer.explain` says why, outside the transaction."""

    def __init__(self, what: str, params: dict[str, Any], prefix: str) -> None:
        super().__init__(what)
        self.what, self.params, self.prefix = what, params, prefix


# ---- the statements ----------------------------------------------------------------------


def _p(name: str, column: Any) -> Any:
    """A bind parameter typed like `column` (so PostgreSQL gets the right casts)."""
    return bindparam(name, type_=column.type)


class Compiled:
    """A statement compiled once for `dialect`, run on a DBAPI cursor.

    Parameters go by name, as with `Connection.execute`; the statement's own constants (the
    `'assistant'` of a role check) are filled in, and each value passes through the bind
    processor SQLAlchemy would apply (a list to JSON, a datetime to SQLite's text form).
    """

    def __init__(self, stmt: Executable, dialect: Dialect, returns_rows: bool = True) -> None:
        compiled = cast(SQLCompiler, cast(ClauseElement, stmt).compile(dialect=dialect))
        self.sql, self.returns_rows = compiled.string, returns_rows
        self.order = list(compiled.positiontup or []) if compiled.positional else None
        binds: dict[str, BindParameter[Any]] = compiled.binds
        self.constants = {name: bp.value for name, bp in binds.items() if not bp.required}
        self.processors = {
            name: proc
            for name, bp in binds.items()
            if (proc := bp.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        }

    def rows(self, cursor: Any, params: dict[str, Any]) -> list[Any]:
        """Execute with `params` (extra keys are ignored) and return the rows it returned."""
        values = {**params, **self.constants}
        for name, process in self.processors.items():
            values[name] = process(values[name])
        cursor.execute(self.sql, values if self.order is None else [values[n] for n in self.order])
        return cursor.fetchall() if self.returns_rows else []


class Writer:
    """Pre-built write statements for one dialect, and the look-ups that explain a refusal."""

    def __init__(self, dialect: Dialect) -> None:
        self.postgres = dialect.name == "postgresql"
        self.dialect = postgresql if self.postgres else sqlite
        self.integrity_error: type[Exception] = dialect.loaded_dbapi.IntegrityError
        rating, lease = self._rating()
        self.rating_stmt = Compiled(rating, dialect)
        self.lease_stmt = None if lease is None else Compiled(lease, dialect, returns_rows=False)
        self.comparison_stmt = Compiled(self._comparison(), dialect)
        self.message_stmts = {
            (first, is_user): Compiled(self._message(first, is_user), dialect)
            for first in (True, False)
            for is_user in (True, False)
        }
        # SQLite's follow-ups, each only when a cheap keyed read says there is work to do.
        self.title_stmt = Compiled(
            update(Conversation)
            .where(Conversation.id == bindparam("conversation_id"), Conversation.title == "")
            .values(title=bindparam("title")),
            dialect,
            returns_rows=False,
        )
        self.untitled = Compiled(
            select(Conversation.id).where(
                Conversation.id == bindparam("conversation_id"), Conversation.title == ""
            ),
            dialect,
        )
        self.leased = Compiled(
            select(AnnotationLease.id).where(
                AnnotationLease.message_id == bindparam("message_id"),
                AnnotationLease.rater_id == bindparam("rater_id"),
            ),
            dialect,
        )

    def _rating(self) -> tuple[Executable, Executable | None]:
        r, m = Rating.__table__.c, Message.__table__.c
        source = select(
            m.id,
            _p("rater_id", r.rater_id),
            _p("kind", r.kind),
            _p("criterion", r.criterion),
            _p("value", r.value),
            _p("reasons", r.reasons),
            _p("comment", r.comment),
            _p("now", r.created_at),
            _p("now", r.updated_at),
        ).where(m.id == bindparam("message_id"), m.role == "assistant")
        cols = ["message_id", "rater_id", "kind", "criterion", "value", "reasons", "comment"]
        ins = self.dialect.insert(Rating).from_select([*cols, "created_at", "updated_at"], source)
        upsert = ins.on_conflict_do_update(
            index_elements=["message_id", "rater_id", "kind", "criterion"],
            set_={c: ins.excluded[c] for c in ("value", "reasons", "comment", "updated_at")},
        ).returning(Rating.id)
        unlease = delete(AnnotationLease).where(
            AnnotationLease.message_id == bindparam("message_id"),
            AnnotationLease.rater_id == bindparam("rater_id"),
        )
        if not self.postgres:
            return upsert, unlease
        written = upsert.cte("written")
        folded = select(written.c.id).add_cte(unlease.cte("unleased"))
        return folded, None

    def _comparison(self) -> Executable:
        a, b = Message.__table__.alias("a"), Message.__table__.alias("b")
        c = Comparison.__table__.c
        source = select(
            _p("rater_id", c.rater_id),
            a.c.id,
            b.c.id,
            _p("choice", c.choice),
            _p("comment", c.comment),
            _p("now", c.created_at),
        ).where(
            a.c.id == bindparam("a"),
            b.c.id == bindparam("b"),
            a.c.role == "assistant",
            b.c.role == "assistant",
            a.c.conversation_id == b.c.conversation_id,
            a.c.parent_id.is_not_distinct_from(b.c.parent_id),
        )
        cols = ["rater_id", "message_a_id", "message_b_id", "choice", "comment", "created_at"]
        ins = self.dialect.insert(Comparison).from_select(cols, source)
        return ins.on_conflict_do_update(
            index_elements=["rater_id", "message_a_id", "message_b_id"],
            set_={k: ins.excluded[k] for k in ("choice", "comment")},
        ).returning(Comparison.id)

    def _message(self, first: bool, is_user: bool) -> Executable:
        m, conv = Message.__table__.c, Conversation.__table__
        names = [
            "parent_id", "role", "content", "model_version_id", "sampling", "prompt_tokens",
            "completion_tokens", "ttft_ms", "latency_ms", "error",
        ]  # fmt: skip
        where = [conv.c.id == bindparam("conversation_id")]
        if not first:
            parent = Message.__table__.alias("p")
            where.append(
                exists().where(
                    parent.c.id == bindparam("parent_id"), parent.c.conversation_id == conv.c.id
                )
            )
        source = select(conv.c.id, *(_p(n, m[n]) for n in names), _p("now", m.created_at)).where(
            *where
        )
        stmt = (
            self.dialect.insert(Message)
            .from_select(["conversation_id", *names, "created_at"], source)
            .returning(Message.id)
        )
        if not (self.postgres and is_user):
            return stmt
        # The first user turn names the conversation: folded in, and only if the row went in.
        written = stmt.cte("written")
        titled = (
            update(Conversation)
            .where(
                Conversation.id == bindparam("conversation_id"),
                Conversation.title == "",
                exists(select(written.c.id)),
            )
            .values(title=bindparam("title"))
            .cte("titled")
        )
        return select(written.c.id).add_cte(titled)

    # ---- running them (on the DBAPI cursor of the caller's connection / transaction) -----

    def rating(self, cursor: Any, params: dict[str, Any], prefix: str = "") -> int:
        row_id = self._one(cursor, self.rating_stmt, params, "rating", prefix)
        if self.lease_stmt is not None and self.leased.rows(cursor, params):
            self.lease_stmt.rows(cursor, params)
        return row_id

    def comparison(self, cursor: Any, params: dict[str, Any], prefix: str = "") -> int:
        return self._one(cursor, self.comparison_stmt, params, "comparison", prefix)

    def message(self, cursor: Any, params: dict[str, Any], prefix: str = "") -> int:
        stmt = self.message_stmts[(params["parent_id"] is None, params["role"] == "user")]
        row_id = self._one(cursor, stmt, params, "message", prefix)
        if not self.postgres and params["role"] == "user" and self.untitled.rows(cursor, params):
            self.title_stmt.rows(cursor, params)
        return row_id

    def _one(
        self, cursor: Any, stmt: Compiled, params: dict[str, Any], what: str, prefix: str
    ) -> int:
        try:
            rows = stmt.rows(cursor, params)
        except self.integrity_error as exc:
            raise Refused(what, params, prefix) from exc
        if not rows or rows[0][0] is None:
            raise Refused(what, params, prefix)
        return int(rows[0][0])

    # ---- explaining a refusal (a fresh connection, after the rollback) ------------------

    def explain(self, conn: Connection, refused: Refused) -> RLChatError:
        """The clear error for a refused write: which reference is missing or wrong."""
        p, pre = refused.params, refused.prefix
        problem: RLChatError | None
        if refused.what == "rating":
            problem = _reply(conn, p["message_id"], "message_id") or _user(conn, p["rater_id"])
        elif refused.what == "comparison":
            problem = (
                _reply(conn, p["a"], "message_a_id")
                or _reply(conn, p["b"], "message_b_id")
                or _siblings(conn, p["a"], p["b"])
                or _user(conn, p["rater_id"])
            )
        else:
            problem = _turn(conn, p)
        if problem is None:
            cause = refused.__cause__
            return ValidationError(
                f"{pre}the database refused this {refused.what} ({cause or 'no row written'}); "
                "a row it refers to may have been deleted meanwhile: reload and try again"
            )
        problem.args = (f"{pre}{problem.args[0]}",)
        return problem


def _reply(conn: Connection, message_id: int, field: str) -> RLChatError | None:
    role = conn.scalar(select(Message.role).where(Message.id == message_id))
    if role is None:
        return NotFoundError(f"{field}: no message with id {message_id}")
    if role != "assistant":
        return ValidationError(f"{field}: message {message_id} is a {role} message, not a reply")
    return None


def _user(conn: Connection, user_id: int) -> RLChatError | None:
    if conn.scalar(select(User.id).where(User.id == user_id)) is None:
        return NotFoundError(f"rater_id: no user with id {user_id}")
    return None


def _siblings(conn: Connection, a_id: int, b_id: int) -> RLChatError | None:
    a, b = (
        conn.execute(
            select(Message.conversation_id, Message.parent_id).where(Message.id == i)
        ).one()
        for i in (a_id, b_id)
    )
    if tuple(a) != tuple(b):
        return ValidationError(
            f"message_b_id: replies {a_id} and {b_id} answer different messages; only replies "
            "to the same parent can be compared"
        )
    return None


def _turn(conn: Connection, p: dict[str, Any]) -> RLChatError | None:
    conv_id, parent_id = p["conversation_id"], p["parent_id"]
    if conn.scalar(select(Conversation.id).where(Conversation.id == conv_id)) is None:
        return NotFoundError(f"conversation_id: no conversation with id {conv_id}")
    if parent_id is not None:
        found = conn.scalar(
            select(Message.id).where(
                and_(Message.id == parent_id, Message.conversation_id == conv_id)
            )
        )
        if found is None:
            return NotFoundError(f"parent_id: no message {parent_id} in conversation {conv_id}")
    version = p["model_version_id"]
    if version is not None:
        found = conn.scalar(select(ModelVersion.id).where(ModelVersion.id == version))
        if found is None:
            return NotFoundError(f"model_version_id: no model version with id {version}")
    return None
