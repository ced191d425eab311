"""Simulated users and annotators write through the same paths as the UI, following the oracle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.chat import ChatAgent
from agent.errors import ConfigError
from agent.registry import ModelRegistry
from rl import oracles, simulate


def test_builtin_oracles_rank_replies_as_named() -> None:
    ctx = [{"role": "user", "content": "hi"}]
    assert oracles.follow_up(ctx, "nice, what about you?") > oracles.follow_up(ctx, "nice.")
    assert oracles.positive(ctx, "that is great, i love it") > oracles.positive(
        ctx, "i hate that, terrible"
    )
    assert oracles.concise(ctx, "sure, sounds good to me") > oracles.concise(ctx, "word " * 45)
    assert oracles.load_oracle("rl.oracles:concise")[1] is oracles.concise
    with pytest.raises(ConfigError, match="neither a built-in"):
        oracles.load_oracle("kindness")
    with pytest.raises(ConfigError, match="cannot import"):
        oracles.load_oracle("no.such.module:f")


def test_config_fails_fast() -> None:
    with pytest.raises(ConfigError, match="overlap"):
        simulate.Config(annotators=1, overlap=2)
    with pytest.raises(ConfigError, match="oracle"):
        simulate.Config(oracle="nope")


def test_simulation_fills_the_db_following_the_oracle(
    sqlite_store, sqlite_settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    registry = ModelRegistry(sqlite_store, sqlite_settings)
    registry.deploy(registry.add("base", tiny_model_dir))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(json.dumps({"prompt": p}) for p in ["hi", "how are you", "any pets?"])
    )
    config = simulate.Config(
        oracle="concise",
        users=3,
        turns=1,
        replies=2,
        annotators=2,
        overlap=2,
        noise=0.0,
        prompts=prompts,
        max_new_tokens=8,
    )
    agent = ChatAgent(sqlite_store, sqlite_settings, device="cpu")
    summary = simulate.simulate(config, sqlite_store, agent, sqlite_settings)

    rate = summary.pop("replies_per_s")
    assert summary == {
        "oracle": "concise",
        "conversations": 3,
        "replies": 6,
        "likert_ratings": 12,
        "comparisons": 6,
    }
    assert rate > 0
    convs = sqlite_store.list_conversations()
    assert {c.source for c in convs} == {"simulated"} and all(
        c.meta == {"oracle": "concise"} for c in convs
    )
    ratings = sqlite_store.ratings()
    assert sum(r.kind == "thumb" for r in ratings) == 3
    # Without noise every judgement agrees with the oracle.
    for cmp in sqlite_store.comparisons():
        sa = oracles.concise([], sqlite_store.get_message(cmp.message_a_id).content)
        sb = oracles.concise([], sqlite_store.get_message(cmp.message_b_id).content)
        expected = "a" if sa > sb else "b" if sb > sa else {"tie", "both_bad"}
        assert cmp.choice in expected
    for r in ratings:
        if r.kind == "likert":
            assert r.value == 1 + round(
                4 * oracles.concise([], sqlite_store.get_message(r.message_id).content)
            )


def test_replies_are_generated_in_batches_like_chat_turns(
    sqlite_store, sqlite_settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """5 users x 2 replies in batches of 4: 2 + 2 `generate` calls, stored as chat turns."""
    registry = ModelRegistry(sqlite_store, sqlite_settings)
    registry.deploy(registry.add("base", tiny_model_dir))
    prompts = tmp_path / "prompts.jsonl"
    lines = ["hi", "how are you doing today my friend?", "any pets?", "yo", "what's up"]
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in lines))
    agent = ChatAgent(sqlite_store, sqlite_settings, device="cpu")
    model = agent.policy().model
    calls = []
    generate = model.generate
    model.generate = lambda **kw: calls.append(kw["input_ids"].shape) or generate(**kw)
    config = simulate.Config(
        users=5, turns=1, replies=2, annotators=1, overlap=1, prompts=prompts,
        max_new_tokens=6, batch_size=4, noise=0.0,
    )  # fmt: skip
    summary = simulate.simulate(config, sqlite_store, agent, sqlite_settings)
    assert summary["replies"] == 10
    assert [shape[0] for shape in calls] == [4, 1, 4, 1]
    replies = [
        m
        for c in sqlite_store.list_conversations()
        for m in sqlite_store.messages(c.id)
        if m.role == "assistant"
    ]
    assert len(replies) == 10
    for m in replies:
        assert m.model_version_id is not None and m.prompt_tokens > 0
        assert 0 < m.completion_tokens <= 6 and m.latency_ms is not None
        assert m.sampling["max_new_tokens"] == 6


def test_left_padded_batch_gives_the_streamed_greedy_replies(
    sqlite_store, sqlite_settings, tiny_model_dir: Path
) -> None:
    from agent.chat import BatchRequest, SamplingParams

    registry = ModelRegistry(sqlite_store, sqlite_settings)
    registry.deploy(registry.add("base", tiny_model_dir))
    agent = ChatAgent(sqlite_store, sqlite_settings, device="cpu")
    user = sqlite_store.get_or_create_user("u", "user")
    greedy = SamplingParams(max_new_tokens=8, do_sample=False, repetition_penalty=1.0)
    lines = ["hi", "what do you like to do on weekends with your friends?", "pets?"]
    convs = [agent.new_conversation(user.id) for _ in lines]
    batch = agent.reply_batch(
        [BatchRequest(c, line) for c, line in zip(convs, lines, strict=True)], sampling=greedy
    )
    single = [agent.reply(agent.new_conversation(user.id), line, sampling=greedy) for line in lines]
    assert [c.text for c in batch] == [c.text for c in single]
    assert all(c.done and c.assistant_message_id for c in batch)
