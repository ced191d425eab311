"""Handlers refuse what API callers can send but no component could: a message, not a crash.

The same cases through a live server are in test_api.py (chat); these cover the arena, the
annotation queue and the shared checks.
"""

from __future__ import annotations

import gradio as gr
import pytest
from ui_helpers import add_people, request_as, seed_chat

from agent.chat import ChatAgent
from agent.errors import ValidationError
from feedback_ui.annotate import AnnotateHandlers
from feedback_ui.arena import ArenaHandlers, empty_state
from feedback_ui.auth import Access
from feedback_ui.common import UIContext, id_input, number_input, text_input, whole_input


def test_shared_checks_name_the_field_and_the_problem() -> None:
    with pytest.raises(ValidationError, match=r"note: contains a lone surrogate \(U\+D800\)"):
        text_input("note", "ok \ud800", 100)
    with pytest.raises(ValidationError, match="temperature: NaN is not a number"):
        number_input("temperature", float("nan"))
    with pytest.raises(ValidationError, match="temperature: inf is out of range"):
        number_input("temperature", float("inf"))
    with pytest.raises(ValidationError, match="temperature: expected a number, got '0.7'"):
        number_input("temperature", "0.7")
    with pytest.raises(ValidationError, match="expected a number, got True"):
        number_input("temperature", True)
    with pytest.raises(ValidationError, match="tokens: 8.5 is not a whole number"):
        whole_input("tokens", 8.5)
    for bad in (2.5, 0, -3, 2**31, "7", None):
        with pytest.raises(ValidationError, match="reply: .* is not an id"):
            id_input("reply", bad)
    assert (id_input("reply", 7.0), whole_input("tokens", 8.0), number_input("t", 1)) == (7, 8, 1.0)


def test_annotation_comment_must_be_valid_unicode(store, people, ctx) -> None:
    seed_chat(store, people.alice)
    h = AnnotateHandlers(ctx)
    item = h.next_item(request_as("ann"))[0]
    with pytest.raises(gr.Error, match="comment: contains a lone surrogate"):
        h.submit(request_as("ann"), item, [], [], "bad \udc80", 4, 5)
    assert store.ratings() == []


def test_arena_refuses_bad_text_and_numbers_before_storing(
    sqlite_store, sqlite_settings, deployed_tiny
) -> None:
    add_people(sqlite_store)
    agent = ChatAgent(sqlite_store, sqlite_settings, device="cpu")
    ctx = UIContext(sqlite_store, sqlite_settings, Access(sqlite_store, auth=True), agent)
    h = ArenaHandlers(ctx, seed=0)
    for args, message in [
        (("hi \ud800", None, None, 0.8, 6), "message: contains a lone surrogate"),
        (("hi", None, None, 0.8, float("nan")), "max new tokens: NaN is not a number"),
        (("hi", None, None, "hot", 6), "temperature: expected a number, got &#x27;hot&#x27;"),
    ]:
        with pytest.raises(gr.Error, match=message):
            list(h.send(empty_state(), *args, request_as("alice")))
    assert sqlite_store.counts()["messages"] == 0
