"""The branches of a conversation's message tree, for the chat's branch picker.

Regenerating a reply or editing a message never overwrites: the new turn is a sibling, and the
old one stays in the tree with everything after it. Each leaf of the tree ends one branch; a
branch is named by where it leaves the branch on screen.
"""

from __future__ import annotations

from agent.store.models import Message

SNIPPET = 40
"""Characters of the diverging message shown in a branch's label."""


def leaves(messages: list[Message]) -> list[Message]:
    """The last message of every branch, oldest first (system turns left out)."""
    parents = {m.parent_id for m in messages}
    return [m for m in messages if m.role != "system" and m.id not in parents]


def branch_choices(messages: list[Message], shown: list[int]) -> list[tuple[str, int]]:
    """(label, leaf id) per branch; `shown` is the path of message ids on screen."""
    by_id = {m.id: m for m in messages}
    choices = []
    for number, leaf in enumerate(leaves(messages), start=1):
        path = _path(by_id, leaf.id)
        turns = sum(1 for i in path if by_id[i].role == "user")
        if path == shown:
            label = f"Branch {number} (on screen) · {turns} turn(s)"
        else:
            split = next(
                (i for i, (a, b) in enumerate(zip(path, shown, strict=False)) if a != b),
                min(len(path), len(shown)),
            )
            fork = by_id[path[min(split, len(path) - 1)]]
            what = "edited message" if fork.role == "user" else "other reply"
            text = fork.content.replace("\n", " ")
            text = text[:SNIPPET] + ("…" if len(text) > SNIPPET else "")
            label = f"Branch {number} · {what} at turn {split // 2 + 1}: “{text}” · {turns} turn(s)"
        choices.append((label, leaf.id))
    return choices


def _path(by_id: dict[int, Message], leaf_id: int) -> list[int]:
    chain = []
    cursor: int | None = leaf_id
    while cursor is not None and cursor in by_id:
        if by_id[cursor].role != "system":
            chain.append(cursor)
        cursor = by_id[cursor].parent_id
    return chain[::-1]


def branch_path(messages: list[Message], leaf_id: int) -> list[int]:
    """The message ids from the first turn to `leaf_id` (system turns left out)."""
    return _path({m.id: m for m in messages}, leaf_id)
