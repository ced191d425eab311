"""Annotate tab handlers: queue, Likert ratings, skip, undo, pairs, roles, concurrency."""

from __future__ import annotations

import threading

import gradio as gr
import pytest
from ui_helpers import request_as, seed_chat

from feedback_ui.annotate import AnnotateHandlers


def submit(h: AnnotateHandlers, name: str, item, history, scores=(4, 5), reasons=(), comment=""):
    return h.submit(request_as(name), item, history, list(reasons), comment, *scores)


def test_queue_serves_others_replies_fewest_ratings_first(store, people, ctx) -> None:
    own = seed_chat(store, people.ann)[0]
    rated, fresh = seed_chat(store, people.alice)[0], seed_chat(store, people.carol)[0]
    store.set_rating(rated, people.bob, "likert", 3, criterion="helpfulness")
    h = AnnotateHandlers(ctx)
    item, chat, system, info, *_ = h.next_item(request_as("ann"))
    assert item == fresh and item != own
    assert chat == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "reply 0 to hello"},
    ]
    assert system == "be nice" and f"#{fresh}" in info


def test_submit_stores_one_rating_per_criterion_even_twice(store, people, ctx) -> None:
    reply = seed_chat(store, people.alice)[0]
    h = AnnotateHandlers(ctx)
    item = h.next_item(request_as("ann"))[0]
    history, next_item, *_ = submit(h, "ann", item, [], reasons=["helpful"], comment="<b>ok</b>")
    assert next_item is None  # the queue is empty for ann now
    assert {(r.comment, tuple(r.reasons)) for r in store.ratings()} == {("<b>ok</b>", ("helpful",))}
    submit(h, "ann", item, history, scores=(2, 5))  # a double click / a second submit
    rows = store.ratings(message_id=reply)
    assert sorted((r.criterion, r.value) for r in rows) == [("harmlessness", 5), ("helpfulness", 2)]
    assert rows[0].comment == ""  # the second judgement replaced the first


def test_submit_needs_every_score_and_stores_nothing_otherwise(store, people, ctx) -> None:
    reply = seed_chat(store, people.alice)[0]
    h = AnnotateHandlers(ctx)
    with pytest.raises(gr.Error, match="harmlessness: pick a score"):
        submit(h, "ann", reply, [], scores=(4, None))
    with pytest.raises(gr.Error, match="no reply on screen"):
        submit(h, "ann", None, [])
    with pytest.raises(gr.Error, match="no message with id 9999"):
        submit(h, "ann", 9999, [])
    assert store.ratings() == []


def test_roles_checked_on_the_server(store, people, ctx) -> None:
    reply = seed_chat(store, people.carol)[0]
    h = AnnotateHandlers(ctx)
    with pytest.raises(gr.Error, match="needs the annotator role"):
        submit(h, "alice", reply, [])
    with pytest.raises(gr.Error, match="not logged in"):
        h.next_item(request_as(None))
    own = seed_chat(store, people.ann)[0]
    with pytest.raises(gr.Error, match="own conversations"):
        submit(h, "ann", own, [])
    assert store.ratings() == []


def test_undo_removes_the_last_rating_and_shows_the_item_again(store, people, ctx) -> None:
    reply = seed_chat(store, people.alice)[0]
    h = AnnotateHandlers(ctx)
    history = submit(h, "ann", reply, [])[0]
    assert len(store.ratings()) == 2
    history, item, *_ = h.undo(history, request_as("ann"))
    assert history == [] and item == reply and store.ratings() == []
    with pytest.raises(gr.Error, match="nothing to undo"):
        h.undo(history, request_as("ann"))


def test_skip_is_never_served_again(store, people, ctx) -> None:
    first, second = seed_chat(store, people.alice)[0], seed_chat(store, people.carol)[0]
    h = AnnotateHandlers(ctx)
    assert h.next_item(request_as("ann"))[0] == first
    assert h.skip(first, request_as("ann"))[0] == second
    assert h.skip(second, request_as("ann"))[0] is None
    assert h.next_item(request_as("bob"))[0] == first  # a skip frees the item for others


def test_item_is_not_served_to_two_annotators_beyond_the_overlap(store, people, ctx) -> None:
    ctx.settings.annotation_overlap = 1
    first, second = seed_chat(store, people.alice)[0], seed_chat(store, people.carol)[0]
    h = AnnotateHandlers(ctx)
    assert h.next_item(request_as("ann"))[0] == first
    assert h.next_item(request_as("bob"))[0] == second  # first is leased to ann


def test_two_annotators_judging_one_item_at_once(store, people, ctx) -> None:
    reply = seed_chat(store, people.alice)[0]
    h = AnnotateHandlers(ctx)
    assert h.next_item(request_as("ann"))[0] == reply
    assert h.next_item(request_as("bob"))[0] == reply  # overlap 2: both get it
    errors: list[Exception] = []

    def rate(name: str) -> None:
        try:
            for _ in range(3):  # each clicks three times
                submit(h, name, reply, [])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=rate, args=(n,)) for n in ("ann", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    rows = store.ratings(message_id=reply)
    assert len(rows) == 4 and {r.rater_id for r in rows} == {people.ann, people.bob}
    assert h.next_item(request_as("root"))[0] is None  # it has its overlap now


def test_pairwise_vote_is_anonymous_and_undoable(store, people, ctx) -> None:
    a, b = seed_chat(store, people.alice, replies=2)
    h = AnnotateHandlers(ctx)
    pair, context, reply_a, reply_b, info, _ = h.next_pair(request_as("ann"))
    assert {pair["a"], pair["b"]} == {a, b}
    assert context == [{"role": "user", "content": "hello"}]
    assert "v" not in info.lower().split() and "model" not in str(reply_a + reply_b).lower()
    history, next_pair, *_ = h.vote("b")(pair, [], request_as("ann"))
    assert next_pair is None
    [row] = store.comparisons(rater_id=people.ann)
    assert (row.message_a_id, row.message_b_id, row.choice) == (pair["a"], pair["b"], "b")
    out = h.undo(history, request_as("ann"))
    assert store.comparisons() == [] and out[0] == []
    with pytest.raises(gr.Error, match="needs the annotator role"):
        h.vote("a")(pair, [], request_as("carol"))


def test_progress_counts(store, people, ctx) -> None:
    reply = seed_chat(store, people.alice)[0]
    seed_chat(store, people.carol)
    h = AnnotateHandlers(ctx)
    submit(h, "ann", reply, [])
    text = h.progress(request_as("ann"))
    assert "1 replies rated (1 today)" in text and "1 replies still need ratings" in text
