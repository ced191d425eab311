"""8 processes x 500 rating upserts and 500 appended messages into one database."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from agent.store.api import Store
from agent.store.models import Message, Rating
from benchmarks.store_writers import N_REPLIES, prepare, run_writers

PROCESSES, N = 8, 500


@pytest.mark.slow
def test_concurrent_writers_every_row_exactly_once(store: Store, database_url: str) -> None:
    setup = prepare(database_url, PROCESSES)
    run_writers(setup, PROCESSES, N, "ratings")
    run_writers(setup, PROCESSES, N, "messages")

    with store.transaction() as s:
        thumbs = s.execute(
            select(Rating.rater_id, Rating.message_id, func.count())
            .where(Rating.kind == "thumb")
            .group_by(Rating.rater_id, Rating.message_id)
        ).all()
        shared = s.scalar(select(func.count()).where(Rating.kind == "likert"))
        contents = s.scalars(
            select(Message.content).where(
                Message.conversation_id == setup.conversation_id, Message.role == "user"
            )
        ).all()
    assert len(thumbs) == PROCESSES * N_REPLIES and all(n == 1 for *_, n in thumbs)
    assert shared == N_REPLIES  # one row per reply for the rater every process updated
    appended = [c for c in contents if c.startswith("p")]
    assert len(appended) == PROCESSES * N
    assert set(appended) == {f"p{p}-m{i}" for p in range(PROCESSES) for i in range(N)}
