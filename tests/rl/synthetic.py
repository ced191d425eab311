"""A synthetic feedback database whose raters follow a learnable rule (an oracle).

    info = fill_synthetic_feedback(store, n_conversations=40, seed=0)
    info["good"], info["bad"]            # assistant message ids the oracle likes / dislikes

Every user turn gets sibling replies (regenerations), at least one the rule likes and one it
does not, of similar length, so only the rule separates them. The default rule,
`asks_question`, prefers replies that ask the user something back ("...?"). Feedback goes
through the same `Store` calls as the UI: the conversation's owner gives thumbs, two
annotators give Likert scores (the second one harsher by one point, to exercise rater
normalisation) and one annotator compares sibling pairs (a / b / tie / both_bad). Each rater
who takes part in a turn rates all its siblings, so equally good siblings score the same.
Import it from tests under tests/rl as `from synthetic import fill_synthetic_feedback`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from agent.store.api import Store

TOPICS = ["the weekend", "my dog", "a new recipe", "the football game", "my garden", "a movie"]
USER_LINES = [
    "I spent {t} doing something fun.",
    "Let me tell you about {t}.",
    "What do you think about {t}?",
    "I keep thinking about {t}.",
    "Today was all about {t}.",
]
STATEMENTS = [
    "That sounds really nice.",
    "I like hearing about that.",
    "That is a lovely thing to share.",
    "Sounds like a good time.",
    "That must have been great.",
    "I can picture it well.",
]
QUESTIONS = [
    "What did you like most?",
    "How did it go?",
    "Who was with you?",
    "What happens next?",
    "Why do you enjoy it?",
    "Where did you go?",
]
CLOSERS = [
    "I like it a lot.",
    "It was good to hear.",
    "That is all from me.",
    "Have a good day.",
    "It was quite fun.",
    "Thanks for saying so.",
]


def asks_question(reply: str) -> float:
    """The default oracle: 1.0 when the reply asks something back, else 0.0."""
    return 1.0 if "?" in reply else 0.0


def make_reply(rng: random.Random, good: bool) -> str:
    """A reply of two sentences; the second is a question when `good`."""
    return f"{rng.choice(STATEMENTS)} {rng.choice(QUESTIONS if good else CLOSERS)}"


def fill_synthetic_feedback(
    store: Store,
    n_conversations: int = 40,
    *,
    seed: int = 0,
    rule: Callable[[str], float] = asks_question,
    replies_per_turn: int = 2,
    max_turns: int = 2,
    noise: float = 0.0,
    p_thumb: float = 0.6,
    p_likert: float = 0.6,
    compare: bool = True,
) -> dict[str, Any]:
    """Fill `store` with conversations, sibling replies, thumbs, Likert scores and comparisons.

    Labels come from `rule(reply) >= 0.5`; `noise` is the chance that any one judgement is
    flipped. Returns the ids: users, annotators, conversations, good and bad replies, and
    counts of ratings and comparisons.
    """
    rng = random.Random(seed)
    users = [store.get_or_create_user(f"synth-user-{i}").id for i in range(3)]
    annotators = [
        store.get_or_create_user(f"synth-annotator-{i}", "annotator").id for i in range(2)
    ]
    info: dict[str, Any] = {
        "users": users,
        "annotators": annotators,
        "conversations": [],
        "good": [],
        "bad": [],
        "ratings": 0,
        "comparisons": 0,
    }
    for n in range(n_conversations):
        conv = store.create_conversation(
            users[n % len(users)],
            system_prompt="You are a friendly, helpful assistant.",
            source="simulated",
        )
        info["conversations"].append(conv)
        parent = None
        for _ in range(rng.randint(1, max_turns)):
            text = rng.choice(USER_LINES).format(t=rng.choice(TOPICS))
            user_msg = store.append_message(conv, "user", text, parent)
            replies = _add_replies(store, rng, conv, user_msg, replies_per_turn, rule, info)
            _add_feedback(
                store,
                rng,
                users[n % len(users)],
                annotators,
                replies,
                noise,
                p_thumb,
                p_likert,
                info,
            )
            if compare:
                _add_comparisons(store, rng, annotators[0], replies, noise, info)
            parent = rng.choice(replies)[0]
    return info


def _add_replies(
    store: Store,
    rng: random.Random,
    conv: int,
    parent: int,
    k: int,
    rule: Callable[[str], float],
    info: dict[str, Any],
) -> list[tuple[int, bool]]:
    """`k` sibling replies (at least one good and one bad when k >= 2), in random order."""
    wanted = [True, False] + [rng.random() < 0.5 for _ in range(k - 2)]
    rng.shuffle(wanted)
    replies = []
    for good in wanted[:k]:
        text = make_reply(rng, good)
        label = rule(text) >= 0.5
        mid = store.append_message(conv, "assistant", text, parent)
        info["good" if label else "bad"].append(mid)
        replies.append((mid, label))
    return replies


def _add_feedback(
    store: Store,
    rng: random.Random,
    owner: int,
    annotators: list[int],
    replies: list[tuple[int, bool]],
    noise: float,
    p_thumb: float,
    p_likert: float,
    info: dict[str, Any],
) -> None:
    """Each rater who takes part rates every sibling, so equally good siblings tie."""
    if rng.random() < p_thumb:
        for mid, good in replies:
            seen = good != (rng.random() < noise)
            store.set_rating(mid, owner, "thumb", 1 if seen else -1)
            info["ratings"] += 1
    for harshness, annotator in enumerate(annotators):
        if rng.random() < p_likert:
            for mid, good in replies:
                seen = good != (rng.random() < noise)
                score = (5 if seen else 2) - harshness
                store.set_rating(mid, annotator, "likert", score, criterion="helpfulness")
                info["ratings"] += 1


def _add_comparisons(
    store: Store,
    rng: random.Random,
    annotator: int,
    replies: list[tuple[int, bool]],
    noise: float,
    info: dict[str, Any],
) -> None:
    for i, (a, good_a) in enumerate(replies):
        for b, good_b in replies[i + 1 :]:
            if good_a == good_b:
                choice = "tie" if good_a else "both_bad"
            else:
                a_wins = good_a != (rng.random() < noise)
                choice = "a" if a_wins else "b"
            store.add_comparison(annotator, a, b, choice)
            info["comparisons"] += 1


def fill_prompts(store: Store, n: int = 6) -> None:
    """`n` conversations ending on a user turn (a greeting, "Hi!", then a question): prompts
    for PPO's environment, with no feedback."""
    user = store.get_or_create_user("alice").id
    for i in range(n):
        conv = store.create_conversation(user, system_prompt="Be brief.")
        u1 = store.append_message(conv, "user", f"Hello number {i}")
        a1 = store.append_message(conv, "assistant", "Hi!", u1)
        store.append_message(conv, "user", f"Tell me about topic {i}", a1)
