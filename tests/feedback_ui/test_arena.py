"""Arena tab handlers on the tiny model: a deployed base against an SFT candidate (a LoRA)."""

from __future__ import annotations

import re
import types

import gradio as gr
import pytest
from ui_helpers import add_people, make_adapter, request_as

from agent.chat import ChatAgent
from agent.registry import ModelRegistry
from feedback_ui.arena import ArenaHandlers, assign_sides, empty_state
from feedback_ui.auth import Access
from feedback_ui.common import UIContext

BASE_NAME, CANDIDATE_NAME = "xyzzy-base", "plugh-candidate"
SETTINGS = (0.8, 6)  # temperature, max_new_tokens


@pytest.fixture
def arena(sqlite_store, sqlite_settings, tiny_model_dir, tmp_path):
    registry = ModelRegistry(sqlite_store, sqlite_settings)
    base = registry.add("base", tiny_model_dir, name=BASE_NAME)
    registry.deploy(base)
    people = add_people(sqlite_store)
    agent = ChatAgent(sqlite_store, sqlite_settings, device="cpu")
    ctx = UIContext(sqlite_store, sqlite_settings, Access(sqlite_store, auth=True), agent)
    return types.SimpleNamespace(
        h=ArenaHandlers(ctx, seed=0),
        store=sqlite_store,
        registry=registry,
        people=people,
        base=base,
        adapter=lambda: make_adapter(tiny_model_dir, tmp_path / "sft", seed=1),
    )


@pytest.fixture
def with_candidate(arena):
    arena.candidate = arena.registry.add(
        "sft", arena.adapter(), parent_id=arena.base, name=CANDIDATE_NAME
    )
    return arena


def send(h, state, text, name="alice", picks=(None, None)) -> list[tuple]:
    return list(h.send(state, text, *picks, *SETTINGS, request_as(name)))


def test_sides_are_a_fair_coin_drawn_from_the_seed() -> None:
    sides = [assign_sides((1, 2), seed) for seed in range(400)]
    assert set(sides) == {(1, 2), (2, 1)}
    assert 160 < sides.count((1, 2)) < 240  # ~ Binomial(400, 1/2): mean 200, sd 10
    assert [assign_sides((1, 2), seed) for seed in range(400)] == sides


def test_a_vote_is_one_comparison_tied_to_both_versions(with_candidate) -> None:
    a = with_candidate
    outputs = send(a.h, empty_state(), "hello there")
    assert len(outputs) >= 4 and outputs[0][4] == ""  # streamed; the textbox cleared at once
    for out in outputs:  # everything but the state, which Gradio keeps on the server
        assert BASE_NAME not in str(out[1:]) and CANDIDATE_NAME not in str(out[1:])
        assert not re.search(r"\bv\d+\b|sft|base|deployed|candidate", out[3])  # the info line
    state, reply_a, reply_b, info, _, votes = outputs[-1]
    assert votes["visible"] and "Vote" in info
    turn = state["turn"]
    first, second = a.store.get_message(turn["a"]), a.store.get_message(turn["b"])
    assert first.parent_id == second.parent_id  # siblings under the same user message
    assert {first.model_version_id, second.model_version_id} == {a.base, a.candidate}
    assert reply_a[-1]["content"] == first.content and reply_b[-1]["content"] == second.content
    assert reply_a[0] == reply_b[0] == {"role": "user", "content": "hello there"}
    assert a.store.get_conversation(state["conversation_id"]).source == "arena"
    assert first.sampling["seed"] == second.sampling["seed"] == turn["seed"]

    state, reveal = a.h.vote("a")(state, request_as("alice"))
    [cmp] = a.store.comparisons()
    assert (cmp.rater_id, cmp.message_a_id, cmp.message_b_id) == (
        a.people.alice,
        first.id,
        second.id,
    )
    assert cmp.choice == "a"
    names = {a.base: BASE_NAME, a.candidate: CANDIDATE_NAME}
    assert reveal.index(names[first.model_version_id]) < reveal.index(
        names[second.model_version_id]
    )
    assert f"v{first.model_version_id}" in reveal and "(deployed)" in reveal
    state, _ = a.h.vote("b")(state, request_as("alice"))  # a second vote changes the first
    [cmp] = a.store.comparisons()
    assert cmp.choice == "b"

    # The next message continues from the preferred reply, B, with a fresh pair of replies.
    state = send(a.h, state, "tell me more")[-1][0]
    user_msg = a.store.get_message(a.store.get_message(state["turn"]["a"]).parent_id)
    assert user_msg.parent_id == second.id and user_msg.content == "tell me more"


def test_callers_without_a_role_are_refused(with_candidate) -> None:
    a = with_candidate
    for name, error in ((None, "not logged in"), ("mallory", "no longer exists")):
        with pytest.raises(gr.Error, match=error):
            send(a.h, empty_state(), "hi", name=name)
        with pytest.raises(gr.Error, match=error):
            a.h.vote("a")({"conversation_id": None, "turn": None}, request_as(name))
        with pytest.raises(gr.Error, match=error):
            a.h.load(request_as(name))
    assert a.store.counts()["messages"] == 0 and a.store.counts()["conversations"] == 0
    state = send(a.h, empty_state(), "mine")[-1][0]
    with pytest.raises(gr.Error, match="belongs to another user"):
        a.h.vote("a")(state, request_as("carol"))
    with pytest.raises(gr.Error, match="belongs to another user"):
        send(a.h, state, "hijack", name="carol")
    assert a.store.comparisons() == []


def test_only_admins_pick_the_versions(with_candidate) -> None:
    a = with_candidate
    with pytest.raises(gr.Error, match="needs the admin role"):
        send(a.h, empty_state(), "hi", picks=(a.base, a.candidate))
    with pytest.raises(gr.Error, match="two different"):
        send(a.h, empty_state(), "hi", name="root", picks=(a.base, a.base))
    with pytest.raises(gr.Error, match="pick both"):
        send(a.h, empty_state(), "hi", name="root", picks=(a.base, None))
    assert a.store.counts()["messages"] == 0
    info, box, pick, _ = a.h.load(request_as("root"))
    assert box["visible"] and [v for _, v in pick["choices"]] == [a.candidate, a.base]
    assert not a.h.load(request_as("alice"))[1]["visible"]
    state = send(a.h, empty_state(), "hi", name="root", picks=(a.candidate, a.base))[-1][0]
    assert set(state["turn"]["versions"].values()) == {a.base, a.candidate}


def test_without_a_candidate_the_tab_says_to_train_one(arena) -> None:
    info, *_ = arena.h.load(request_as("alice"))
    assert "No candidate" in info and "rlchat train sft" in info
    with pytest.raises(gr.Error, match="No candidate.*rlchat train sft"):
        send(arena.h, empty_state(), "hi")
    assert arena.store.counts()["messages"] == 0
    with pytest.raises(gr.Error, match="no two replies"):
        arena.h.vote("tie")(empty_state(), request_as("alice"))
