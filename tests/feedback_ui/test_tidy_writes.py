"""Atomic, tidy writes from the UI (issue 15, item 5).

A Likert submit of several criteria is one transaction; a first turn that fails validation
leaves no empty conversation behind (chat and arena); an annotator's two tabs never get the
same queue item at once.
"""

from __future__ import annotations

import threading
import types

import gradio as gr
import pytest
from ui_helpers import add_people, make_adapter, request_as, seed_chat

from agent.chat import ChatAgent
from agent.registry import ModelRegistry
from agent.store.writes import Compiled
from feedback_ui import arena as arena_tab
from feedback_ui.annotate import AnnotateHandlers
from feedback_ui.auth import Access
from feedback_ui.chat import ChatHandlers, empty_state
from feedback_ui.common import UIContext

SAMPLING = (0.8, 0.95, 6, 1.1)  # temperature, top_p, max_new_tokens, repetition_penalty
TOO_MANY_TOKENS = "word " * 5000  # under the character limit, over the tiny model's context


def test_likert_submit_is_one_transaction(store, people, ctx, monkeypatch) -> None:
    """The database failing on the second criterion leaves the first one unwritten too."""
    reply = seed_chat(store, people.alice)[0]
    h = AnnotateHandlers(ctx)
    item = h.next_item(request_as("ann"))[0]
    inserts = []
    run = Compiled.rows  # the store's writes run pre-compiled on the DBAPI cursor

    def fail_second_rating(self: Compiled, cursor, params):  # type: ignore[no-untyped-def]
        if "INSERT INTO ratings" in self.sql:
            inserts.append(self.sql)
            if len(inserts) == 2:
                raise RuntimeError("disk full (simulated) on the second criterion")
        return run(self, cursor, params)

    with monkeypatch.context() as patched:
        patched.setattr(Compiled, "rows", fail_second_rating)
        # The handler shows the failure as a short "the server failed" message.
        with pytest.raises(Exception, match="RuntimeError"):
            h.submit(request_as("ann"), item, [], [], "", 4, 5)
    assert len(inserts) == 2  # the failure came on the second criterion's write
    assert store.ratings(message_id=reply) == []


def test_concurrent_double_submits_never_mix_criteria(store, people, ctx) -> None:
    """Two tabs submit different scores for the same items at once: each item ends up with
    one submit's scores on every criterion, never one from each."""
    replies = [seed_chat(store, people.alice, text=f"q{i}")[0] for i in range(12)]
    h = AnnotateHandlers(ctx)
    scores = {"tab1": (1, 1), "tab2": (5, 5)}
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def tab(name: str) -> None:
        try:
            for reply in replies:
                barrier.wait(timeout=60)
                h.submit(request_as("ann", name), reply, [], [], "", *scores[name])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=tab, args=(name,)) for name in scores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == []
    for reply in replies:
        values = {r.value for r in store.ratings(message_id=reply)}
        assert values in ({1.0}, {5.0}), f"reply {reply} mixes two submits: {values}"


def test_two_tabs_get_different_items(store, people, ctx) -> None:
    first, second = seed_chat(store, people.alice)[0], seed_chat(store, people.carol)[0]
    h = AnnotateHandlers(ctx)
    item1 = h.next_item(request_as("ann", "tab1"))[0]
    item2 = h.next_item(request_as("ann", "tab2"))[0]
    assert {item1, item2} == {first, second}
    assert h.next_item(request_as("ann", "tab3"))[0] is None  # both are on screen already


@pytest.fixture
def chat(sqlite_store, sqlite_settings, deployed_tiny):
    people = add_people(sqlite_store)
    agent = ChatAgent(sqlite_store, sqlite_settings, device="cpu")
    ctx = UIContext(sqlite_store, sqlite_settings, Access(sqlite_store, auth=True), agent)
    return types.SimpleNamespace(ctx=ctx, store=sqlite_store, people=people)


def test_chat_first_turn_refused_leaves_no_conversation(chat) -> None:
    h = ChatHandlers(chat.ctx)
    with pytest.raises(gr.Error, match="Shorten the message"):
        list(h.send(empty_state(), TOO_MANY_TOKENS, "be brief", *SAMPLING, request_as("alice")))
    assert chat.store.counts()["conversations"] == 0
    outputs = list(h.send(empty_state(), "hi", "be brief", *SAMPLING, request_as("alice")))
    state = outputs[-1][0]
    edit = types.SimpleNamespace(index=0, value=TOO_MANY_TOKENS)  # resend the first message
    with pytest.raises(gr.Error, match="Shorten the message"):
        list(h.edit(state, *SAMPLING, edit, request_as("alice")))
    assert [c.id for c in chat.store.list_conversations()] == [state["conversation_id"]]


def test_arena_first_turn_refused_leaves_no_conversation(chat, tiny_model_dir, tmp_path) -> None:
    registry = ModelRegistry(chat.store, chat.ctx.settings)
    adapter = make_adapter(tiny_model_dir, tmp_path / "sft", seed=1)
    registry.add("sft", adapter, parent_id=chat.store.deployed_version().id, name="candidate")
    h = arena_tab.ArenaHandlers(chat.ctx, seed=0)
    state, alice = arena_tab.empty_state(), request_as("alice")
    with pytest.raises(gr.Error, match="Shorten the message"):
        list(h.send(state, TOO_MANY_TOKENS, None, None, 0.8, 6, alice))
    assert chat.store.counts()["conversations"] == 0
