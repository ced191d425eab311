"""The store's function API: what the UI, the agent and the training jobs all call.

Every method is one short transaction. Input a user can get wrong raises `ValidationError`
or `NotFoundError` before anything is written, so nothing is stored half-way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import CursorResult, Engine, and_, delete, func, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased

from agent.config import Settings
from agent.errors import NotFoundError, ValidationError
from agent.store import db
from agent.store.models import (
    CHOICES,
    MESSAGE_ROLES,
    MODEL_KINDS,
    ROLES,
    SOURCES,
    AnnotationLease,
    Base,
    Comparison,
    Conversation,
    Message,
    ModelVersion,
    Rating,
    TrainingRun,
    User,
    utcnow,
)

POLICY_KINDS = ("base", "sft", "ppo")
LIKERT_RANGE = (1, 5)


def check_text(field: str, value: str, max_chars: int, allow_empty: bool = False) -> str:
    """`value` if it is a string within limits; otherwise a `ValidationError` naming `field`."""
    if not isinstance(value, str):
        raise ValidationError(f"{field}: expected text, got {type(value).__name__}")
    if "\x00" in value:
        raise ValidationError(f"{field}: contains a NUL character (\\x00), which is not allowed")
    if not allow_empty and not value.strip():
        raise ValidationError(f"{field}: must not be empty")
    if len(value) > max_chars:
        raise ValidationError(
            f"{field}: {len(value):,} characters is over the limit of {max_chars:,}"
        )
    return value


class Store:
    """All reads and writes of rlchat's database. Open with `Store.open(settings)`."""

    def __init__(self, engine: Engine, max_text_chars: int = 32_000) -> None:
        self.engine = engine
        self.max_text_chars = max_text_chars
        self.sessions = db.session_factory(engine)

    @classmethod
    def open(cls, settings: Settings, migrate: bool = True) -> Store:
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
            if self.engine.dialect.name == "postgresql":
                session.execute(text("SET LOCAL lock_timeout = '30s'"))
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for long reads (exports, dataset snapshots) that blocks no writer."""
        engine = self.engine.execution_options(**{db.READ_ONLY: True})
        with Session(engine, expire_on_commit=False) as session, session.begin():
            yield session

    def close(self) -> None:
        self.engine.dispose()

    def _insert(self, model: type[Base]) -> Any:
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(model)

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
        with self.transaction() as s:
            if s.get(User, user_id) is None:
                raise NotFoundError(f"user_id: no user with id {user_id}")
            conv = Conversation(
                user_id=user_id,
                system_prompt=system_prompt,
                source=source,
                title=title[:200],
                meta=meta or {},
            )
            s.add(conv)
            s.flush()
            return conv.id

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
        if role not in MESSAGE_ROLES:
            raise ValidationError(f"role: {role!r} is not one of {', '.join(MESSAGE_ROLES)}")
        # A failed generation is recorded as an assistant message with no text and the error.
        check_text("content", content, self.max_text_chars, allow_empty=error is not None)
        with self.transaction() as s:
            conv = s.get(Conversation, conversation_id)
            if conv is None:
                raise NotFoundError(f"conversation_id: no conversation with id {conversation_id}")
            if parent_id is not None:
                parent = s.get(Message, parent_id)
                if parent is None or parent.conversation_id != conversation_id:
                    raise NotFoundError(
                        f"parent_id: no message {parent_id} in conversation {conversation_id}"
                    )
            if conv.title == "" and role == "user":
                conv.title = content.strip().splitlines()[0][:80]
            msg = Message(
                conversation_id=conversation_id,
                parent_id=parent_id,
                role=role,
                content=content,
                model_version_id=model_version_id,
                sampling=sampling,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                ttft_ms=ttft_ms,
                latency_ms=latency_ms,
                error=error,
            )
            s.add(msg)
            s.flush()
            return msg.id

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

    def _assistant_message(self, s: Session, message_id: int, field: str = "message_id") -> Message:
        msg = s.get(Message, message_id)
        if msg is None:
            raise NotFoundError(f"{field}: no message with id {message_id}")
        if msg.role != "assistant":
            raise ValidationError(
                f"{field}: message {message_id} is a {msg.role} message, not a reply"
            )
        return msg

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
        """
        if kind == "thumb":
            if value not in (1, -1):
                raise ValidationError(f"value: a thumb is +1 or -1, got {value!r}")
            criterion = ""
        elif kind == "likert":
            lo, hi = LIKERT_RANGE
            if not criterion:
                raise ValidationError("criterion: a likert rating needs a criterion")
            if isinstance(value, bool) or value != int(value) or not lo <= value <= hi:
                raise ValidationError(
                    f"value: a likert rating is an integer {lo}..{hi}, got {value!r}"
                )
        else:
            raise ValidationError(f"kind: {kind!r} is not one of thumb, likert")
        check_text("comment", comment, self.max_text_chars, allow_empty=True)
        reasons = [check_text("reasons", r, 200) for r in reasons]
        now = utcnow()
        row = dict(
            message_id=message_id,
            rater_id=rater_id,
            kind=kind,
            criterion=criterion,
            value=float(value),
            reasons=reasons,
            comment=comment,
        )
        stmt = self._insert(Rating).values(**row, created_at=now, updated_at=now)
        stmt = stmt.on_conflict_do_update(
            index_elements=["message_id", "rater_id", "kind", "criterion"],
            set_=dict(value=float(value), reasons=reasons, comment=comment, updated_at=now),
        ).returning(Rating.id)
        with self.transaction() as s:
            self._assistant_message(s, message_id)
            if s.get(User, rater_id) is None:
                raise NotFoundError(f"rater_id: no user with id {rater_id}")
            rating_id = s.execute(stmt).scalar_one()
            s.execute(
                delete(AnnotationLease).where(
                    AnnotationLease.message_id == message_id, AnnotationLease.rater_id == rater_id
                )
            )
            return rating_id

    def delete_rating(self, message_id: int, rater_id: int, kind: str, criterion: str = "") -> int:
        """Undo: remove a rater's rating. Returns how many rows went (0 or 1)."""
        with self.transaction() as s:
            result: CursorResult[Any] = s.execute(  # type: ignore[assignment]
                delete(Rating).where(
                    Rating.message_id == message_id,
                    Rating.rater_id == rater_id,
                    Rating.kind == kind,
                    Rating.criterion == criterion,
                )
            )
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
        if choice not in CHOICES:
            raise ValidationError(f"choice: {choice!r} is not one of {', '.join(CHOICES)}")
        if message_a_id == message_b_id:
            raise ValidationError("message_b_id: a reply cannot be compared with itself")
        check_text("comment", comment, self.max_text_chars, allow_empty=True)
        stmt = self._insert(Comparison).values(
            rater_id=rater_id,
            message_a_id=message_a_id,
            message_b_id=message_b_id,
            choice=choice,
            comment=comment,
            created_at=utcnow(),
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["rater_id", "message_a_id", "message_b_id"],
            set_=dict(choice=choice, comment=comment),
        ).returning(Comparison.id)
        with self.transaction() as s:
            a = self._assistant_message(s, message_a_id, "message_a_id")
            b = self._assistant_message(s, message_b_id, "message_b_id")
            if (a.conversation_id, a.parent_id) != (b.conversation_id, b.parent_id):
                raise ValidationError(
                    f"message_b_id: replies {message_a_id} and {message_b_id} answer different "
                    "messages; only replies to the same parent can be compared"
                )
            if s.get(User, rater_id) is None:
                raise NotFoundError(f"rater_id: no user with id {rater_id}")
            return s.execute(stmt).scalar_one()

    def delete_comparison(self, comparison_id: int) -> int:
        with self.transaction() as s:
            result: CursorResult[Any] = s.execute(  # type: ignore[assignment]
                delete(Comparison).where(Comparison.id == comparison_id)
            )
            return result.rowcount or 0

    def comparisons(self, rater_id: int | None = None) -> list[Comparison]:
        stmt = select(Comparison).order_by(Comparison.id)
        if rater_id is not None:
            stmt = stmt.where(Comparison.rater_id == rater_id)
        with self.reading() as s:
            return list(s.scalars(stmt))

    # ---- annotation queue --------------------------------------------------------------

    def _serialise_queue(self, s: Session) -> None:
        """Two annotators asking at once must not both take the last free slot of an item."""
        if self.engine.dialect.name == "postgresql":
            s.execute(text("SELECT pg_advisory_xact_lock(7240001)"))
        # SQLite: BEGIN IMMEDIATE already serialises writers.

    def next_for_annotation(
        self, rater_id: int, overlap: int = 2, lease_s: int = 600, limit: int = 1
    ) -> list[Message]:
        """Replies this annotator should rate next, fewest Likert raters first, and lease them.

        Never the annotator's own conversations or replies they rated or skipped; an item is
        held back from others while (raters so far + live leases) reaches `overlap`.
        """
        now = utcnow()
        raters = (
            select(Rating.message_id, func.count(func.distinct(Rating.rater_id)).label("n"))
            .where(Rating.kind == "likert")  # annotations; end users' thumbs don't count
            .group_by(Rating.message_id)
            .subquery()
        )
        leases = (
            select(AnnotationLease.message_id, func.count().label("n"))
            .where(
                AnnotationLease.expires_at > now,
                AnnotationLease.rater_id != rater_id,
                AnnotationLease.skipped.is_(False),
            )
            .group_by(AnnotationLease.message_id)
            .subquery()
        )
        mine_rated = select(Rating.message_id).where(Rating.rater_id == rater_id)
        mine_skipped = select(AnnotationLease.message_id).where(
            AnnotationLease.rater_id == rater_id, AnnotationLease.skipped.is_(True)
        )
        n_rated = func.coalesce(raters.c.n, 0)
        stmt = (
            select(Message)
            .join(Conversation, Conversation.id == Message.conversation_id)
            .outerjoin(raters, raters.c.message_id == Message.id)
            .outerjoin(leases, leases.c.message_id == Message.id)
            .where(
                Message.role == "assistant",
                Message.error.is_(None),
                Conversation.user_id != rater_id,
                Message.id.not_in(mine_rated),
                Message.id.not_in(mine_skipped),
                n_rated + func.coalesce(leases.c.n, 0) < overlap,
            )
            .order_by(n_rated, Message.id)
            .limit(limit)
        )
        with self.transaction() as s:
            self._serialise_queue(s)
            items = list(s.scalars(stmt))
            for msg in items:
                self._lease(s, msg.id, rater_id, now + timedelta(seconds=lease_s), skipped=False)
            return items

    def skip_annotation(self, message_id: int, rater_id: int) -> None:
        """The annotator passes on this item: never served to them again, free for others."""
        with self.transaction() as s:
            self._assistant_message(s, message_id)
            self._lease(s, message_id, rater_id, utcnow(), skipped=True)

    def _lease(
        self, s: Session, message_id: int, rater_id: int, expires: datetime, skipped: bool
    ) -> None:
        stmt = self._insert(AnnotationLease).values(
            message_id=message_id, rater_id=rater_id, expires_at=expires, skipped=skipped
        )
        s.execute(
            stmt.on_conflict_do_update(
                index_elements=["message_id", "rater_id"],
                set_=dict(expires_at=expires, skipped=skipped),
            )
        )

    def next_pair_for_annotation(self, rater_id: int) -> tuple[Message, Message] | None:
        """Two sibling replies this annotator has not compared yet, least-compared first."""
        a, b = aliased(Message), aliased(Message)
        pair = or_(
            and_(Comparison.message_a_id == a.id, Comparison.message_b_id == b.id),
            and_(Comparison.message_a_id == b.id, Comparison.message_b_id == a.id),
        )
        already = select(Comparison.id).where(Comparison.rater_id == rater_id, pair).exists()
        n_cmp = select(func.count(Comparison.id)).where(pair).scalar_subquery()
        stmt = (
            select(a, b)
            .join(b, and_(b.parent_id == a.parent_id, b.id > a.id))
            .join(Conversation, Conversation.id == a.conversation_id)
            .where(
                a.role == "assistant",
                b.role == "assistant",
                a.error.is_(None),
                b.error.is_(None),
                Conversation.user_id != rater_id,
                ~already,
            )
            .order_by(n_cmp, a.id)
            .limit(1)
        )
        with self.reading() as s:
            row = s.execute(stmt).first()
            return (row[0], row[1]) if row else None

    # ---- statistics --------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Row count of every table."""
        with self.reading() as s:
            return {
                table.name: s.scalar(select(func.count()).select_from(table)) or 0
                for table in Base.metadata.sorted_tables
            }

    # ---- model versions ----------------------------------------------------------------

    def register_model_version(
        self,
        kind: str,
        path: str,
        *,
        name: str = "",
        parent_id: int | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> int:
        """Record a model on disk as a candidate. Nothing is served until it is deployed."""
        if kind not in MODEL_KINDS:
            raise ValidationError(f"kind: {kind!r} is not one of {', '.join(MODEL_KINDS)}")
        with self.transaction() as s:
            mv = ModelVersion(
                kind=kind, path=str(path), name=name, parent_id=parent_id, metrics=metrics or {}
            )
            s.add(mv)
            s.flush()
            return mv.id

    def update_model_version(
        self, version_id: int, *, path: str | None = None, metrics: dict[str, Any] | None = None
    ) -> None:
        with self.transaction() as s:
            mv = s.get(ModelVersion, version_id)
            if mv is None:
                raise NotFoundError(f"no model version with id {version_id}")
            if path is not None:
                mv.path = str(path)
            if metrics is not None:
                mv.metrics = {**mv.metrics, **metrics}

    def get_model_version(self, version_id: int) -> ModelVersion:
        with self.reading() as s:
            mv = s.get(ModelVersion, version_id)
            if mv is None:
                raise NotFoundError(
                    f"no model version with id {version_id}; `rlchat models list` shows them"
                )
            return mv

    def list_model_versions(self, kind: str | None = None) -> list[ModelVersion]:
        stmt = select(ModelVersion).order_by(ModelVersion.id)
        if kind is not None:
            stmt = stmt.where(ModelVersion.kind == kind)
        with self.reading() as s:
            return list(s.scalars(stmt))

    def deployed_version(self) -> ModelVersion | None:
        with self.reading() as s:
            stmt = select(ModelVersion).where(ModelVersion.status == "deployed")
            return s.scalars(stmt).one_or_none()

    def deploy(self, version_id: int) -> ModelVersion:
        """Make `version_id` the one served policy, in one transaction."""
        with self.transaction() as s:
            mv = s.get(ModelVersion, version_id)
            if mv is None:
                raise NotFoundError(f"no model version with id {version_id}")
            if mv.kind not in POLICY_KINDS:
                raise ValidationError(
                    f"model version {version_id} is a {mv.kind} model; only "
                    f"{', '.join(POLICY_KINDS)} versions can be deployed"
                )
            if mv.status == "deployed":
                return mv
            s.execute(
                update(ModelVersion)
                .where(ModelVersion.status == "deployed")
                .values(status="retired")
            )
            s.flush()
            mv.status, mv.deployed_at = "deployed", utcnow()
            return mv

    def rollback(self) -> ModelVersion:
        """Retire the deployed policy and redeploy the one deployed before it."""
        with self.transaction() as s:
            current = s.scalars(
                select(ModelVersion).where(ModelVersion.status == "deployed")
            ).one_or_none()
            if current is None:
                raise NotFoundError("nothing is deployed, so there is nothing to roll back")
            previous = s.scalars(
                select(ModelVersion)
                .where(
                    ModelVersion.status == "retired",
                    ModelVersion.deployed_at.is_not(None),
                    ModelVersion.id != current.id,
                )
                .order_by(ModelVersion.deployed_at.desc(), ModelVersion.id.desc())
                .limit(1)
            ).one_or_none()
            if previous is None:
                raise NotFoundError(
                    f"model version {current.id} is the only one ever deployed; nothing to roll back to"
                )
            current.status = "rolled_back"
            s.flush()
            previous.status, previous.deployed_at = "deployed", utcnow()
            return previous

    # ---- training runs -----------------------------------------------------------------

    def start_run(
        self,
        kind: str,
        config: dict[str, Any],
        *,
        data_cutoff: datetime | None = None,
        data_ids: dict[str, Any] | None = None,
        log_path: str = "",
    ) -> int:
        with self.transaction() as s:
            run = TrainingRun(
                kind=kind,
                config=config,
                data_cutoff=data_cutoff,
                data_ids=data_ids or {},
                log_path=log_path,
            )
            s.add(run)
            s.flush()
            return run.id

    def update_run(self, run_id: int, **fields: Any) -> None:
        """Set fields of a run (status, metrics, data_ids, output_version_id, error, ...).

        `metrics` is merged into what is there; status succeeded/failed stamps finished_at.
        """
        with self.transaction() as s:
            run = s.get(TrainingRun, run_id)
            if run is None:
                raise NotFoundError(f"no training run with id {run_id}")
            if "metrics" in fields:
                fields["metrics"] = {**run.metrics, **fields["metrics"]}
            for key, value in fields.items():
                setattr(run, key, value)
            if fields.get("status") in ("succeeded", "failed"):
                run.finished_at = utcnow()

    def get_run(self, run_id: int) -> TrainingRun:
        with self.reading() as s:
            run = s.get(TrainingRun, run_id)
            if run is None:
                raise NotFoundError(f"no training run with id {run_id}")
            return run

    def list_runs(self, kind: str | None = None) -> list[TrainingRun]:
        stmt = select(TrainingRun).order_by(TrainingRun.id)
        if kind is not None:
            stmt = stmt.where(TrainingRun.kind == kind)
        with self.reading() as s:
            return list(s.scalars(stmt))
