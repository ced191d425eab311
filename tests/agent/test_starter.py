"""The starter model: data rendering and packing, config checks, and a real (tiny) build."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agent.config import Settings
from agent.errors import ConfigError
from agent.modeling import encode_chat, load_base, load_tokenizer
from agent.registry import ModelRegistry
from agent.starter import StarterConfig, build_starter, split_conversations
from agent.store.api import Store
from agent.tiny import chitchat_conversations, encode_turns, pack_rows, to_messages
from rlchat.cli import main as cli

CONVERSATION = to_messages(
    ["hi there how are you", "good, you?", "great thanks", "cool"], system_prompt="Be kind."
)


def test_chitchat_ships_offline_and_alternates() -> None:
    conversations = chitchat_conversations(limit=50)
    assert len(conversations) == 50
    assert all(len(turns) >= 2 and all(t.strip() for t in turns) for turns in conversations)
    messages = to_messages(conversations[0])
    assert [m["role"] for m in messages[:4]] == ["user", "assistant", "user", "assistant"]


def test_encode_turns_matches_the_chat_template(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    [turns] = encode_turns(tokenizer, [CONVERSATION], user_weight=0.5)
    ids = [i for turn_ids, _ in turns for i in turn_ids]
    assert ids == encode_chat(tokenizer, CONVERSATION, add_generation_prompt=False)

    by_role = {m["role"]: set() for m in CONVERSATION}
    for message, (turn_ids, turn_weights) in zip(CONVERSATION, turns, strict=True):
        assert turn_weights[0] == 0.0  # the role marker is given, never predicted
        assert turn_ids[-1] == tokenizer.eos_token_id
        by_role[message["role"]].update(turn_weights[1:])
    assert by_role == {"system": {0.0}, "user": {0.5}, "assistant": {1.0}}


def test_pack_rows_keeps_turns_whole(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    conversations = [to_messages(t) for t in chitchat_conversations(limit=20)]
    turns = encode_turns(tokenizer, conversations, user_weight=1.0)
    ids, weights = pack_rows(turns, context=64, pad_id=tokenizer.pad_token_id)
    assert ids.shape[1] == 64 and ids.shape == weights.shape
    markers = {tokenizer.convert_tokens_to_ids(t) for t in ("<|user|>", "<|assistant|>")}
    assert all(int(row[0]) in markers for row in ids)
    real = ids != tokenizer.pad_token_id
    assert not weights[~real].any()  # padding never counts
    longest = max(len(t) for conv in turns for t, _ in conv)
    all_tokens = sum(min(len(t), 64) for conv in turns for t, _ in conv)
    assert int(real.sum()) == all_tokens and longest > 0


def test_split_is_seeded_and_disjoint() -> None:
    conversations = chitchat_conversations(limit=100)
    config = StarterConfig(size="tiny", held_out_fraction=0.1)
    train, held = split_conversations(conversations, config)
    again_train, again_held = split_conversations(conversations, config)
    assert (train, held) == (again_train, again_held)
    assert len(held) == 10 and len(train) == 90
    text = lambda conv: tuple(m["content"] for m in conv if m["role"] != "system")  # noqa: E731
    assert not {text(c) for c in held} & {text(c) for c in train}
    assert any(c[0]["role"] == "system" for c in train) and any(
        c[0]["role"] == "user" for c in train
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("size", "huge"),
        ("max_conversations", 3),
        ("steps", 0),
        ("lr", 0.0),
        ("held_out_fraction", 0.9),
        ("user_loss_weight", 2.0),
    ],  # fmt: skip
)
def test_config_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        StarterConfig(**{field: value})


def test_weight_decay_spares_norms_biases_and_embeddings(tiny_model_dir: Path) -> None:
    from agent.starter import param_groups

    model, _ = load_base(tiny_model_dir, device="cpu")
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert decayed and all(n.endswith(("proj.weight",)) for n in decayed), decayed
    assert "model.embed_tokens.weight" in spared and any("norm" in n for n in spared)
    assert len(decayed) + len(spared) == len(names)


@pytest.mark.slow
def test_tiny_build_learns_and_registers(sqlite_settings: Settings, sqlite_store: Store) -> None:
    # One thread: on a machine shared with other jobs, two torch threads mostly spin-wait.
    config = StarterConfig(size="tiny", max_conversations=200, num_threads=1)
    threads = torch.get_num_threads()
    result = build_starter(config, sqlite_settings, sqlite_store)
    assert torch.get_num_threads() == threads  # restored
    # Under a minute of CPU (wall time here depends on what else the machine runs).
    assert result.metrics["perf/cpu_s"] < 60, result.metrics

    m = result.metrics
    assert m["eval/loss"] < m["eval/loss_initial"] - 1.0, m  # clearly learned something
    assert m["conversations/train"] + m["conversations/held_out"] == 200
    # Bits per character of held-out replies, next to a trigram's on the same tokens.
    assert 0 < m["heldout/bits_per_char"] < 8 and 0 < m["baseline/trigram_bits_per_char"] < 8
    assert m["heldout/reply_tokens"] > 0
    registry = ModelRegistry(sqlite_store, sqlite_settings)
    version = registry.get(result.version_id)
    assert version.kind == "base" and version.name == "starter-tiny"
    assert registry.deployed().id == result.version_id  # nothing was deployed before
    assert Path(version.path) == result.path and result.path.parent == sqlite_settings.models_dir
    [run] = sqlite_store.list_runs("starter")
    assert run.status == "succeeded" and run.output_version_id == result.version_id
    assert len(result.samples) == 10 and all(isinstance(r, str) for _, r in result.samples)

    model, tokenizer = load_base(result.path, device="cpu")
    assert tokenizer.model_max_length == model.config.max_position_embeddings == 128
    prompt = torch.tensor([encode_chat(tokenizer, [{"role": "user", "content": "hi"}])])
    assert model.generate(prompt, max_new_tokens=5, do_sample=False).shape[1] > prompt.shape[1]

    # A starter of this size exists now: `starter build` without --force reuses it.
    argv = ["--data-dir", str(sqlite_settings.data_dir), "starter", "build", "--size", "tiny"]
    assert cli(argv) == 0
    assert len(sqlite_store.list_model_versions("base")) == 1


def test_witten_bell_trigram_is_a_distribution() -> None:
    from agent.ngram import WittenBellTrigram

    model = WittenBellTrigram([[1, 2, 3, 1, 2, 4], [2, 3, 1]], vocab_size=6)
    for context in [(), (1,), (1, 2), (5, 5)]:
        assert sum(model.prob(context, t) for t in range(6)) == pytest.approx(1.0)
    assert model.prob((1, 2), 3) > model.prob((1, 2), 5)  # seen beats unseen
