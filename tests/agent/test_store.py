"""The store API on both databases: the happy path, the bad input, the invariants."""

from __future__ import annotations

import pytest

from agent.errors import NotFoundError, ValidationError
from agent.store.api import Store


@pytest.fixture
def chat(store: Store) -> dict[str, int]:
    """One user, one annotator, a conversation with a user turn and two sibling replies."""
    user = store.get_or_create_user("alice", "user")
    ann = store.get_or_create_user("bob", "annotator")
    conv = store.create_conversation(user.id, system_prompt="be kind")
    q = store.append_message(conv, "user", "hi there")
    r1 = store.append_message(conv, "assistant", "hello!", q, sampling={"temperature": 0.7})
    r2 = store.append_message(conv, "assistant", "hey, how are you?", q)
    return {"user": user.id, "ann": ann.id, "conv": conv, "q": q, "r1": r1, "r2": r2}


def test_message_tree_and_path(store: Store, chat: dict[str, int]) -> None:
    follow = store.append_message(chat["conv"], "user", "fine", chat["r2"])
    assert [m.id for m in store.path(follow)] == [chat["q"], chat["r2"], follow]
    assert [m.id for m in store.siblings(chat["r1"])] == [chat["r1"], chat["r2"]]
    assert store.get_conversation(chat["conv"]).title == "hi there"
    assert store.get_message(chat["r1"]).sampling == {"temperature": 0.7}


def test_rating_is_an_upsert_per_rater_message_and_kind(store: Store, chat: dict[str, int]) -> None:
    first = store.set_rating(chat["r1"], chat["user"], "thumb", 1)
    second = store.set_rating(
        chat["r1"], chat["user"], "thumb", -1, reasons=["rude"], comment="meh"
    )
    store.set_rating(chat["r1"], chat["user"], "likert", 4, criterion="helpfulness")
    assert first == second
    ratings = store.ratings(chat["r1"])
    assert [(r.kind, r.criterion, r.value) for r in ratings] == [
        ("thumb", "", -1.0),
        ("likert", "helpfulness", 4.0),
    ]
    assert ratings[0].reasons == ["rude"] and ratings[0].comment == "meh"
    assert store.delete_rating(chat["r1"], chat["user"], "thumb") == 1
    assert len(store.ratings(chat["r1"])) == 1


@pytest.mark.parametrize(
    ("kind", "value", "criterion", "match"),
    [
        ("thumb", 2, "", "thumb is \\+1 or -1"),
        ("likert", 6, "helpfulness", "integer 1..5"),
        ("likert", 2.5, "helpfulness", "integer 1..5"),
        ("likert", 3, "", "needs a criterion"),
        ("stars", 3, "", "kind"),
    ],
)
def test_rating_out_of_range_or_wrong_kind(
    store: Store, chat: dict[str, int], kind: str, value: float, criterion: str, match: str
) -> None:
    with pytest.raises(ValidationError, match=match):
        store.set_rating(chat["r1"], chat["user"], kind, value, criterion=criterion)
    assert store.ratings() == []


def test_rating_unknown_or_user_message(store: Store, chat: dict[str, int]) -> None:
    with pytest.raises(NotFoundError, match="no message with id 999"):
        store.set_rating(999, chat["user"], "thumb", 1)
    with pytest.raises(ValidationError, match="not a reply"):
        store.set_rating(chat["q"], chat["user"], "thumb", 1)
    with pytest.raises(NotFoundError, match="rater_id"):
        store.set_rating(chat["r1"], 999, "thumb", 1)


def test_comparison_upsert_and_different_parents(store: Store, chat: dict[str, int]) -> None:
    c1 = store.add_comparison(chat["ann"], chat["r1"], chat["r2"], "a")
    c2 = store.add_comparison(chat["ann"], chat["r1"], chat["r2"], "tie")
    assert c1 == c2 and [c.choice for c in store.comparisons()] == ["tie"]
    q2 = store.append_message(chat["conv"], "user", "and?", chat["r1"])
    other = store.append_message(chat["conv"], "assistant", "so on", q2)
    with pytest.raises(ValidationError, match="answer different messages"):
        store.add_comparison(chat["ann"], chat["r1"], other, "a")
    with pytest.raises(ValidationError, match="choice"):
        store.add_comparison(chat["ann"], chat["r1"], chat["r2"], "c")
    with pytest.raises(ValidationError, match="itself"):
        store.add_comparison(chat["ann"], chat["r1"], chat["r1"], "a")
    assert len(store.comparisons()) == 1


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "must not be empty"),
        ("   ", "must not be empty"),
        ("a\x00b", "NUL"),
        ("x" * 32_001, "over the limit"),
    ],
)
def test_bad_text_is_refused_and_nothing_stored(
    store: Store, chat: dict[str, int], text: str, match: str
) -> None:
    before = store.counts()
    with pytest.raises(ValidationError, match=match):
        store.append_message(chat["conv"], "user", text, chat["r1"])
    if text.strip():  # comments may be empty, but not NUL-laden or over the limit
        with pytest.raises(ValidationError, match=match):
            store.set_rating(chat["r1"], chat["user"], "thumb", 1, comment=text)
    assert store.counts() == before


def test_text_at_the_limit_is_accepted(store: Store, chat: dict[str, int]) -> None:
    mid = store.append_message(chat["conv"], "user", "x" * 32_000, chat["r1"])
    assert len(store.get_message(mid).content) == 32_000


def test_parent_must_be_in_the_same_conversation(store: Store, chat: dict[str, int]) -> None:
    other = store.create_conversation(chat["user"])
    with pytest.raises(NotFoundError, match="parent_id"):
        store.append_message(other, "user", "hi", chat["q"])
    with pytest.raises(NotFoundError, match="conversation_id"):
        store.append_message(12345, "user", "hi")


def test_failed_generation_is_recorded(store: Store, chat: dict[str, int]) -> None:
    mid = store.append_message(chat["conv"], "assistant", "", chat["q"], error="CUDA out of memory")
    assert store.get_message(mid).error == "CUDA out of memory"


def test_annotation_queue(store: Store, chat: dict[str, int]) -> None:
    bob, r1, r2 = chat["ann"], chat["r1"], chat["r2"]
    carol, dave, erin = (
        store.get_or_create_user(n, "annotator").id for n in ("carol", "dave", "erin")
    )
    assert store.next_for_annotation(chat["user"]) == []  # never one's own conversation
    store.set_rating(r1, chat["user"], "thumb", 1)  # an end user's thumb is not an annotation
    store.set_rating(r1, dave, "likert", 3, criterion="helpfulness")
    # Fewest annotators first: r2 (none) before r1 (dave).
    assert [m.id for m in store.next_for_annotation(bob, overlap=3, limit=2)] == [r2, r1]
    # Overlap 2: r1 has dave's rating and bob's lease, so carol gets only r2, and erin nothing.
    assert [m.id for m in store.next_for_annotation(carol, overlap=2, limit=2)] == [r2]
    assert store.next_for_annotation(erin, overlap=2) == []
    # Bob skips r1: his lease no longer holds it back, and he never sees it again.
    store.skip_annotation(r1, bob)
    assert [m.id for m in store.next_for_annotation(erin, overlap=2)] == [r1]
    store.set_rating(r2, bob, "likert", 5, criterion="helpfulness")
    assert store.next_for_annotation(bob, overlap=5) == []


def test_pair_queue(store: Store, chat: dict[str, int]) -> None:
    a, b = store.next_pair_for_annotation(chat["ann"])
    assert {a.id, b.id} == {chat["r1"], chat["r2"]}
    store.add_comparison(chat["ann"], b.id, a.id, "b")
    assert store.next_pair_for_annotation(chat["ann"]) is None


def test_deploy_rollback_and_one_deployed(store: Store, tmp_path) -> None:
    base = store.register_model_version("base", str(tmp_path))
    sft = store.register_model_version("sft", str(tmp_path), parent_id=base)
    rm = store.register_model_version("reward", str(tmp_path), parent_id=base)
    with pytest.raises(NotFoundError, match="nothing is deployed"):
        store.rollback()
    store.deploy(base)
    store.deploy(sft)
    assert store.deployed_version().id == sft
    with pytest.raises(ValidationError, match="only base, sft, ppo"):
        store.deploy(rm)
    assert store.rollback().id == base
    assert store.get_model_version(sft).status == "rolled_back"
    with pytest.raises(NotFoundError, match="only one ever deployed"):
        store.rollback()
    assert [v.status for v in store.list_model_versions()].count("deployed") == 1


def test_training_run_lifecycle(store: Store) -> None:
    run = store.start_run("sft", {"lr": 1e-4})
    store.update_run(run, metrics={"loss": 2.0})
    store.update_run(run, metrics={"eval/loss": 1.5}, status="succeeded")
    row = store.get_run(run)
    assert row.metrics == {"loss": 2.0, "eval/loss": 1.5}
    assert row.finished_at is not None and row.status == "succeeded"


def test_counts_cover_every_table(store: Store, chat: dict[str, int]) -> None:
    counts = store.counts()
    assert counts["messages"] == 3 and counts["users"] == 2 and counts["conversations"] == 1
    assert set(counts) >= {"ratings", "comparisons", "model_versions", "training_runs"}


def test_rating_survives_reopening(store: Store, chat: dict[str, int], settings) -> None:
    store.set_rating(chat["r1"], chat["ann"], "thumb", 1)
    store.close()
    reopened = Store.open(settings)
    assert [r.value for r in reopened.ratings(chat["r1"])] == [1.0]
    reopened.close()
