"""Streaming JSONL export in TRL's conversational formats.

- conversations: one line per branch (root-to-leaf path): {"messages": [...], "conversation_id": ...}
- preferences: one line per decisive comparison (a or b):
  {"prompt": [...context], "chosen": [{"role": "assistant", ...}], "rejected": [...]}

Rows stream from the database with `yield_per`, one conversation held in memory at a time,
so a million messages export in constant memory.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import aliased

from agent.store.api import Store
from agent.store.models import Comparison, Conversation, Message

BATCH = 1000


def _chat(msg: Message) -> dict[str, str]:
    return {"role": msg.role, "content": msg.content}


def _context(
    conv: Conversation | None, by_id: dict[int, Message], leaf_id: int
) -> list[dict[str, str]]:
    """Messages from the first turn down to `leaf_id`, with the system prompt first."""
    chain: list[Message] = []
    cursor = by_id.get(leaf_id)
    while cursor is not None:
        chain.append(cursor)
        cursor = by_id.get(cursor.parent_id) if cursor.parent_id is not None else None
    messages = [_chat(m) for m in reversed(chain)]
    if conv is not None and conv.system_prompt:
        messages.insert(0, {"role": "system", "content": conv.system_prompt})
    return messages


def _messages_by_conversation(store: Store) -> Iterator[tuple[Conversation, list[Message]]]:
    """(conversation, its messages) for every conversation, streamed in id order."""
    stmt = (
        select(Conversation, Message)
        .join(Message, Message.conversation_id == Conversation.id)
        .order_by(Conversation.id, Message.id)
        .execution_options(yield_per=BATCH)
    )
    with store.reading() as session:
        current: Conversation | None = None
        batch: list[Message] = []
        for conv, msg in session.execute(stmt):
            if current is not None and conv.id != current.id:
                yield current, batch
                batch = []
            current = conv
            batch.append(msg)
            session.expunge(msg)
        if current is not None:
            yield current, batch


def iter_conversations(store: Store) -> Iterator[dict[str, Any]]:
    """Every branch of every conversation whose messages are all without errors."""
    for conv, messages in _messages_by_conversation(store):
        by_id = {m.id: m for m in messages}
        parents = {m.parent_id for m in messages}
        for leaf in (m for m in messages if m.id not in parents):
            context = _context(conv, by_id, leaf.id)
            if any(not m["content"] for m in context):
                continue
            yield {"conversation_id": conv.id, "source": conv.source, "messages": context}


def iter_preferences(store: Store) -> Iterator[dict[str, Any]]:
    """Every decisive comparison (a or b) as a prompt / chosen / rejected record."""
    a_msg = aliased(Message)
    stmt = (
        select(Comparison, a_msg.conversation_id)
        .join(a_msg, a_msg.id == Comparison.message_a_id)
        .where(Comparison.choice.in_(("a", "b")))
        .order_by(a_msg.conversation_id, Comparison.id)
        .execution_options(yield_per=BATCH)
    )
    with store.reading() as session:
        cached_id: int | None = None
        conv: Conversation | None = None
        by_id: dict[int, Message] = {}
        for cmp, conversation_id in session.execute(stmt):
            if conversation_id != cached_id:
                conv = session.get(Conversation, conversation_id)
                rows = session.scalars(
                    select(Message).where(Message.conversation_id == conversation_id)
                )
                by_id = {m.id: m for m in rows}
                cached_id = conversation_id
            a, b = by_id[cmp.message_a_id], by_id[cmp.message_b_id]
            chosen, rejected = (a, b) if cmp.choice == "a" else (b, a)
            if a.parent_id is None:
                continue
            yield {
                "prompt": _context(conv, by_id, a.parent_id),
                "chosen": [_chat(chosen)],
                "rejected": [_chat(rejected)],
                "comparison_id": cmp.id,
                "rater_id": cmp.rater_id,
            }
            session.expunge(cmp)


def write_jsonl(records: Iterable[dict[str, Any]], out: str | Path) -> int:
    """Write records to `out` through a temp file renamed into place; returns the count."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n
