"""Helpers of the feedback UI tests (import as `from ui_helpers import ...`)."""

from __future__ import annotations

import socket
import types
from dataclasses import dataclass
from pathlib import Path

from agent.store.api import Store
from feedback_ui.auth import hash_password

PASSWORD = "correct horse battery"


def request_as(name: str | None, session: str = "s1") -> types.SimpleNamespace:
    """What handlers read from `gr.Request`: the logged-in name and the session."""
    return types.SimpleNamespace(username=name, session_hash=f"{name}-{session}")


@dataclass
class People:
    """Users of every role, with ids."""

    alice: int  # user
    carol: int  # user
    ann: int  # annotator
    bob: int  # annotator
    root: int  # admin


def add_people(store: Store) -> People:
    hashed = hash_password(PASSWORD)
    ids = {}
    for name, role in [
        ("alice", "user"),
        ("carol", "user"),
        ("ann", "annotator"),
        ("bob", "annotator"),
        ("root", "admin"),
    ]:
        ids[name] = store.create_user(name, role=role, password_hash=hashed).id
    return People(**ids)


def seed_chat(store: Store, user_id: int, replies: int = 1, text: str = "hello") -> list[int]:
    """A conversation of `user_id` with one user turn and `replies` sibling replies."""
    conv = store.create_conversation(user_id, "be nice")
    user_msg = store.append_message(conv, "user", text)
    return [
        store.append_message(conv, "assistant", f"reply {i} to {text}", user_msg)
        for i in range(replies)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapter(base_dir: Path, out_dir: Path, seed: int = 1) -> Path:
    """A LoRA adapter on `base_dir` with random (non-zero) weights, so it changes the replies."""
    from agent.tiny import build_tiny_adapter

    return build_tiny_adapter(base_dir, out_dir, seed=seed)
