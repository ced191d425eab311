"""The annotation queues: Likert items leased to one annotator at a time, and sibling pairs."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select, text
from sqlalchemy.orm import Session, aliased

from agent.errors import NotFoundError, ValidationError
from agent.store.base import StoreBase
from agent.store.models import AnnotationLease, Comparison, Conversation, Message, Rating, utcnow


class AnnotationQueue(StoreBase):
    """Which reply or pair an annotator gets next, and the leases that keep two from clashing."""

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
        held back from others while (raters so far + live leases) reaches `overlap`, and an
        item this annotator already holds a live lease on (open in another tab) is not served
        to them again until they rate or skip it or the lease expires.
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
        mine_held = select(AnnotationLease.message_id).where(
            AnnotationLease.rater_id == rater_id,
            or_(AnnotationLease.skipped.is_(True), AnnotationLease.expires_at > now),
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
                Message.id.not_in(mine_held),
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
            role = s.scalar(select(Message.role).where(Message.id == message_id))
            if role is None:
                raise NotFoundError(f"message_id: no message with id {message_id}")
            if role != "assistant":
                raise ValidationError(
                    f"message_id: message {message_id} is a {role} message, not a reply"
                )
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
