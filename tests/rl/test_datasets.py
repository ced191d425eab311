"""Datasets from the feedback log: snapshot, by-conversation split, SFT rows, preference pairs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from synthetic import fill_synthetic_feedback

from agent.config import Settings
from agent.errors import ValidationError
from agent.store.api import Store
from agent.store.models import Conversation, utcnow
from agent.store.splits import SplitFractions, assign_splits
from rl.datasets import (
    PreferenceOptions,
    SFTDataOptions,
    build_preference_data,
    build_sft_data,
    check_sources,
    load_snapshot,
    normalised_ratings,
    rating_scores,
    read_sft_jsonl,
)
from rl.env import db_prompts
from rl.runs import training_run

FOUR_WAY = SplitFractions(train=0.4, validation=0.2, judge=0.2, test=0.2)


def split_all(store: Store, fractions: SplitFractions = FOUR_WAY) -> dict[int, str]:
    """Store a split for every conversation now, with fractions that suit a small test DB."""
    with store.reading() as s:
        ids = list(s.scalars(select(Conversation.id)))
    return assign_splits(store, ids, fractions)


def test_every_dataset_follows_the_stored_split(store: Store) -> None:
    fill_synthetic_feedback(store, 40, seed=2, replies_per_turn=3)
    splits = split_all(store)
    assert set(splits.values()) == {"train", "validation", "judge", "test"}
    snap = load_snapshot(store, utcnow())
    conv_of = {m.id: m.conversation_id for m in snap.messages.values()}
    sft = build_sft_data(snap, SFTDataOptions())
    assert {splits[conv_of[i]] for i in sft.train_ids} == {"train"}
    assert {splits[conv_of[i]] for i in sft.heldout_ids} == {"validation"}
    for train_split in ("train", "judge"):
        prefs = build_preference_data(snap, PreferenceOptions(train_split=train_split))
        for group, want in (
            (prefs.train_pairs, train_split),
            (prefs.heldout_pairs, "validation"),
            (prefs.test_pairs, "test"),
        ):
            assert group and {splits[p.conversation_id] for p in group} == {want}
        assert any("another stage's data" in reason for reason in prefs.summary.dropped)


def test_sft_rows_are_well_rated_replies_with_their_context(store: Store) -> None:
    info = fill_synthetic_feedback(store, 16, seed=1)
    snap = load_snapshot(store, utcnow())
    data = build_sft_data(snap, SFTDataOptions())
    ids = data.train_ids + data.heldout_ids
    assert ids and set(ids) <= set(info["good"])
    for row in data.train + data.heldout:
        assert row["prompt"][0]["role"] == "system" and row["prompt"][-1]["role"] == "user"
        assert [m["role"] for m in row["completion"]] == ["assistant"]
        assert "?" in row["completion"][0]["content"]
    assert data.summary.dropped["rated badly"] > 0
    assert "kept" in data.summary.format() and "rated badly" in data.summary.format()


def test_no_heldout_conversation_in_training_data(store: Store) -> None:
    fill_synthetic_feedback(store, 30, seed=2, replies_per_turn=3)
    split_all(store)
    snap = load_snapshot(store, utcnow())
    conv_of = {m.id: m.conversation_id for m in snap.messages.values()}
    sft = build_sft_data(snap, SFTDataOptions())
    prefs = build_preference_data(snap, PreferenceOptions())
    for heldout_convs, train_ids, heldout_ids in (
        (sft.heldout_conversations, sft.train_ids, sft.heldout_ids),
        (
            prefs.heldout_conversations,
            [i for p in prefs.train_pairs for i in (p.chosen_id, p.rejected_id)],
            [i for p in prefs.heldout_pairs for i in (p.chosen_id, p.rejected_id)],
        ),
    ):
        assert heldout_ids and train_ids
        assert not {conv_of[i] for i in train_ids} & set(heldout_convs)
        assert {conv_of[i] for i in heldout_ids} <= set(heldout_convs)


def test_preference_pairs_follow_the_raters_and_are_deduplicated(store: Store) -> None:
    info = fill_synthetic_feedback(store, 20, seed=3, replies_per_turn=3)
    snap = load_snapshot(store, utcnow())
    data = build_preference_data(snap, PreferenceOptions())
    pairs = data.train_pairs + data.heldout_pairs + data.test_pairs
    assert {p.chosen_id for p in pairs} <= set(info["good"])
    assert {p.rejected_id for p in pairs} <= set(info["bad"])
    keys = [frozenset((p.chosen_id, p.rejected_id)) for p in pairs]
    assert len(keys) == len(set(keys))
    assert any("same replies as a comparison pair" in r for r in data.summary.dropped)
    row = data.train[0]
    assert set(row) == {"prompt", "chosen", "rejected", "margin"}
    assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
    ids = data.data_ids()
    assert ids["comparisons"] and ids["heldout_conversations"] == data.heldout_conversations


def test_rating_derived_pairs_get_margins_from_the_score_gap(store: Store) -> None:
    info = fill_synthetic_feedback(store, 20, seed=4, compare=False, p_thumb=1.0, p_likert=1.0)
    snap = load_snapshot(store, utcnow())
    options = PreferenceOptions(use_comparisons=False, margin_scale=0.5)
    data = build_preference_data(snap, options)
    pairs = data.train_pairs + data.heldout_pairs + data.test_pairs
    assert pairs and all(p.source == "ratings" for p in pairs)
    assert {p.chosen_id for p in pairs} <= set(info["good"])
    scores = rating_scores(snap, options)
    for p in pairs:
        gap = scores[p.chosen_id][0] - scores[p.rejected_id][0]
        assert p.margin == pytest.approx(0.5 * gap) and gap >= options.min_rating_gap


def test_rater_normalisation_removes_a_raters_constant_bias(store: Store) -> None:
    rater = store.get_or_create_user("always-five", "annotator").id
    user = store.get_or_create_user("someone").id
    conv = store.create_conversation(user, "")
    ask = store.append_message(conv, "user", "hi")
    replies = [store.append_message(conv, "assistant", f"reply {i}", ask) for i in range(4)]
    for mid in replies:
        store.set_rating(mid, rater, "likert", 5, criterion="helpfulness")
    snap = load_snapshot(store, utcnow())
    normalised = rating_scores(snap, PreferenceOptions(normalize_raters=True))
    raw = rating_scores(snap, PreferenceOptions(normalize_raters=False))
    assert {normalised[m][0] for m in replies} == {0.0}
    assert {raw[m][0] for m in replies} == {1.0}


def test_a_reply_whose_raters_disagree_can_be_left_out_of_rating_pairs(store: Store) -> None:
    """One flipped rating (1 beside 5) turns a reply that ties its sibling into a pair; with
    max_rater_spread the reply is left out, as a comparison whose raters disagree is."""
    raters = [store.get_or_create_user(f"annotator-{i}", "annotator").id for i in range(2)]
    user = store.get_or_create_user("someone").id
    disputed, kept_ids = [], set()
    for i in range(6):
        conv = store.create_conversation(user, "")
        ask = store.append_message(conv, "user", f"hi {i}")
        good, bad, split = (
            store.append_message(conv, "assistant", f"{kind} reply {i}", ask)
            for kind in ("good", "bad", "disputed")
        )
        for rater in raters:
            store.set_rating(good, rater, "likert", 5, criterion="helpfulness")
            store.set_rating(bad, rater, "likert", 1, criterion="helpfulness")
        store.set_rating(split, raters[0], "likert", 1, criterion="helpfulness")
        store.set_rating(split, raters[1], "likert", 5, criterion="helpfulness")
        disputed.append(split)
        kept_ids |= {good, bad}
    split_all(store, SplitFractions(train=1.0, validation=0.0, judge=0.0, test=0.0))
    snap = load_snapshot(store, utcnow())

    def replies(data: object) -> set[int]:
        pairs = data.train_pairs + data.heldout_pairs + data.test_pairs  # type: ignore[attr-defined]
        return {m for p in pairs for m in (p.chosen_id, p.rejected_id)}

    everyone = build_preference_data(snap, PreferenceOptions())
    assert set(disputed) <= replies(everyone)
    agreed = build_preference_data(snap, PreferenceOptions(max_rater_spread=1.0))
    assert replies(agreed) == kept_ids
    assert agreed.summary.dropped["ratings: raters of a reply disagree (max_rater_spread)"] == 6
    with pytest.raises(ValidationError, match="max_rater_spread"):
        PreferenceOptions(max_rater_spread=-1)


def test_ties_are_dropped_or_trained_both_ways(store: Store) -> None:
    fill_synthetic_feedback(store, 30, seed=5, replies_per_turn=3, p_thumb=0, p_likert=0)
    snap = load_snapshot(store, utcnow())
    dropped = build_preference_data(snap, PreferenceOptions(ties="drop", both_bad="drop"))
    kept = build_preference_data(snap, PreferenceOptions(ties="equal", both_bad="equal"))
    assert not any(p.source == "tie" for p in dropped.train_pairs)
    assert any("ties (dropped by config)" in r for r in dropped.summary.dropped)
    ties = [p for p in kept.train_pairs if p.source == "tie"]
    assert ties and all(p.margin == 0 for p in ties)
    assert Counter(frozenset((p.chosen_id, p.rejected_id)) for p in ties).most_common(1)[0][1] == 2
    assert not any(p.source == "tie" for p in kept.heldout_pairs)


def test_snapshot_excludes_rows_after_the_cutoff(store: Store) -> None:
    fill_synthetic_feedback(store, 4, seed=6)
    cutoff = utcnow()
    before = load_snapshot(store, cutoff)
    fill_synthetic_feedback(store, 4, seed=7)
    again = load_snapshot(store, cutoff)
    assert again.messages.keys() == before.messages.keys()
    assert [r.id for r in again.ratings] == [r.id for r in before.ratings]
    assert len(load_snapshot(store, utcnow()).conversations) == 8


def test_extra_jsonl_rows_join_the_training_set(store: Store, tmp_path: Path) -> None:
    fill_synthetic_feedback(store, 6, seed=8)
    path = tmp_path / "extra.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey?"}]},
        {
            "prompt": [{"role": "user", "content": "yo"}],
            "completion": [{"role": "assistant", "content": "hi!"}],
        },
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    snap = load_snapshot(store, utcnow())
    plain = build_sft_data(snap, SFTDataOptions())
    data = build_sft_data(snap, SFTDataOptions(extra_jsonl=str(path)))
    assert len(data.train) == len(plain.train) + 2
    assert data.train[-2]["prompt"] == [{"role": "user", "content": "hi"}]
    assert data.summary.kept["extra (train)"] == 2


def test_bad_extra_jsonl_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ValidationError, match="line 1"):
        read_sft_jsonl(path)
    with pytest.raises(ValidationError, match="does not exist"):
        read_sft_jsonl(tmp_path / "missing.jsonl")


# ---- feedback in one unit ----------------------------------------------------------------


def _siblings(store: Store, n: int = 2) -> tuple[int, list[int]]:
    user = store.get_or_create_user("someone").id
    conv = store.create_conversation(user, "")
    ask = store.append_message(conv, "user", "hi")
    replies = [store.append_message(conv, "assistant", f"reply {i}", ask) for i in range(n)]
    train_only = SplitFractions(train=1, validation=0, judge=0, test=0)
    assign_splits(store, [conv], train_only)
    return conv, replies


def test_a_both_bad_reply_is_never_an_sft_target(store: Store) -> None:
    _, (x, y) = _siblings(store)
    fan = store.get_or_create_user("fan", "annotator").id
    critic = store.get_or_create_user("critic", "annotator").id
    store.set_rating(x, fan, "thumb", 1)
    store.set_rating(y, fan, "thumb", -1)
    store.add_comparison(critic, x, y, "both_bad")
    data = build_sft_data(load_snapshot(store, utcnow()), SFTDataOptions())
    assert x not in data.train_ids
    assert data.summary.dropped["conflicting feedback"] == 1


def test_a_raters_vote_counts_once_whichever_order_the_pair_was_shown(store: Store) -> None:
    _, (x, y) = _siblings(store)
    twice = store.get_or_create_user("twice", "annotator").id
    other = store.get_or_create_user("other", "annotator").id
    store.add_comparison(twice, x, y, "a")  # x wins...
    store.add_comparison(twice, y, x, "b")  # ...and x wins again, shown the other way round
    store.add_comparison(other, x, y, "b")  # y wins
    snap = load_snapshot(store, utcnow())
    data = build_preference_data(snap, PreferenceOptions(use_ratings=False))
    assert not data.train_pairs  # one vote each: the raters disagree
    assert data.summary.dropped["comparison: raters disagree"] == 1
    assert x not in build_sft_data(snap, SFTDataOptions()).train_ids


def test_sft_and_preferences_read_ratings_in_the_same_normalised_unit(store: Store) -> None:
    """A rater who gives every reply 5 says nothing about which is better: not to the reward
    model (z-scores), and now not to SFT either (it used the raw mean >= 4)."""
    _, replies = _siblings(store, 4)
    generous = store.get_or_create_user("generous", "annotator").id
    for mid in replies:
        store.set_rating(mid, generous, "likert", 5, criterion="helpfulness")
    snap = load_snapshot(store, utcnow())
    assert build_sft_data(snap, SFTDataOptions()).train_ids == []
    assert {s for s, _ in rating_scores(snap, PreferenceOptions()).values()} == {0.0}


def test_thumbs_of_a_rater_with_few_thumbs_are_normalised_too(store: Store) -> None:
    _, replies = _siblings(store, 4)
    busy = store.get_or_create_user("busy", "annotator").id
    rare = store.get_or_create_user("rare", "annotator").id
    for mid, value in zip(replies, (1, 1, 1, -1), strict=True):
        store.set_rating(mid, busy, "thumb", value)
    store.set_rating(replies[0], rare, "thumb", 1)  # one thumb: below min_rater_ratings
    scores = normalised_ratings(load_snapshot(store, utcnow()))
    rare_score = next(v for r, v in scores.items() if store.ratings(rater_id=rare)[0].id == r)
    assert rare_score != 1.0  # not raw +1 beside z-scores
    assert rare_score == pytest.approx((1 - 0.6) / np.std([1, 1, 1, -1, 1]))


def test_rating_margins_are_bounded(store: Store) -> None:
    _, replies = _siblings(store, 3)
    rater = store.get_or_create_user("r", "annotator").id
    for mid, value in zip(replies, (5, 1, 1), strict=True):
        store.set_rating(mid, rater, "likert", value, criterion="helpfulness")
    options = PreferenceOptions(use_comparisons=False, margin_scale=1.0, max_gap=1.0)
    data = build_preference_data(load_snapshot(store, utcnow()), options)
    assert data.train_pairs and max(p.margin for p in data.train_pairs) == 1.0


# ---- provenance --------------------------------------------------------------------------


def test_training_on_mixed_real_and_simulated_feedback_requires_choosing(store: Store) -> None:
    user = store.get_or_create_user("u").id
    real = store.create_conversation(user, "", source="chat")
    sim = store.create_conversation(user, "", source="simulated")
    for conv in (real, sim):
        store.append_message(conv, "user", f"hello from {conv}")
    snap = load_snapshot(store, utcnow())
    with pytest.raises(ValidationError, match="choose which to train on"):
        check_sources(snap, [])
    only_sim = load_snapshot(store, utcnow(), sources=["simulated"])
    assert set(only_sim.conversations) == {sim}
    check_sources(only_sim, ["simulated"])
    with pytest.raises(ValidationError, match="choose"):
        db_prompts(store, None, sources=[])
    assert [p.conversation_id for p in db_prompts(store, None, sources=["chat"])] == [real]
    assert len(db_prompts(store, None)) == 2  # evaluation: every source
    with pytest.raises(ValidationError, match="sources"):
        load_snapshot(store, utcnow(), sources=["telepathy"])


def test_a_resumed_job_reads_the_values_of_its_first_start(
    store: Store, settings: Settings
) -> None:
    _, (x, y) = _siblings(store)
    rater = store.get_or_create_user("r", "annotator").id
    store.set_rating(x, rater, "thumb", 1)
    store.add_comparison(rater, x, y, "a")
    config = {"sources": []}
    with training_run(store, settings, "sft", config) as run:
        first = run.snapshot([])
    store.update_run(run.id, status="failed")
    store.set_rating(x, rater, "thumb", -1)  # edited after the cut-off
    store.add_comparison(rater, x, y, "b")
    with training_run(store, settings, "sft", config, resume=True) as resumed:
        assert resumed.id == run.id
        again = resumed.snapshot([])
    assert [(r.id, r.value) for r in again.ratings] == [(r.id, r.value) for r in first.ratings]
    assert [c.choice for c in again.comparisons] == ["a"]
    assert load_snapshot(store, utcnow()).ratings[0].value == -1  # the live row did change
