"""The lean write path and the batch writes, on both databases.

One statement per rating, comparison and appended message (no validating SELECTs, no
per-transaction SET, no ping); refusals still explained field by field; batches all or none.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, event, text

from agent.config import Settings
from agent.errors import NotFoundError, ValidationError
from agent.store import db
from agent.store.api import ComparisonIn, MessageIn, RatingIn, Store
from agent.store.writes import Compiled


@pytest.fixture
def chat(store: Store) -> dict[str, int]:
    """A user, an annotator, a conversation with a user turn and two sibling replies."""
    user = store.get_or_create_user("alice", "user")
    ann = store.get_or_create_user("bob", "annotator")
    conv = store.create_conversation(user.id)
    q = store.append_message(conv, "user", "hi there")
    r1 = store.append_message(conv, "assistant", "hello!", q)
    r2 = store.append_message(conv, "assistant", "hey", q)
    return {"user": user.id, "ann": ann.id, "conv": conv, "q": q, "r1": r1, "r2": r2}


@contextmanager
def statements(store: Store) -> Iterator[list[str]]:
    """Every SQL statement the store sends while the block runs (BEGIN/COMMIT included):
    through SQLAlchemy, and the writer's pre-compiled ones on the DBAPI cursor."""
    sent: list[str] = []

    def record(conn, cursor, statement, *_):  # type: ignore[no-untyped-def]
        sent.append(" ".join(statement.split()))

    run = Compiled.rows

    def rows(self: Compiled, cursor, params):  # type: ignore[no-untyped-def]
        record(None, cursor, self.sql)
        return run(self, cursor, params)

    # On PostgreSQL one-statement writes have their own autocommit engine (and pool).
    postgres = store.engine.dialect.name == "postgresql"
    engines = [store.engine, store._autocommit] if postgres else [store.engine]
    for engine in engines:
        event.listen(engine, "before_cursor_execute", record)
    Compiled.rows = rows  # type: ignore[method-assign]
    try:
        yield sent
    finally:
        Compiled.rows = run  # type: ignore[method-assign]
        for engine in engines:
            event.remove(engine, "before_cursor_execute", record)


def test_each_write_is_one_statement_with_no_validating_select(
    store: Store, chat: dict[str, int]
) -> None:
    store.set_rating(chat["r1"], chat["ann"], "thumb", 1)  # warm the pool: no connect events
    writes = {
        "rating": lambda: store.set_rating(chat["r1"], chat["ann"], "likert", 4, criterion="c"),
        "comparison": lambda: store.add_comparison(chat["ann"], chat["r1"], chat["r2"], "a"),
        "message": lambda: store.append_message(chat["conv"], "user", "more", chat["r1"]),
    }
    postgres = store.engine.dialect.name == "postgresql"
    for name, write in writes.items():
        with statements(store) as sent:
            write()
        # Autocommit: no BEGIN/COMMIT, no SET, no ping, no SELECT before the write.
        assert sent[0].startswith(("INSERT", "WITH")), (name, sent)
        assert not any(s.startswith(("BEGIN", "COMMIT", "SET")) or s == ";" for s in sent)
        if postgres:  # one round trip: the lease clean-up and the title folded in
            assert len(sent) == 1, (name, sent)
        else:  # SQLite: then a keyed read of the lease (or title) only; nothing to clean up here
            assert len(sent) <= 2 and all(s.startswith("SELECT") for s in sent[1:]), (name, sent)


def test_refusals_still_name_the_field(store: Store, chat: dict[str, int]) -> None:
    r1, r2, q, ann = chat["r1"], chat["r2"], chat["q"], chat["ann"]
    with pytest.raises(NotFoundError, match="message_a_id: no message with id 999"):
        store.add_comparison(ann, 999, r2, "a")
    with pytest.raises(ValidationError, match=f"message_b_id: message {q} is a user message"):
        store.add_comparison(ann, r1, q, "a")
    with pytest.raises(NotFoundError, match="rater_id: no user with id 999"):
        store.add_comparison(999, r1, r2, "a")
    with pytest.raises(NotFoundError, match="model_version_id: no model version with id 77"):
        store.append_message(chat["conv"], "assistant", "x", q, model_version_id=77)
    with pytest.raises(NotFoundError, match="user_id: no user with id 999"):
        store.create_conversation(999)
    with pytest.raises(ValidationError, match="reasons: contains a NUL"):
        store.set_rating(r1, ann, "thumb", 1, reasons=["a\x00"])
    assert store.counts()["ratings"] == store.counts()["comparisons"] == 0
    assert store.counts()["messages"] == 3 and store.counts()["conversations"] == 1


def test_first_user_turn_titles_the_conversation_once(store: Store, chat: dict[str, int]) -> None:
    conv = store.create_conversation(chat["user"])
    with pytest.raises(NotFoundError, match="parent_id"):
        store.append_message(conv, "user", "refused turn", chat["q"])
    assert store.get_conversation(conv).title == ""  # a refused turn names nothing
    first = store.append_message(conv, "user", "  first line\nsecond")
    store.append_message(conv, "user", "later", first)
    assert store.get_conversation(conv).title == "first line"


def test_rating_ends_the_raters_lease(store: Store, chat: dict[str, int]) -> None:
    carol = store.get_or_create_user("carol", "annotator").id
    assert [m.id for m in store.next_for_annotation(chat["ann"], overlap=1, limit=2)] == [
        chat["r1"],
        chat["r2"],
    ]
    assert store.next_for_annotation(carol, overlap=1) == []  # both leased to bob
    store.set_rating(chat["r1"], chat["ann"], "thumb", 1)  # rating frees bob's lease on r1 …
    store.delete_rating(chat["r1"], chat["ann"], "thumb")  # … and undoing leaves it free
    assert [m.id for m in store.next_for_annotation(carol, overlap=1)] == [chat["r1"]]


def test_batch_ratings_all_or_nothing_naming_the_item(store: Store, chat: dict[str, int]) -> None:
    good = RatingIn(chat["r1"], chat["ann"], "likert", 4, "helpfulness")
    with pytest.raises(ValidationError, match=r"ratings\[1\]\.value: a likert rating"):
        store.set_ratings([good, RatingIn(chat["r1"], chat["ann"], "likert", 9, "harm")])
    with pytest.raises(NotFoundError, match=r"ratings\[2\]\.message_id: no message with id 999"):
        store.set_ratings([good, good, RatingIn(999, chat["ann"], "thumb", 1)])
    with pytest.raises(ValidationError, match=r"ratings\[1\]\.message_id: .* not a reply"):
        store.set_ratings([good, RatingIn(chat["q"], chat["ann"], "thumb", 1)])
    with pytest.raises(NotFoundError, match=r"ratings\[0\]\.rater_id: no user with id 999"):
        store.set_ratings([RatingIn(chat["r2"], 999, "thumb", 1), good])
    assert store.ratings() == []
    ids = store.set_ratings(
        [
            RatingIn(chat["r2"], chat["ann"], "likert", 2, "harm"),
            good,
            RatingIn(chat["r2"], chat["ann"], "likert", 5, "harm"),  # same key: the last wins
        ]
    )
    assert ids[0] == ids[2] and len(set(ids)) == 2
    assert sorted((r.message_id, r.criterion, r.value) for r in store.ratings()) == [
        (chat["r1"], "helpfulness", 4.0),
        (chat["r2"], "harm", 5.0),
    ]
    assert store.set_ratings([]) == []


def test_batch_comparisons_and_messages(store: Store, chat: dict[str, int]) -> None:
    r1, r2, ann = chat["r1"], chat["r2"], chat["ann"]
    q2 = store.append_message(chat["conv"], "user", "and?", r1)
    other = store.append_message(chat["conv"], "assistant", "so on", q2)
    with pytest.raises(ValidationError, match=r"comparisons\[1\]\.message_b_id: .* different"):
        store.add_comparisons([ComparisonIn(ann, r1, r2, "a"), ComparisonIn(ann, r1, other, "b")])
    with pytest.raises(ValidationError, match=r"comparisons\[0\]\.choice"):
        store.add_comparisons([ComparisonIn(ann, r1, r2, "c")])
    assert store.comparisons() == []
    (cid,) = store.add_comparisons([ComparisonIn(ann, r2, r1, "tie")])
    assert [(c.id, c.choice) for c in store.comparisons()] == [(cid, "tie")]

    before = store.counts()["messages"]
    turns = [MessageIn(chat["conv"], "user", "x", other), MessageIn(chat["conv"], "user", "y", 999)]
    with pytest.raises(NotFoundError, match=r"messages\[1\]\.parent_id: no message 999"):
        store.append_messages(turns)
    with pytest.raises(ValidationError, match=r"messages\[0\]\.content: contains a NUL"):
        store.append_messages([MessageIn(chat["conv"], "user", "\x00", other)])
    assert store.counts()["messages"] == before
    a, b = store.append_messages([turns[0], MessageIn(chat["conv"], "assistant", "z", other)])
    assert [m.content for m in store.messages(chat["conv"])][-2:] == ["x", "z"] and a < b


def test_failed_first_turn_leaves_no_conversation(store: Store, chat: dict[str, int]) -> None:
    conv = store.create_conversation(chat["user"])
    with pytest.raises(ValidationError), store.discarding_if_empty(conv):
        raise ValidationError("text: too long for the model")
    assert conv not in {c.id for c in store.list_conversations()}
    assert not store.discard_empty_conversation(chat["conv"])  # it has messages: kept


def test_two_tabs_of_one_annotator_get_different_items(store: Store, chat: dict[str, int]) -> None:
    first = store.next_for_annotation(chat["ann"], overlap=2)
    second = store.next_for_annotation(chat["ann"], overlap=2)
    assert [m.id for m in first] == [chat["r1"]] and [m.id for m in second] == [chat["r2"]]
    assert store.next_for_annotation(chat["ann"], overlap=2) == []  # both held by the tabs
    store.skip_annotation(chat["r1"], chat["ann"])
    store.set_rating(chat["r2"], chat["ann"], "likert", 3, criterion="c")
    assert store.next_for_annotation(chat["ann"], overlap=2) == []  # skipped and rated


@pytest.fixture
def pg_store(postgres_url: str) -> Iterator[Store]:
    engine = db.make_engine(postgres_url)
    db.upgrade(engine)
    engine.dispose()
    store = Store.open(Settings(database_url=postgres_url))
    yield store
    store.close()


@pytest.mark.postgres
def test_postgres_session_settings_once_and_no_ping(pg_store: Store) -> None:
    # One-statement writes never ping (reads and longer transactions, which cannot be
    # replayed on a fresh connection, still do).
    assert pg_store._autocommit.pool._pre_ping is False  # type: ignore[attr-defined]
    for engine in (pg_store.engine, pg_store._autocommit):
        with engine.connect() as conn:
            assert conn.execute(text("SHOW lock_timeout")).scalar() == "30s"
            assert conn.execute(text("SHOW synchronous_commit")).scalar() == "on"


@pytest.mark.postgres
def test_postgres_dropped_connection_is_retried(pg_store: Store, postgres_url: str) -> None:
    user = pg_store.get_or_create_user("u")
    conv = pg_store.create_conversation(user.id)
    pids = []
    for engine in (pg_store.engine, pg_store._autocommit):  # the pooled connections
        with engine.connect() as conn:
            pids.append(conn.execute(text("SELECT pg_backend_pid()")).scalar())
    admin = create_engine(postgres_url)
    with admin.begin() as other:  # as a server restart or an idle timeout would
        for pid in pids:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    admin.dispose()
    msg = pg_store.append_message(conv, "user", "still works")
    assert pg_store.get_message(msg).content == "still works"


def test_a_driver_error_on_the_lean_path_surfaces_as_sqlalchemys(
    store: Store, chat: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer runs on the DBAPI cursor; its driver errors still reach callers (and the
    CLI's error messages) as SQLAlchemy exceptions, and the pool stays usable."""
    from sqlalchemy.exc import OperationalError

    dbapi = store.engine.dialect.loaded_dbapi

    def fail(self: Compiled, cursor, params):  # type: ignore[no-untyped-def]
        raise dbapi.OperationalError("disk I/O error")

    with monkeypatch.context() as patched:
        patched.setattr(Compiled, "rows", fail)
        with pytest.raises(OperationalError, match="disk I/O error"):
            store.set_rating(chat["r1"], chat["ann"], "thumb", 1)
    assert store.set_rating(chat["r1"], chat["ann"], "thumb", 1) > 0
