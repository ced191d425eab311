"""JSONL export in TRL's conversational formats."""

from __future__ import annotations

import json
from pathlib import Path

from agent.store import export
from agent.store.api import Store


def _fill(store: Store) -> dict[str, int]:
    user = store.get_or_create_user("u")
    ann = store.get_or_create_user("a", "annotator")
    conv = store.create_conversation(user.id, system_prompt="sys")
    q1 = store.append_message(conv, "user", "hello")
    r1 = store.append_message(conv, "assistant", "hi!", q1)
    q2 = store.append_message(conv, "user", "how are you?", r1)
    good = store.append_message(conv, "assistant", "great, and you?", q2)
    bad = store.append_message(conv, "assistant", "no.", q2)
    store.append_message(conv, "assistant", "", q2, error="boom")
    store.add_comparison(ann.id, bad, good, "b")
    store.add_comparison(ann.id, good, bad, "tie")
    return {"conv": conv, "good": good, "bad": bad}


def test_preferences_are_prompt_chosen_rejected(store: Store, tmp_path: Path) -> None:
    _fill(store)
    out = tmp_path / "prefs.jsonl"
    assert export.write_jsonl(export.iter_preferences(store), out) == 1  # the tie is not decisive
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["prompt"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi!"},
        {"role": "user", "content": "how are you?"},
    ]
    assert record["chosen"] == [{"role": "assistant", "content": "great, and you?"}]
    assert record["rejected"] == [{"role": "assistant", "content": "no."}]


def test_conversations_one_record_per_branch_without_failed_ones(store: Store) -> None:
    _fill(store)
    records = list(export.iter_conversations(store))
    assert len(records) == 2  # two good branches; the failed reply's branch is left out
    assert [m["content"] for m in records[0]["messages"]][-1] == "great, and you?"
    assert all(r["messages"][0]["role"] == "system" for r in records)


def test_failed_write_leaves_no_partial_file(tmp_path: Path) -> None:
    out = tmp_path / "out" / "x.jsonl"

    def broken():
        yield {"ok": 1}
        raise RuntimeError("disk full")

    try:
        export.write_jsonl(broken(), out)
    except RuntimeError:
        pass
    assert not out.exists() and list(out.parent.iterdir()) == []
