"""The dialogue environment: contexts from logged conversations, replies as actions, scores as rewards.

    prompts = db_prompts(store, split="train")
    env = DialogueEnv(prompts, reward=reward_model)        # or any (context, reply) -> float
    obs, info = env.reset(seed=0)                          # obs: the context as JSON text
    obs, reward, terminated, truncated, info = env.step("Hello! How can I help?")

`DialogueVectorEnv` is the batched form the PPO trainer drives: the same contract for N
sub-environments, with the whole batch of replies scored in one reward-model call.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv

from agent.errors import NotFoundError, ValidationError
from agent.store.api import Store
from agent.store.models import utcnow
from agent.store.splits import SPLITS, SplitFractions
from rl.datasets import check_sources, load_snapshot

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
RewardFn = Callable[[Messages, str], float]
"""A reward as a plain function: (context messages ending with a user turn, reply) -> score."""

OBS_CHARSET = frozenset(chr(c) for c in range(0x20, 0x7F))
"""Observations are JSON with non-ASCII escaped, so printable ASCII is all they ever contain."""
ACTION_CHARSET = frozenset(
    chr(c)
    for c in [0x09, 0x0A, 0x0D, *range(0x20, 0x7F), *range(0xA0, 0xD800), *range(0xE000, 0xFFFE)]
    + list(range(0x1F000, 0x1FB00))
)
"""Replies may hold any printable character of the Basic Multilingual Plane, and emoji."""


@runtime_checkable
class BatchScorer(Protocol):
    """A reward that scores a whole batch at once (e.g. `rl.reward_model.RewardModel`)."""

    def score(self, contexts: list[Messages], replies: list[str]) -> Any: ...


def score_batch(
    reward: BatchScorer | RewardFn, contexts: list[Messages], replies: list[str]
) -> np.ndarray:
    """Scores of `replies` as float64 (N,): one call of a `BatchScorer`, else one call per reply."""
    if isinstance(reward, BatchScorer):
        scores = reward.score(contexts, replies)
        values = scores.tolist() if hasattr(scores, "tolist") else list(scores)
    else:
        values = [float(reward(c, r)) for c, r in zip(contexts, replies, strict=True)]
    return np.asarray(values, dtype=np.float64)


# ---- prompt sources ----------------------------------------------------------------------


@dataclass
class Prompt:
    """One starting context: chat messages ending with a user turn."""

    messages: Messages
    """The conversation so far (optional system message first), the last message a user turn."""
    followups: list[str] = field(default_factory=list)
    """The user turns logged after this one on the same branch (for the logged-user simulator)."""
    conversation_id: int | None = None
    """The conversation it came from (None for JSONL prompts)."""
    message_id: int | None = None
    """The id of its last (user) message in the DB (None for JSONL prompts)."""


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValidationError(
            f"split: {split!r} is not one of {', '.join(SPLITS)} (or None for all)"
        )


def normalise_prompt(text: str) -> str:
    """A prompt's text for duplicate detection: lower case, letters and digits, single spaces."""
    kept = "".join(ch if ch.isalnum() else " " for ch in text.lower())
    return " ".join(kept.split())


def db_prompts(
    store: Store,
    split: str | None = "train",
    *,
    cutoff: datetime | None = None,
    fractions: SplitFractions | None = None,
    sources: list[str] | None = None,
) -> list[Prompt]:
    """Every user turn logged at or before `cutoff` (default: now) in the conversations of
    `split`, with its context (failed replies left out) and the user turns logged after it.
    `sources`: None takes every source (evaluation); a list takes those, and an empty list
    (a training job that chose none) is refused when real and simulated conversations mix.

    The split is each conversation's stored one (`agent.store.splits`, drawn with `fractions`
    for conversations that have none yet), the same every job reads. Prompts of a held-out
    split whose text (normalised) is also a train prompt are left out: "Hey" asked in a train
    conversation and again in a test one would measure memory, not generalisation.
    """
    _check_split(split)
    snap = load_snapshot(store, cutoff or utcnow(), fractions, sources)
    if sources is not None:
        check_sources(snap, sources)
    children: dict[int | None, list[Any]] = {}
    for m in snap.messages.values():
        children.setdefault(m.parent_id, []).append(m)
    users = sorted((m for m in snap.messages.values() if m.role == "user"), key=lambda m: m.id)
    seen = (
        {normalise_prompt(m.content) for m in users if snap.split_of(m.conversation_id) == "train"}
        if split not in (None, "train")
        else set()
    )
    prompts, dropped = [], 0
    for m in users:
        if split is not None and snap.split_of(m.conversation_id) != split:
            continue
        if normalise_prompt(m.content) in seen:
            dropped += 1
            continue
        context = [*snap.context(m.id), {"role": "user", "content": m.content}]
        prompts.append(Prompt(context, _followups(m, children), m.conversation_id, m.id))
    if dropped:
        log.info("%s prompts: left out %d whose text is also a train prompt", split, dropped)
    return prompts


def _followups(user_msg: Any, children: dict[int | None, list[Any]]) -> list[str]:
    """The next user turns below `user_msg`, following the oldest reply and answer each time."""
    out, cursor = [], user_msg
    while True:
        replies = [c for c in children.get(cursor.id, []) if c.role == "assistant" and not c.error]
        users = [c for r in replies[:1] for c in children.get(r.id, []) if c.role == "user"]
        if not users:
            return out
        cursor = min(users, key=lambda u: u.id)
        out.append(cursor.content)


def jsonl_prompts(
    path: str | Path, split: str | None = None, *, fractions: SplitFractions | None = None
) -> list[Prompt]:
    """Prompts from a JSONL file: per line {"messages": [...]} or {"prompt": "text"},
    optionally with "followups": [...]. With `split`, a line's split is drawn from its line
    number with the same fractions and hash as conversations."""
    _check_split(split)
    fractions = fractions or SplitFractions()
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"prompts: no JSONL file at {path.resolve()}")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or (split is not None and fractions.draw(n) != split):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValidationError(f"prompts: {path} line {n} is not JSON: {exc}") from exc
        messages = row.get("messages") or [{"role": "user", "content": row.get("prompt", "")}]
        if messages[-1].get("role") != "user" or not str(messages[-1].get("content", "")).strip():
            raise ValidationError(
                f"prompts: {path} line {n} must end with a non-empty user turn "
                '(give {"prompt": "..."} or {"messages": [..., {"role": "user", ...}]})'
            )
        prompts.append(Prompt(messages, list(row.get("followups", []))))
    return prompts


# ---- user simulators -----------------------------------------------------------------------

UserSimulator = Callable[[Messages, Prompt, int, np.random.Generator], "str | None"]
"""(conversation so far ending with the reply, the episode's prompt, turn number, rng) ->
the next user message, or None when the user has nothing more to say."""


def logged_user(
    messages: Messages, prompt: Prompt, turn: int, rng: np.random.Generator
) -> str | None:
    """The user turn that was logged next after this point, if there was one."""
    return prompt.followups[turn - 1] if turn - 1 < len(prompt.followups) else None


def encode_observation(messages: Messages) -> str:
    """The observation text of a context: the chat messages as JSON (non-ASCII escaped)."""
    return json.dumps(messages, ensure_ascii=True)


def decode_observation(obs: str) -> Messages:
    """The chat messages of an observation made by `encode_observation`."""
    return json.loads(obs)


def fit_context(messages: Messages, max_chars: int) -> Messages:
    """`messages` whose observation fits in `max_chars`: oldest turns go first (the system
    prompt and the last user turn stay); then the last turn's text is cut from the front."""
    msgs = [dict(m) for m in messages]
    head = msgs[:1] if msgs and msgs[0]["role"] == "system" else []
    body = msgs[len(head) :]
    while len(body) > 1 and len(encode_observation(head + body)) > max_chars:
        body.pop(0)
    while len(encode_observation(head + body)) > max_chars and body[-1]["content"]:
        excess = len(encode_observation(head + body)) - max_chars
        body[-1]["content"] = body[-1]["content"][max(1, excess) :]
    if len(encode_observation(head + body)) > max_chars:
        raise ValidationError(
            f"max_obs_chars: {max_chars} is too small to hold even the system prompt; raise it"
        )
    return head + body


@functools.cache
def _text_space_prototype(
    max_length: int, min_length: int, charset: frozenset[str]
) -> gym.spaces.Text:
    return gym.spaces.Text(max_length=max_length, min_length=min_length, charset=charset)


def _text_space(max_length: int, min_length: int, charset: frozenset[str]) -> gym.spaces.Text:
    """A Text space; built once per shape (a large charset takes a while), copied per env so
    each copy seeds its own sampler."""
    return copy.copy(_text_space_prototype(max_length, min_length, charset))


# ---- the environment -----------------------------------------------------------------------


class DialogueEnv(gym.Env[str, str]):
    """One conversation at a time: the agent writes the assistant's reply.

    ## Observation
    The conversation so far as JSON text (`encode_observation`: a list of {"role", "content"}
    messages, non-ASCII escaped, so printable ASCII only), ending with a user turn and cut to
    `max_obs_chars` by `fit_context`. `decode_observation` turns it back into messages.

    ## Action
    The reply text (any string; the space admits the BMP and emoji up to `max_reply_chars`).

    ## Reward
    The reward's score of (context, reply): a `BatchScorer` such as the reward model (its
    normalised score) or any function (context, reply) -> float.

    ## Episode end
    Single-turn (`max_turns=1`): every reply terminates the episode. Multi-turn: after each
    reply the user simulator gives the next user turn; the episode terminates when it has
    none, and is truncated when `max_turns` replies were written while it had more.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(
        self,
        prompts: Sequence[Prompt],
        reward: BatchScorer | RewardFn,
        *,
        max_turns: int = 1,
        user_simulator: UserSimulator = logged_user,
        max_obs_chars: int = 16_000,
        max_reply_chars: int = 8_000,
    ) -> None:
        if not prompts:
            raise ValidationError(
                "prompts: the prompt source is empty; log some chats or give a JSONL file"
            )
        if max_turns < 1:
            raise ValidationError(f"max_turns: must be >= 1, got {max_turns}")
        self.prompts = list(prompts)
        self.reward = reward
        self.max_turns = max_turns
        self.user_simulator = user_simulator
        self.max_obs_chars = max_obs_chars
        self.observation_space = _text_space(max_obs_chars, 2, OBS_CHARSET)
        self.action_space = _text_space(max_reply_chars, 0, ACTION_CHARSET)
        self._prompt: Prompt | None = None
        self._index: int | None = None
        self._messages: Messages = []
        self._turn = 0

    @property
    def context(self) -> Messages:
        """The current context (a copy): the messages the next reply answers."""
        return [dict(m) for m in self._messages]

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict]:
        """Start a conversation. options: {"prompt_index": i} picks a prompt instead of drawing one."""
        super().reset(seed=seed)
        options = options or {}
        index = options.get("prompt_index")
        if index is None:
            index = int(self.np_random.integers(len(self.prompts)))
        elif not 0 <= int(index) < len(self.prompts):
            raise ValidationError(
                f"options.prompt_index: {index} is outside 0..{len(self.prompts) - 1}"
            )
        self._start(int(index))
        return encode_observation(self._messages), self._info()

    def _start(self, index: int) -> None:
        self._index = index
        self._prompt = self.prompts[index]
        self._messages = fit_context(self._prompt.messages, self.max_obs_chars)
        self._turn = 0

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        reward = float(score_batch(self.reward, [self.context], [self._check_action(action)])[0])
        obs, terminated, truncated, info = self.advance(action)
        return obs, reward, terminated, truncated, info

    def _check_action(self, action: str) -> str:
        if self._prompt is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        if not isinstance(action, str):
            raise ValidationError(f"action: expected the reply text, got {type(action).__name__}")
        return action

    def advance(self, reply: str) -> tuple[str, bool, bool, dict]:
        """The transition without the reward (the vector form scores a batch itself)."""
        self._check_action(reply)
        self._turn += 1
        conversation = self._messages + [{"role": "assistant", "content": reply}]
        next_user = None
        if self.max_turns > 1:
            next_user = self.user_simulator(conversation, self._prompt, self._turn, self.np_random)
        terminated = next_user is None
        truncated = not terminated and self._turn >= self.max_turns
        if next_user is not None:
            conversation.append({"role": "user", "content": next_user})
        self._messages = (
            fit_context(conversation, self.max_obs_chars) if next_user is not None else conversation
        )
        obs = encode_observation(fit_context(self._messages, self.max_obs_chars))
        return obs, terminated, truncated, self._info()

    def _info(self) -> dict[str, Any]:
        prompt = self.prompts[self._index or 0]
        return {
            "turn": self._turn,
            "prompt_index": self._index,
            "conversation_id": prompt.conversation_id,
            "message_id": prompt.message_id,
        }

    def get_state(self) -> dict[str, Any]:
        """Everything needed to continue exactly from here (for checkpoints): JSON-safe."""
        return {
            "rng": self.np_random.bit_generator.state,
            "index": self._index,
            "messages": self.context,
            "turn": self._turn,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.np_random.bit_generator.state = state["rng"]
        if state["index"] is not None:
            self._start(state["index"])
            self._messages = [dict(m) for m in state["messages"]]
            self._turn = state["turn"]


class DialogueVectorEnv(VectorEnv):
    """`num_envs` DialogueEnvs stepped together; each step scores all replies in one reward call.

    Autoreset is SAME_STEP: a sub-environment whose episode ended is reset within the same
    step, its returned observation is the new episode's first, and `infos["final_obs"]` holds
    the final one. `reset(seed=s)` seeds sub-environment i with s + i.
    """

    metadata: dict[str, Any] = {"autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(
        self,
        num_envs: int,
        prompts: Sequence[Prompt],
        reward: BatchScorer | RewardFn,
        **env_kwargs: Any,
    ) -> None:
        if num_envs < 1:
            raise ValidationError(f"num_envs: must be >= 1, got {num_envs}")
        self.envs = [DialogueEnv(prompts, reward, **env_kwargs) for _ in range(num_envs)]
        self.reward = reward
        self.num_envs = num_envs
        self.single_observation_space = self.envs[0].observation_space
        self.single_action_space = self.envs[0].action_space
        # Tuple spaces of the one sub-space (batch_space would deep-copy a 66k-char charset N times).
        self.observation_space = gym.spaces.Tuple([self.single_observation_space] * num_envs)
        self.action_space = gym.spaces.Tuple([self.single_action_space] * num_envs)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[tuple[str, ...], dict]:
        obs, infos = [], {}
        for i, env in enumerate(self.envs):
            o, info = env.reset(seed=None if seed is None else seed + i, options=options)
            obs.append(o)
            infos = self._add_info(infos, info, i)
        return tuple(obs), infos

    def step(
        self, actions: Sequence[str]
    ) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray, dict]:
        if len(actions) != self.num_envs:
            raise ValidationError(f"actions: expected {self.num_envs} replies, got {len(actions)}")
        replies = [env._check_action(a) for env, a in zip(self.envs, actions, strict=True)]
        rewards = score_batch(self.reward, [env.context for env in self.envs], replies)
        obs, infos = [], {}
        terminated = np.zeros(self.num_envs, dtype=np.bool_)
        truncated = np.zeros(self.num_envs, dtype=np.bool_)
        for i, (env, reply) in enumerate(zip(self.envs, replies, strict=True)):
            o, terminated[i], truncated[i], info = env.advance(reply)
            if terminated[i] or truncated[i]:
                info = {**info, "final_obs": o, "final_info": dict(info)}
                o, reset_info = env.reset()
                info.update(reset_info)
            obs.append(o)
            infos = self._add_info(infos, info, i)
        return tuple(obs), rewards, terminated, truncated, infos

    @property
    def contexts(self) -> list[Messages]:
        """The current context of every sub-environment."""
        return [env.context for env in self.envs]

    def get_state(self) -> list[dict[str, Any]]:
        return [env.get_state() for env in self.envs]

    def set_state(self, states: list[dict[str, Any]]) -> None:
        if len(states) != self.num_envs:
            raise ValidationError(
                f"state: saved for {len(states)} environments, this has {self.num_envs}"
            )
        for env, state in zip(self.envs, states, strict=True):
            env.set_state(state)
