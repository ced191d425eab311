"""Chat tab handlers on the tiny model: streaming, bad input, feedback, regenerate, edit, owners."""

from __future__ import annotations

import types

import gradio as gr
import pytest
from ui_helpers import add_people, request_as

from agent.chat import ChatAgent
from feedback_ui.auth import Access
from feedback_ui.chat import ChatHandlers, empty_state
from feedback_ui.common import NEGATIVE_REASONS, UIContext

SAMPLING = (0.8, 0.95, 6, 1.1)  # temperature, top_p, max_new_tokens, repetition_penalty


@pytest.fixture
def chat(sqlite_store, sqlite_settings, deployed_tiny):
    people = add_people(sqlite_store)
    agent = ChatAgent(sqlite_store, sqlite_settings, device="cpu")
    ctx = UIContext(sqlite_store, sqlite_settings, Access(sqlite_store, auth=True), agent)
    return types.SimpleNamespace(h=ChatHandlers(ctx), store=sqlite_store, people=people)


def send(h: ChatHandlers, state: dict, text: str, name: str = "alice") -> list[tuple]:
    return list(h.send(state, text, "be brief", *SAMPLING, request_as(name)))


def test_send_streams_and_stores_the_turn(chat) -> None:
    outputs = send(chat.h, empty_state(), "hi there")
    assert outputs[0][4] == ""  # the textbox is cleared at once
    state, shown, _, reply_id = outputs[-1][:4]
    user_id, assistant_id = state["path"]
    assert reply_id == assistant_id
    stored = chat.store.get_message(assistant_id)
    assert stored.role == "assistant" and stored.parent_id == user_id
    assert shown == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": stored.content},
    ]
    assert len(outputs) >= 4  # at least one partial update before the stored reply
    conversations = outputs[-1][5]["choices"]
    assert conversations == [(f"#{state['conversation_id']} hi there", state["conversation_id"])]
    assert outputs[-1][5]["value"] == state["conversation_id"]  # shown as the current one
    follow_up = send(chat.h, state, "and then?")[-1][0]
    assert follow_up["path"][:2] == state["path"] and len(follow_up["path"]) == 4


@pytest.mark.parametrize(
    ("text", "error"), [("", "message: must not be empty"), ("   ", "must not be empty")]
)
def test_empty_message_stores_nothing(chat, text, error) -> None:
    with pytest.raises(gr.Error, match=error):
        send(chat.h, empty_state(), text)
    assert chat.store.counts()["messages"] == 0 and chat.store.counts()["conversations"] == 0


def test_message_over_the_limit_stores_nothing(chat) -> None:
    limit = chat.h.ctx.settings.max_text_chars
    with pytest.raises(gr.Error, match=f"over the limit of {limit:,}"):
        send(chat.h, empty_state(), "x" * (limit + 1))
    assert chat.store.counts()["messages"] == 0


def test_html_is_stored_verbatim(chat) -> None:
    text = "<script>alert(1)</script><img src=x onerror=alert(2)> **hi**"
    state = send(chat.h, empty_state(), text)[-1][0]
    assert chat.store.get_message(state["path"][0]).content == text
    note = chat.h.rate(state["path"][1], -1, ["rude"], "<script>x</script>", request_as("alice"))
    assert "saved" in note
    [rating] = chat.store.ratings()
    assert rating.comment == "<script>x</script>" and rating.reasons == ["rude"]


def test_rating_rules(chat) -> None:
    state = send(chat.h, empty_state(), "hello")[-1][0]
    reply = state["path"][1]
    with pytest.raises(gr.Error, match="no message with id 9999"):
        chat.h.rate(9999, 1, [], "", request_as("alice"))
    with pytest.raises(gr.Error, match="not an assistant reply"):
        chat.h.rate(state["path"][0], 1, [], "", request_as("alice"))
    with pytest.raises(gr.Error, match="belongs to another user"):
        chat.h.rate(reply, 1, [], "", request_as("carol"))
    with pytest.raises(gr.Error, match="thumb"):
        chat.h.rate(reply, None, [], "", request_as("alice"))
    for _ in range(2):  # a double click
        chat.h.rate(reply, -1, ["wrong"], "meh", request_as("alice"))
    like = types.SimpleNamespace(index=1, liked=True, value=None)
    assert chat.h.like(state, like, request_as("alice"))[:4:3] == (reply, 1)
    [rating] = chat.store.ratings()
    assert (rating.kind, rating.value, rating.rater_id) == ("thumb", 1.0, chat.people.alice)
    assert rating.reasons == [] and rating.comment == "meh"  # "wrong" fits a 👎, not a 👍


def test_a_thumb_icon_opens_the_feedback_panel_for_that_reply(chat) -> None:
    state = send(chat.h, empty_state(), "first")[-1][0]
    state = send(chat.h, state, "second")[-1][0]
    older, newest = state["path"][1], state["path"][3]
    down = types.SimpleNamespace(index=1, liked=False, value=None)  # the older reply's 👎
    selected, panel, heading, thumb, reasons, comment, _ = chat.h.like(
        state, down, request_as("alice")
    )
    assert selected == older != newest and panel["visible"] is True and thumb == -1
    assert chat.store.get_message(older).content.split()[0] in heading and "👎" in heading
    assert reasons["choices"] == NEGATIVE_REASONS and comment == ""
    chat.h.rate(selected, thumb, ["wrong"], "off topic", request_as("alice"))
    [rating] = chat.store.ratings(message_id=older)
    assert (rating.value, rating.reasons, rating.comment) == (-1.0, ["wrong"], "off topic")
    assert chat.store.ratings(message_id=newest) == []
    again = chat.h.like(state, down, request_as("alice"))  # reopened: what was said is back
    assert again[4]["value"] == ["wrong"] and again[5] == "off topic"
    off = types.SimpleNamespace(index=1, liked="", value=None)  # the icon clicked off
    assert chat.h.like(state, off, request_as("alice"))[1]["visible"] is False
    assert chat.store.ratings(message_id=older) == []


def test_regenerate_makes_a_sibling_and_the_user_marks_the_better_one(chat) -> None:
    state = send(chat.h, empty_state(), "hello")[-1][0]
    first = state["path"][1]
    with pytest.raises(gr.Error, match="one reply"):
        chat.h.mark_better(state, request_as("alice"))
    state, shown, siblings, second = list(chat.h.regenerate(state, *SAMPLING, request_as("alice")))[
        -1
    ]
    assert state["path"][0] == chat.store.get_message(second).parent_id
    assert second != first and siblings["visible"] and len(siblings["choices"]) == 2
    assert len(shown) == 2
    state, shown, shown_id = chat.h.show_sibling(state, first, request_as("alice"))
    assert state["path"][1] == first == shown_id
    assert shown[1]["content"] == chat.store.get_message(first).content
    assert "better than 1" in chat.h.mark_better(state, request_as("alice"))
    [cmp] = chat.store.comparisons()
    assert (cmp.message_a_id, cmp.message_b_id, cmp.choice) == (first, second, "a")
    with pytest.raises(gr.Error, match="belongs to another user"):
        list(chat.h.regenerate(state, *SAMPLING, request_as("carol")))


def test_edit_starts_a_branch(chat) -> None:
    state = send(chat.h, empty_state(), "one")[-1][0]
    state = send(chat.h, state, "two")[-1][0]
    edit = types.SimpleNamespace(index=2, value="two, edited", previous_value="two")
    new = list(chat.h.edit(state, *SAMPLING, edit, request_as("alice")))[-1][0]
    assert new["path"][:2] == state["path"][:2] and new["path"][2] != state["path"][2]
    edited = chat.store.get_message(new["path"][2])
    assert edited.content == "two, edited" and edited.parent_id == state["path"][1]
    assert len(chat.store.messages(state["conversation_id"])) == 6  # the old branch is kept
    first = types.SimpleNamespace(index=0, value="zero", previous_value="one")
    fresh = list(chat.h.edit(state, *SAMPLING, first, request_as("alice")))[-1][0]
    assert fresh["conversation_id"] != state["conversation_id"]
    bad = types.SimpleNamespace(index=1, value="not mine", previous_value="")
    with pytest.raises(gr.Error, match="only your own messages"):
        list(chat.h.edit(state, *SAMPLING, bad, request_as("alice")))


def test_old_branches_of_edited_and_regenerated_turns_can_be_browsed(chat) -> None:
    state = send(chat.h, empty_state(), "one")[-1][0]
    assert chat.h.branches(state)["visible"] is False  # a single branch
    state = send(chat.h, state, "two")[-1][0]
    old = state
    edit = types.SimpleNamespace(index=2, value="two, edited", previous_value="two")
    state = list(chat.h.edit(state, *SAMPLING, edit, request_as("alice")))[-1][0]
    state = list(chat.h.regenerate(state, *SAMPLING, request_as("alice")))[-1][0]
    picker = chat.h.branches(state)
    labels = [label for label, _ in picker["choices"]]
    assert picker["visible"] is True and len(labels) == 3 and picker["value"] == state["path"][-1]
    assert sum("(on screen)" in label for label in labels) == 1
    assert any("edited message at turn 2" in label and "“two”" in label for label in labels)
    assert any("other reply at turn 2" in label for label in labels)
    back, shown, _, last = chat.h.open_branch(state, old["path"][-1], request_as("alice"))
    assert back["path"] == old["path"] and shown[2] == {"role": "user", "content": "two"}
    assert last == old["path"][-1]
    assert chat.h.on_screen_changed(back)[1]["visible"] is False  # the panel closes
    with pytest.raises(gr.Error, match="belongs to another user"):
        chat.h.open_branch(state, old["path"][-1], request_as("carol"))
    with pytest.raises(gr.Error, match="not in this conversation"):
        chat.h.open_branch(state, 999_999, request_as("alice"))


def test_each_user_sees_only_their_own_conversations(chat) -> None:
    state = send(chat.h, empty_state(), "secret")[-1][0]
    conv = state["conversation_id"]
    assert chat.h.conversations(request_as("carol"))["choices"] == []
    with pytest.raises(gr.Error, match="belongs to another user"):
        chat.h.open_conversation(conv, request_as("carol"))
    with pytest.raises(gr.Error, match="belongs to another user"):
        send(chat.h, state, "hijack", name="carol")
    opened, shown, _, last = chat.h.open_conversation(conv, request_as("alice"))
    assert opened == state and shown[0]["content"] == "secret" and last == state["path"][1]


def test_stop_keeps_the_partial_reply(chat) -> None:
    chat.h.ctx.settings.max_text_chars = 100
    stream = chat.h.send(empty_state(), "go on", "", 0.8, 0.95, 200, 1.1, request_as("alice"))
    next(stream)  # the user message is on screen
    next(stream)  # generation started
    chat.h.stop(request_as("alice"))
    state = list(stream)[-1][0]
    reply = chat.store.get_message(state["path"][1])
    assert reply.completion_tokens < 200


def test_without_a_model_the_chat_says_so(store, people, ctx) -> None:
    h = ChatHandlers(ctx)
    with pytest.raises(gr.Error, match="without a chat model"):
        send(h, empty_state(), "hi")
