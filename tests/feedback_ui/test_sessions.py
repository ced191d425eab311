"""Per-session state and the Stop buttons belong to the logged-in user, not to a session id.

Gradio's `session_hash` is chosen by the client; a user who learns another's (a shared
screen, a log) must not be able to stop their reply or replace what their page shows.
"""

from __future__ import annotations

import types

import gradio as gr
import pytest
from ui_helpers import add_people, request_as

from agent.chat import ChatAgent
from feedback_ui.arena import ArenaHandlers
from feedback_ui.auth import Access
from feedback_ui.chat import ChatHandlers, empty_state
from feedback_ui.common import UIContext

GREEDY = (0.0, 1.0, 200, 1.0)  # temperature, top_p, max_new_tokens, repetition_penalty


@pytest.fixture
def ctx(sqlite_store, sqlite_settings, deployed_tiny):
    add_people(sqlite_store)
    agent = ChatAgent(sqlite_store, sqlite_settings, device="cpu")
    return UIContext(sqlite_store, sqlite_settings, Access(sqlite_store, auth=True), agent)


def reply_tokens(h: ChatHandlers, request, interrupt=None) -> int:
    """Completion tokens of a greedy reply to "go on", calling `interrupt` once it streams."""
    stream = h.send(empty_state(), "go on", "", *GREEDY, request)
    next(stream)
    next(stream)  # generation started
    if interrupt is not None:
        interrupt()
    state = list(stream)[-1][0]
    return h.ctx.store.get_message(state["path"][1]).completion_tokens


def test_another_login_cannot_stop_my_reply(ctx) -> None:
    h = ChatHandlers(ctx)
    alice = request_as("alice")
    full = reply_tokens(h, alice)
    assert full > 5  # long enough that a stop after the first tokens would show
    carol = types.SimpleNamespace(username="carol", session_hash=alice.session_hash)

    def carol_stops() -> None:
        with pytest.raises(gr.Error, match="another login"):
            h.stop(carol)

    assert reply_tokens(h, alice, carol_stops) == full
    # Alice herself still can.
    assert reply_tokens(h, alice, lambda: h.stop(alice)) < full


def test_another_login_cannot_replace_my_page_state(ctx) -> None:
    h = ChatHandlers(ctx)
    alice = request_as("alice")
    h.conversations(alice)  # alice's page opened this session
    carol = types.SimpleNamespace(username="carol", session_hash=alice.session_hash)
    for event in (
        lambda: h.new_conversation(carol),
        lambda: h.open_conversation(None, carol),
        lambda: h.conversations(carol),
    ):
        with pytest.raises(gr.Error, match="another login"):
            event()
    assert h.new_conversation(alice)[0] == empty_state()


def test_arena_stop_is_keyed_on_the_user_too(ctx) -> None:
    h = ArenaHandlers(ctx)
    alice = request_as("alice")
    h.ctx.caller(alice, "user", "using the arena")
    carol = types.SimpleNamespace(username="carol", session_hash=alice.session_hash)
    with pytest.raises(gr.Error, match="another login"):
        h.stop(carol)
