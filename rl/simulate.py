"""Simulated feedback: scripted users chat through `ChatAgent`, scripted annotators judge
through the same store API the UI uses, following a hidden oracle with configurable noise.

    summary = simulate(SimulateConfig(oracle="follow_up", users=20), store, agent, settings)

Users take their lines from held-out chitchat conversations (those the starter model never
trained on) or a JSONL file of {"messages": [...]} / {"prompt": "..."} records. Each user
turn gets `replies` replies (the first plus regenerations, siblings in the tree), so
comparisons are possible. Rows are marked: conversations have source "simulated" and
meta {"oracle": name}; users and annotators are named sim-user-N / sim-annotator-N.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from agent.chat import BatchRequest, ChatAgent, ReplyChunk, SamplingParams
from agent.config import Settings
from agent.errors import ConfigError, ValidationError
from agent.store.api import ComparisonIn, RatingIn, Store
from rl.env import jsonl_prompts
from rl.oracles import load_oracle

log = logging.getLogger(__name__)


@dataclass
class Config:
    """What to simulate."""

    oracle: str = "follow_up"
    """Hidden preference: follow_up, positive, concise, or module:function."""
    users: int = 20
    """Simulated users, one conversation each."""
    turns: int = 2
    """User turns per conversation."""
    replies: int = 2
    """Replies per user turn: the first plus regenerations (>= 2 gives comparisons)."""
    annotators: int = 3
    """Simulated annotators."""
    overlap: int = 2
    """Annotators per reply (Likert) and per pair of sibling replies (comparison)."""
    noise: float = 0.1
    """Share of judgements flipped (thumb, Likert mirrored, comparison swapped)."""
    prompts: Path | None = None
    """JSONL of {"prompt": "..."} or {"messages": [...]} with optional "followups": [...]
    (the format of rl.env.jsonl_prompts); None: held-out chitchat conversations."""
    max_line_chars: int = 160
    """User lines longer than this are left out (small models have short context windows)."""
    max_new_tokens: int = 32
    """Reply length limit of the simulated chats."""
    temperature: float = 1.0
    """Sampling temperature of the simulated chats (variety between siblings)."""
    batch_size: int = 16
    """Replies generated together, left-padded, in one `generate` call."""
    seed: int = 0
    """Seed of the prompt choice, the sampling and the noise."""

    def __post_init__(self) -> None:
        for name in ("users", "turns", "replies", "annotators", "overlap", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.overlap > self.annotators:
            raise ConfigError(
                f"overlap: {self.overlap} is more than the {self.annotators} annotators"
            )
        if not 0 <= self.noise <= 0.5:
            raise ConfigError(f"noise: must be in [0, 0.5], got {self.noise}")
        if self.prompts is not None and not Path(self.prompts).is_file():
            raise ConfigError(f"prompts: file {self.prompts} does not exist")
        load_oracle(self.oracle)  # fail at start, not after the chats


def load_user_lines(config: Config, n: int) -> list[list[str]]:
    """`n` scripts of user lines (each at least one line)."""
    if config.prompts is None:
        from agent.starter import StarterConfig, split_conversations
        from agent.tiny import chitchat_conversations

        _, held_out = split_conversations(chitchat_conversations(), StarterConfig())
        scripts = [[m["content"] for m in conv if m["role"] == "user"] for conv in held_out]
    else:  # the prompt files `rlchat train ppo` reads: the last user turn, then followups
        scripts = [[p.messages[-1]["content"], *p.followups] for p in jsonl_prompts(config.prompts)]
    scripts = [[line for line in s if len(line) <= config.max_line_chars] for s in scripts]
    scripts = [s for s in scripts if s]
    if not scripts:
        raise ValidationError("no user lines to simulate with: the prompt source is empty")
    random.Random(config.seed).shuffle(scripts)
    return [scripts[i % len(scripts)] for i in range(n)]


def _judge_likert(score: float, flip: bool) -> int:
    value = 1 + round(4 * min(max(score, 0.0), 1.0))
    return 6 - value if flip else value


def _judge_pair(score_a: float, score_b: float, flip: bool) -> str:
    if abs(score_a - score_b) < 1e-9:
        return "both_bad" if score_a < 0.2 else "tie"
    a_wins = (score_a > score_b) != flip
    return "a" if a_wins else "b"


def run_chats(
    config: Config, agent: ChatAgent, store: Store, rng: random.Random
) -> tuple[list[int], int]:
    """Each simulated user chats; returns the conversation ids and the number of replies.

    Turn by turn, every user's line is answered in batches of `batch_size` (one `generate`
    per batch, through `ChatAgent.reply_batch`, which stores turns as the chat does), then
    the regenerations likewise; each user thumbs their first reply and continues from the
    one they like best.
    """
    name, oracle = load_oracle(config.oracle)
    scripts = load_user_lines(config, config.users)
    users = [store.get_or_create_user(f"sim-user-{i}", "user") for i in range(config.users)]
    conversations = [
        agent.new_conversation(u.id, source="simulated", meta={"oracle": name}) for u in users
    ]
    parents: list[int | None] = [None] * config.users
    total = sum(min(len(s), config.turns) for s in scripts) * config.replies
    bar = tqdm(total=total, desc="simulated replies", unit="reply")
    made = 0
    for turn in range(config.turns):
        active = [i for i in range(config.users) if turn < len(scripts[i])]
        requests = [BatchRequest(conversations[i], scripts[i][turn], parents[i]) for i in active]
        siblings = [[c] for c in _in_batches(agent, requests, config, rng, bar)]
        for _ in range(config.replies - 1):
            again = [BatchRequest(regenerate_id=s[0].assistant_message_id) for s in siblings]
            for group, chunk in zip(
                siblings, _in_batches(agent, again, config, rng, bar), strict=True
            ):
                group.append(chunk)
        made += sum(len(s) for s in siblings)
        for i, group in zip(active, siblings, strict=True):
            context = store.path(group[0].user_message_id)
            chat = [{"role": m.role, "content": m.content} for m in context]
            scored = [(oracle(chat, c.text), c.assistant_message_id) for c in group]
            flip = rng.random() < config.noise
            up = (scored[0][0] >= 0.5) != flip
            store.set_rating(scored[0][1], users[i].id, "thumb", 1 if up else -1)
            parents[i] = max(scored)[1]
    bar.close()
    return conversations, made


def _in_batches(
    agent: ChatAgent,
    requests: list[BatchRequest],
    config: Config,
    rng: random.Random,
    bar: tqdm,
) -> list[ReplyChunk]:
    """`agent.reply_batch` over `requests`, `config.batch_size` at a time, one seed each."""
    chunks: list[ReplyChunk] = []
    for start in range(0, len(requests), config.batch_size):
        sampling = SamplingParams(
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            seed=rng.randrange(2**31),
        )
        batch = requests[start : start + config.batch_size]
        chunks += agent.reply_batch(batch, sampling=sampling)
        bar.update(len(batch))
    return chunks


def annotate(
    config: Config, store: Store, settings: Settings, conversations: list[int], rng: random.Random
) -> dict[str, int]:
    """Annotators work the Likert queue, then compare sibling replies with `overlap` each."""
    _, oracle = load_oracle(config.oracle)
    criterion = settings.likert_criteria[0]
    annotators = [
        store.get_or_create_user(f"sim-annotator-{j}", "annotator")
        for j in range(config.annotators)
    ]
    mine = set(conversations)

    def score(message_id: int) -> float:
        path = store.path(message_id)
        chat = [{"role": m.role, "content": m.content} for m in path[:-1]]
        return oracle(chat, path[-1].content)

    n_likert = 0
    for ann in tqdm(annotators, desc="simulated annotators", unit="annotator"):
        while items := store.next_for_annotation(
            ann.id, config.overlap, settings.annotation_lease_s, limit=20
        ):
            batch = []
            for msg in items:
                if msg.conversation_id not in mine:
                    store.skip_annotation(msg.id, ann.id)  # not part of this simulation
                    continue
                value = _judge_likert(score(msg.id), rng.random() < config.noise)
                batch.append(RatingIn(msg.id, ann.id, "likert", value, criterion))
            n_likert += len(store.set_ratings(batch))  # one transaction per leased batch
    n_pairs = 0
    for conv in conversations:
        by_parent: dict[int, list[int]] = {}
        for m in store.messages(conv):
            if m.role == "assistant" and m.parent_id is not None and not m.error:
                by_parent.setdefault(m.parent_id, []).append(m.id)
        pairs = []
        for siblings in by_parent.values():
            for a, b in combinations(siblings, 2):
                sa, sb = score(a), score(b)
                for ann in rng.sample(annotators, config.overlap):
                    choice = _judge_pair(sa, sb, rng.random() < config.noise)
                    pairs.append(ComparisonIn(ann.id, a, b, choice))
        n_pairs += len(store.add_comparisons(pairs))  # one transaction per conversation
    return {"likert_ratings": n_likert, "comparisons": n_pairs}


def simulate(config: Config, store: Store, agent: ChatAgent, settings: Settings) -> dict[str, Any]:
    """Chats then annotations; returns counts of what was written."""
    rng = random.Random(config.seed)
    start = time.perf_counter()
    conversations, replies = run_chats(config, agent, store, rng)
    chat_s = time.perf_counter() - start
    log.info("%d replies in %.1f s: %.2f replies/s", replies, chat_s, replies / chat_s)
    counts = annotate(config, store, settings, conversations, rng)
    return {
        "oracle": config.oracle,
        "conversations": len(conversations),
        "replies": replies,
        "replies_per_s": round(replies / chat_s, 2),
        **counts,
    }
