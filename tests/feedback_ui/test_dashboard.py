"""Dashboard handlers and the statistics behind them."""

from __future__ import annotations

import gradio as gr
import numpy as np
import pytest
from ui_helpers import request_as, seed_chat

from feedback_ui import stats
from feedback_ui.dashboard import DashboardHandlers


def fake_model_dir(tmp_path, name: str):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


@pytest.fixture
def feedback(store, people):
    """Two replies by two versions, thumbs and Likert ratings from two annotators."""
    v1 = store.register_model_version("base", "/m/1", name="first")
    v2 = store.register_model_version("base", "/m/2", name="second")
    r1 = seed_chat(store, people.alice)[0]
    r2 = seed_chat(store, people.carol)[0]
    with store.transaction() as s:
        from agent.store.models import Message

        s.get(Message, r1).model_version_id = v1
        s.get(Message, r2).model_version_id = v2
    store.set_rating(r1, people.alice, "thumb", 1)
    store.set_rating(r2, people.carol, "thumb", -1)
    for rater, scores in ((people.ann, (4, 2)), (people.bob, (4, 3))):
        for reply, score in zip((r1, r2), scores, strict=True):
            store.set_rating(reply, rater, "likert", score, criterion="helpfulness")
    return v1, v2, r1, r2


def test_stats(store, people, feedback) -> None:
    per_day = stats.counts_per_day(store)
    assert dict(zip(per_day["kind"], per_day["count"], strict=True)) == {
        "conversations": 2,
        "messages": 4,
        "ratings": 6,
    }
    dist = stats.rating_distribution(store)
    thumbs = dist[dist["rating"] == "thumb"]
    assert sorted(zip(thumbs["version"], thumbs["value"], strict=True)) == [
        ("v1 first", "up"),
        ("v2 second", "down"),
    ]
    alpha = stats.agreement(store).iloc[0]
    # units {r1: [4, 4], r2: [2, 3]}: n2=n3=1, n4=2, n=4; ordinal delta^2(2,3)=1, (2,4)=6.25,
    # (3,4)=2.25; D_o = 2/4, D_e = 2*(1 + 2*6.25 + 2*2.25)/12 = 3; alpha = 1 - 0.5/3 = 5/6
    assert (alpha["criterion"], alpha["items"], alpha["ratings"]) == ("helpfulness", 2, 4)
    assert alpha["alpha"] == pytest.approx(5 / 6, abs=1e-3)
    tp = stats.throughput(store).set_index("rater")
    assert tp.loc["ann", "items rated"] == 2 and tp.loc["alice", "items rated"] == 1


def test_refresh_is_for_admins_only(store, people, ctx, feedback) -> None:
    h = DashboardHandlers(ctx)
    summary, *tables = h.refresh(request_as("root"))
    assert "**ratings**: 6" in summary and "Serving: **nothing**" in summary
    versions = tables[-2]
    assert list(versions["name"]) == ["second", "first"]
    for name in ("alice", "ann"):
        with pytest.raises(gr.Error, match="needs the admin role"):
            h.refresh(request_as(name))


def test_deploy_and_rollback(store, people, ctx, tmp_path) -> None:
    h = DashboardHandlers(ctx)
    first = h.registry.add("base", fake_model_dir(tmp_path, "a"), name="a")
    second = h.registry.add("base", fake_model_dir(tmp_path, "b"), name="b")
    with pytest.raises(gr.Error, match="needs the admin role"):
        h.deploy(first, request_as("ann"))
    assert store.deployed_version() is None
    message, summary, *_ = h.deploy(first, request_as("root"))
    assert f"deployed version {first}" in message and f"Serving: **v{first}" in summary
    h.deploy(second, request_as("root"))
    with pytest.raises(gr.Error, match="needs the admin role"):
        h.rollback(request_as("bob"))
    assert store.deployed_version().id == second
    message, *_ = h.rollback(request_as("root"))
    assert store.deployed_version().id == first and f"rolled back to version {first}" in message
    with pytest.raises(gr.Error, match="no model version with id 99"):
        h.deploy(99, request_as("root"))
    with pytest.raises(gr.Error, match="version id"):
        h.deploy(None, request_as("root"))


def test_arena_tables_count_comparisons_between_two_versions(store, people, ctx) -> None:
    base = store.register_model_version("base", "/m/1", name="tiny")
    sft = store.register_model_version("sft", "/m/2", name="cand", parent_id=base)
    conv = store.create_conversation(people.alice, "")
    votes = [("a", people.alice), ("a", people.ann), ("tie", people.bob), ("both_bad", people.root)]
    for choice, rater in votes:  # the base wins two, two are ties: 3 of 4
        user = store.append_message(conv, "user", f"hi from {rater}")
        r_base = store.append_message(conv, "assistant", "x", user, model_version_id=base)
        r_sft = store.append_message(conv, "assistant", "y", user, model_version_id=sft)
        store.add_comparison(rater, r_base, r_sft, choice)
    # Two replies of one version, and a reply without a version: not arena games.
    user = store.append_message(conv, "user", "same version")
    same = [store.append_message(conv, "assistant", t, user, model_version_id=sft) for t in "pq"]
    store.add_comparison(people.alice, *same, "a")
    unknown = store.append_message(conv, "assistant", "r", user)
    store.add_comparison(people.alice, same[0], unknown, "b")

    assert sorted(stats.arena_games(store)) == [(base, sft, 0.5)] * 2 + [(base, sft, 1.0)] * 2
    assert len(stats.arena_games(store, both_bad="exclude")) == 3
    pairs, table, anchor = stats.arena(store, n_boot=200)
    assert anchor == base
    [row] = pairs.to_dict("records")
    assert (row["version A"], row["version B"]) == ("v1 base tiny", "v2 sft cand")
    assert (row["games"], row["A wins"], row["ties"], row["A win-rate"]) == (4, 2, 2, 0.75)
    assert row["CI low"] <= 0.75 <= row["CI high"]
    # One virtual tie besides: 3.5 wins against 1.5.
    assert list(table["version"]) == ["v1 base tiny", "v2 sft cand"]
    assert table["rating"].tolist() == pytest.approx(
        [1000, 1000 - 400 * np.log10(3.5 / 1.5)], abs=0.1
    )

    *_, note, shown_pairs, shown_ratings, _, _ = DashboardHandlers(ctx).refresh(request_as("root"))
    assert "v1 = 1000" in note and len(shown_pairs) == 1 and len(shown_ratings) == 2
