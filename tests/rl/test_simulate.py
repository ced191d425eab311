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

    assert summary == {
        "oracle": "concise",
        "conversations": 3,
        "likert_ratings": 12,
        "comparisons": 6,
    }
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
