"""The built-in oracles, the two content ones above all: they read what a reply says."""

from __future__ import annotations

import pytest

from rl.oracles import BUILTIN, feelings, load_oracle, topic


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "be nice"}, {"role": "user", "content": text}]


def test_topic_rewards_picking_up_what_the_user_named() -> None:
    context = user("I spent the weekend fixing my grandfather's boat.")
    assert topic(context, "Fixing a boat sounds hard! Was it your grandfather's?") == 1.0
    assert topic(context, "A boat, nice.") == pytest.approx(0.5)
    assert topic(context, "That sounds lovely, tell me more!") == 0.0  # polite, generic
    assert topic(context, "") == 0.0
    assert topic(user("hi"), "hello there") == 0.5  # nothing named, nothing to pick up


def test_feelings_rewards_asking_how_the_user_feels() -> None:
    assert feelings(user("My exam is tomorrow."), "Good luck. How do you feel about it?") == 1.0
    assert feelings(user("My exam is tomorrow."), "Are you nervous?") == 1.0
    assert feelings(user("x"), "I feel great today.") == 0.5  # names a feeling, asks nothing
    assert feelings(user("x"), "What time is the exam?") == 0.0  # a question, not about feelings
    assert feelings(user("x"), "") == 0.0


def test_every_builtin_loads_by_name_and_scores_in_range() -> None:
    for name in BUILTIN:
        _, oracle = load_oracle(name)
        for reply in ("", "ok", "How do you feel about your garden?", "word " * 50):
            assert 0.0 <= oracle(user("I love my garden"), reply) <= 1.0
