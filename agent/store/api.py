"""The store's function API: what the UI, the agent and the training jobs all call.

Every method is one short transaction. Input a user can get wrong raises `ValidationError`
or `NotFoundError` before anything is written, so nothing is stored half-way. Ratings,
comparisons and appended messages go through the lean write path in `writes.py` (one
statement each); the `*s` batch methods write many in one all-or-nothing transaction.
The annotation queues are in `queue.py`, model versions and runs in `versions.py`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, CursorResult, delete, func, insert, select
from sqlalchemy.exc import IntegrityError

from agent.errors import NotFoundError, ValidationError
from agent.store.inputs import (
    LIKERT_RANGE,
    ComparisonIn,
    MessageIn,
    RatingIn,
    check_comparison,
    check_message,
    check_rating,
    check_text,
)
from agent.store.models import (
    ROLES,
    SOURCES,
    Base,
    Comparison,
    Conversation,
    Message,
    Rating,
    User,
    utcnow,
)
from agent.store.queue import AnnotationQueue
from agent.store.versions import POLICY_KINDS, VersionsAndRuns

__all__ = [
    "LIKERT_RANGE",
    "POLICY_KINDS",
    "ComparisonIn",
    "MessageIn",
    "RatingIn",
    "Store",
    "check_text",
]


class Store(AnnotationQueue, VersionsAndRuns):
    """All reads and writes of rlchat's database. Open with `Store.open(settings)`."""

    # ---- users -------------------------------------------------------------------------

    def create_user(self, name: str, role: str = "user", password_hash: str | None = None) -> User:
        check_text("name", name, 80)
        if role not in ROLES:
            raise ValidationError(f"role: {role!r} is not one of {', '.join(ROLES)}")
        with self.transaction() as s:
            if s.scalar(select(User.id).where(User.name == name)) is not None:
                raise ValidationError(f"name: a user called {name!r} already exists")
            user = User(name=name, role=role, password_hash=password_hash)
            s.add(user)
        return user

    def get_or_create_user(self, name: str, role: str = "user") -> User:
        """The user `name`, created with `role` when absent (an upsert, safe under concurrency)."""
        stmt = self._insert(User).values(name=name, role=role, created_at=utcnow())
        with self.transaction() as s:
            s.execute(stmt.on_conflict_do_nothing(index_elements=["name"]))
            return s.scalars(select(User).where(User.name == name)).one()

    def get_user(self, name: str) -> User | None:
        with self.reading() as s:
            return s.scalars(select(User).where(User.name == name)).one_or_none()

    def list_users(self) -> list[User]:
        with self.reading() as s:
            return list(s.scalars(select(User).order_by(User.id)))

    def set_user(
        self, name: str, role: str | None = None, password_hash: str | None = None
    ) -> None:
        if role is not None and role not in ROLES:
            raise ValidationError(f"role: {role!r} is not one of {', '.join(ROLES)}")
        with self.transaction() as s:
            user = s.scalars(select(User).where(User.name == name)).one_or_none()
            if user is None:
                raise NotFoundError(f"no user called {name!r}")
            if role is not None:
                user.role = role
            if password_hash is not None:
                user.password_hash = password_hash

    # ---- conversations and messages ----------------------------------------------------

    def create_conversation(
        self,
        user_id: int,
        system_prompt: str = "",
        source: str = "chat",
        title: str = "",
        meta: dict[str, Any] | None = None,
    ) -> int:
        check_text("system_prompt", system_prompt, self.max_text_chars, allow_empty=True)
        if source not in SOURCES:
            raise ValidationError(f"source: {source!r} is not one of {', '.join(SOURCES)}")
        stmt = (
            insert(Conversation)
            .values(
                user_id=user_id,
                system_prompt=system_prompt,
                source=source,
                title=title[:200],
                meta=meta or {},
                created_at=utcnow(),
            )
            .returning(Conversation.id)
        )

        def work(conn: Connection) -> int:
            try:
                return int(conn.execute(stmt).scalar_one())
            except IntegrityError as exc:  # the foreign key: only a missing user
                raise NotFoundError(f"user_id: no user with id {user_id}") from exc

        return self._write(work, one_statement=True)

    def discard_empty_conversation(self, conversation_id: int) -> bool:
        """Delete the conversation if it has no message (a first turn that failed); True if so."""
        stmt = delete(Conversation).where(
            Conversation.id == conversation_id,
            ~select(Message.id).where(Message.conversation_id == conversation_id).exists(),
        )
        result = self._write(lambda conn: conn.execute(stmt), one_statement=True)
        return bool(result.rowcount)

    @contextmanager
    def discarding_if_empty(self, conversation_id: int, new: bool = True) -> Iterator[None]:
        """Around a `new` conversation's first turn: if the turn fails (bad input found by the
        agent, a model that cannot serve it), the conversation goes too, so none is left empty."""
        try:
            yield
        except Exception:
            if new:
                self.discard_empty_conversation(conversation_id)
            raise

    def append_message(
        self,
        conversation_id: int,
        role: str,
        content: str,
        parent_id: int | None = None,
        *,
        model_version_id: int | None = None,
        sampling: dict[str, Any] | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        ttft_ms: float | None = None,
        latency_ms: float | None = None,
        error: str | None = None,
    ) -> int:
        """Add one turn under `parent_id` (None: a first turn). Returns the new message id."""
        item = MessageIn(
            conversation_id, role, content, parent_id, model_version_id, sampling,
            prompt_tokens, completion_tokens, ttft_ms, latency_ms, error,
        )  # fmt: skip
        params = check_message(item, self.max_text_chars)
        return self._lean(lambda cursor: self.writer.message(cursor, params))

    def append_messages(self, items: Sequence[MessageIn]) -> list[int]:
        """Many turns in one transaction (all or none); errors name the item, `messages[i]`.

        A parent must already be stored (ids of this batch are not known before it commits).
        """
        params = self._checked("messages", items, check_message)
        return self._batch("messages", params, self.writer.message, lambda p: 0)

    def get_message(self, message_id: int) -> Message:
        with self.reading() as s:
            msg = s.get(Message, message_id)
            if msg is None:
                raise NotFoundError(f"message_id: no message with id {message_id}")
            return msg

    def get_conversation(self, conversation_id: int) -> Conversation:
        with self.reading() as s:
            conv = s.get(Conversation, conversation_id)
            if conv is None:
                raise NotFoundError(f"conversation_id: no conversation with id {conversation_id}")
            return conv

    def messages(self, conversation_id: int) -> list[Message]:
        """Every message of a conversation (all branches), oldest first."""
        with self.reading() as s:
            stmt = select(Message).where(Message.conversation_id == conversation_id)
            return list(s.scalars(stmt.order_by(Message.id)))

    def path(self, message_id: int) -> list[Message]:
        """The branch from the first turn down to `message_id`, inclusive."""
        msg = self.get_message(message_id)
        by_id = {m.id: m for m in self.messages(msg.conversation_id)}
        chain: list[Message] = []
        cursor: Message | None = by_id[message_id]
        while cursor is not None:
            chain.append(cursor)
            cursor = by_id.get(cursor.parent_id) if cursor.parent_id is not None else None
        return chain[::-1]

    def siblings(self, message_id: int) -> list[Message]:
        """Replies sharing `message_id`'s parent (itself included), oldest first."""
        msg = self.get_message(message_id)
        with self.reading() as s:
            stmt = select(Message).where(
                Message.conversation_id == msg.conversation_id,
                Message.parent_id.is_(None)
                if msg.parent_id is None
                else Message.parent_id == msg.parent_id,
            )
            return list(s.scalars(stmt.order_by(Message.id)))

    def list_conversations(
        self, user_id: int | None = None, limit: int = 100
    ) -> list[Conversation]:
        """Newest first; only `user_id`'s when given."""
        stmt = select(Conversation).order_by(Conversation.id.desc()).limit(limit)
        if user_id is not None:
            stmt = stmt.where(Conversation.user_id == user_id)
        with self.reading() as s:
            return list(s.scalars(stmt))

    # ---- feedback ----------------------------------------------------------------------

    def set_rating(
        self,
        message_id: int,
        rater_id: int,
        kind: str,
        value: float,
        *,
        criterion: str = "",
        reasons: Sequence[str] = (),
        comment: str = "",
    ) -> int:
        """Upsert one rater's judgement of one reply: a second call updates, never duplicates.

        kind "thumb": value +1 (up) or -1 (down). kind "likert": an integer 1..5 on `criterion`.
        The rater's annotation lease on the reply, if any, ends with it.
        """
        item = RatingIn(message_id, rater_id, kind, value, criterion, reasons, comment)
        params = check_rating(item, self.max_text_chars)
        return self._lean(lambda cursor: self.writer.rating(cursor, params))

    def set_ratings(self, items: Sequence[RatingIn]) -> list[int]:
        """Upsert many ratings in one transaction (all or none), e.g. every criterion of one
        Likert submit; errors name the item, `ratings[i]`. Returns the ids in input order."""
        params = self._checked("ratings", items, check_rating)
        key = lambda p: (p["message_id"], p["rater_id"], p["kind"], p["criterion"])  # noqa: E731
        return self._batch("ratings", params, self.writer.rating, key)

    def delete_rating(self, message_id: int, rater_id: int, kind: str, criterion: str = "") -> int:
        """Undo: remove a rater's rating. Returns how many rows went (0 or 1)."""
        stmt = delete(Rating).where(
            Rating.message_id == message_id,
            Rating.rater_id == rater_id,
            Rating.kind == kind,
            Rating.criterion == criterion,
        )
        result: CursorResult[Any] = self._write(lambda conn: conn.execute(stmt), True)
        return result.rowcount or 0

    def ratings(self, message_id: int | None = None, rater_id: int | None = None) -> list[Rating]:
        stmt = select(Rating).order_by(Rating.id)
        if message_id is not None:
            stmt = stmt.where(Rating.message_id == message_id)
        if rater_id is not None:
            stmt = stmt.where(Rating.rater_id == rater_id)
        with self.reading() as s:
            return list(s.scalars(stmt))

    def add_comparison(
        self, rater_id: int, message_a_id: int, message_b_id: int, choice: str, comment: str = ""
    ) -> int:
        """Upsert one rater's preference between two replies to the same parent."""
        item = ComparisonIn(rater_id, message_a_id, message_b_id, choice, comment)
        params = check_comparison(item, self.max_text_chars)
        return self._lean(lambda cursor: self.writer.comparison(cursor, params))

    def add_comparisons(self, items: Sequence[ComparisonIn]) -> list[int]:
        """Upsert many comparisons in one transaction (all or none); errors name the item,
        `comparisons[i]`. Returns the ids in input order."""
        params = self._checked("comparisons", items, check_comparison)
        key = lambda p: (p["rater_id"], p["a"], p["b"])  # noqa: E731
        return self._batch("comparisons", params, self.writer.comparison, key)

    def delete_comparison(self, comparison_id: int) -> int:
        stmt = delete(Comparison).where(Comparison.id == comparison_id)
        result: CursorResult[Any] = self._write(lambda conn: conn.execute(stmt), True)
        return result.rowcount or 0

    def comparisons(self, rater_id: int | None = None) -> list[Comparison]:
        stmt = select(Comparison).order_by(Comparison.id)
        if rater_id is not None:
            stmt = stmt.where(Comparison.rater_id == rater_id)
        with self.reading() as s:
            return list(s.scalars(stmt))

    # ---- statistics --------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Row count of every table."""
        with self.reading() as s:
            return {
                table.name: s.scalar(select(func.count()).select_from(table)) or 0
                for table in Base.metadata.sorted_tables
            }
