"""DialogueEnv: Gymnasium's contract, prompt sources, multi-turn episodes, the vector form."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from agent.errors import NotFoundError, ValidationError
from agent.store.api import Store
from agent.store.splits import SplitFractions, assign_splits, stored_splits
from rl.env import (
    DialogueEnv,
    DialogueVectorEnv,
    Prompt,
    db_prompts,
    decode_observation,
    fit_context,
    jsonl_prompts,
)


def length_reward(context: list[dict[str, str]], reply: str) -> float:
    return float(len(reply) % 7)


PROMPTS = [
    Prompt([{"role": "user", "content": "héllo 😀"}], followups=["and then?", "bye"]),
    Prompt([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}]),
    Prompt([{"role": "user", "content": "what is up"}], followups=["really?"]),
]


class CountingScorer:
    """A batch reward that records how often it was called."""

    def __init__(self) -> None:
        self.calls = 0

    def score(self, contexts: list, replies: list[str]) -> torch.Tensor:
        self.calls += 1
        return torch.tensor([float(len(r)) for r in replies])


@pytest.mark.parametrize("max_turns", [1, 3])
def test_check_env_passes(max_turns: int) -> None:
    check_env(DialogueEnv(PROMPTS, length_reward, max_turns=max_turns), skip_render_check=True)


def test_reset_draws_from_np_random_and_observation_round_trips() -> None:
    env = DialogueEnv(PROMPTS, length_reward)
    drawn = [env.reset(seed=s)[1]["prompt_index"] for s in range(20)]
    assert len(set(drawn)) == 3
    assert drawn == [env.reset(seed=s)[1]["prompt_index"] for s in range(20)]
    obs, info = env.reset(options={"prompt_index": 0})
    assert decode_observation(obs) == PROMPTS[0].messages and obs.isascii()
    assert env.observation_space.contains(obs)
    with pytest.raises(ValidationError, match="prompt_index"):
        env.reset(options={"prompt_index": 3})


def test_single_turn_terminates_with_the_reward_of_the_reply() -> None:
    env = DialogueEnv(PROMPTS, length_reward)
    env.reset(seed=0, options={"prompt_index": 1})
    obs, reward, terminated, truncated, info = env.step("hello!")
    assert (reward, terminated, truncated) == (6.0, True, False)
    assert decode_observation(obs)[-1] == {"role": "assistant", "content": "hello!"}
    with pytest.raises(ValidationError, match="action"):
        env.step(42)  # type: ignore[arg-type]


def test_multi_turn_uses_the_logged_user_then_terminates_or_truncates() -> None:
    env = DialogueEnv(PROMPTS, length_reward, max_turns=3)
    env.reset(seed=0, options={"prompt_index": 2})  # one logged follow-up
    obs, _, terminated, truncated, _ = env.step("a")
    assert (terminated, truncated) == (False, False)
    assert decode_observation(obs)[-1] == {"role": "user", "content": "really?"}
    _, _, terminated, truncated, _ = env.step("b")
    assert (terminated, truncated) == (True, False)  # the user had nothing more to say

    short = DialogueEnv(PROMPTS, length_reward, max_turns=2)
    short.reset(seed=0, options={"prompt_index": 0})  # two follow-ups, but only two turns
    short.step("a")
    _, _, terminated, truncated, info = short.step("b")
    assert (terminated, truncated, info["turn"]) == (False, True, 2)


def test_fit_context_drops_old_turns_then_cuts_the_last() -> None:
    messages = [{"role": "system", "content": "sys"}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "x" * 50} for i in range(9)
    ]
    fitted = fit_context(messages, 200)
    assert fitted[0]["role"] == "system" and fitted[-1] == messages[-1]
    assert len(json.dumps(fitted)) <= 200 and len(fitted) < len(messages)
    cut = fit_context([{"role": "user", "content": "y" * 500}], 100)
    assert len(json.dumps(cut)) <= 100 and cut[0]["content"].startswith("y")


def test_vector_env_scores_a_batch_in_one_call_and_autoresets() -> None:
    scorer = CountingScorer()
    envs = DialogueVectorEnv(4, PROMPTS, scorer, max_turns=2)
    obs, _ = envs.reset(seed=0)
    assert len(obs) == 4 and envs.observation_space.contains(obs)
    replies = ["a", "bb", "ccc", "dddd"]
    obs, rewards, terminated, truncated, infos = envs.step(replies)
    assert scorer.calls == 1 and rewards.tolist() == [1.0, 2.0, 3.0, 4.0]
    for i in np.flatnonzero(terminated | truncated):  # same-step autoreset
        assert decode_observation(infos["final_obs"][i])[-1]["content"] == replies[i]
        assert infos["turn"][i] == 0
    for i in np.flatnonzero(~(terminated | truncated)):
        assert decode_observation(obs[i])[-1]["role"] == "user"
    with pytest.raises(ValidationError, match="actions"):
        envs.step(["only one"])


def test_vector_env_state_round_trip_continues_identically() -> None:
    envs = DialogueVectorEnv(3, PROMPTS, length_reward, max_turns=2)
    envs.reset(seed=5)
    envs.step(["x", "y", "z"])
    state = json.loads(json.dumps(envs.get_state()))
    expected = [envs.step(["p", "q", "r"])[0] for _ in range(3)]
    other = DialogueVectorEnv(3, PROMPTS, length_reward, max_turns=2)
    other.reset(seed=99)
    other.set_state(state)
    assert [other.step(["p", "q", "r"])[0] for _ in range(3)] == expected


def fill(store: Store) -> dict[str, int]:
    user = store.get_or_create_user("bob").id
    ids: dict[str, int] = {}
    for i in range(8):
        conv = store.create_conversation(user, system_prompt="Be brief." if i == 0 else "")
        u1 = store.append_message(conv, "user", f"first {i}")
        a1 = store.append_message(conv, "assistant", "reply", u1)
        store.append_message(conv, "assistant", "", u1, error="boom")  # a failed sibling
        u2 = store.append_message(conv, "user", f"second {i}", a1)
        ids[f"conv{i}"], ids[f"u1_{i}"], ids[f"u2_{i}"] = conv, u1, u2
    return ids


def test_db_prompts_contexts_followups_and_split(store: Store) -> None:
    ids = fill(store)
    halves = SplitFractions(train=0.5, validation=0.0, judge=0.0, test=0.5, seed=1)
    everything = db_prompts(store, None, fractions=halves)  # draws and stores the splits
    assert len(everything) == 16
    first = next(p for p in everything if p.message_id == ids["u1_0"])
    assert first.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first 0"},
    ]
    assert first.followups == ["second 0"] and first.conversation_id == ids["conv0"]
    second = next(p for p in everything if p.message_id == ids["u2_3"])
    assert [m["content"] for m in second.messages] == ["first 3", "reply", "second 3"]
    train = db_prompts(store, "train")
    test = db_prompts(store, "test")
    assert train and test and len(train) + len(test) == 16
    stored = stored_splits(store)
    assert {stored[p.conversation_id] for p in train} == {"train"}
    assert {stored[p.conversation_id] for p in test} == {"test"}
    # Decided once: other fractions later change nobody's split.
    assert (
        db_prompts(store, "train", fractions=SplitFractions(train=1, validation=0, judge=0, test=0))
        == train
    )


def test_held_out_prompts_that_repeat_a_train_prompt_are_left_out(store: Store) -> None:
    user = store.get_or_create_user("ann").id
    texts = {"train": ["Hey", "hello?", "how are you"], "test": ["hey!", "Hello", "what now?"]}
    for split, lines in texts.items():
        for text in lines:
            conv = store.create_conversation(user, "")
            store.append_message(conv, "user", text)
            assign_splits(
                store,
                [conv],
                SplitFractions(
                    **{s: float(s == split) for s in ("train", "validation", "judge", "test")}
                ),
            )
    assert [p.messages[-1]["content"] for p in db_prompts(store, "test")] == ["what now?"]
    assert len(db_prompts(store, "train")) == 3


def test_jsonl_prompts(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    lines = [
        {"prompt": "hi"},
        {"messages": [{"role": "user", "content": "yo"}], "followups": ["ok"]},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    prompts = jsonl_prompts(path)
    assert [p.messages[-1]["content"] for p in prompts] == ["hi", "yo"]
    assert prompts[1].followups == ["ok"]
    path.write_text(json.dumps({"messages": [{"role": "assistant", "content": "no"}]}))
    with pytest.raises(ValidationError, match="line 1"):
        jsonl_prompts(path)
    with pytest.raises(NotFoundError):
        jsonl_prompts(tmp_path / "missing.jsonl")
    with pytest.raises(ValidationError, match="prompt source is empty"):
        DialogueEnv([], length_reward)
