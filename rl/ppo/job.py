"""`rlchat train ppo`: PPO of the policy against the reward model, in the dialogue environment.

    rlchat train ppo --set iterations=200 --set reward=3        # reward model version 3
    rlchat train ppo --set reward=my.oracles:likes_questions    # any (context, reply) -> float
    rlchat train ppo --set algorithm=rloo --set rloo_k=4          # RLOO instead of PPO
    accelerate launch --num_processes 2 -m rlchat.cli train ppo  # the same job, DDP

Reads the user turns logged up to the run's data cut-off (train split), trains a PPO LoRA
adapter on top of the starting policy, checkpoints every `checkpoint_every` iterations
(adapters, value head, optimizer, controllers, random state, environment state), and registers
the result as a `ppo` candidate model version whose parent is the starting policy.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from agent.config import Settings
from agent.errors import ConfigError, NotFoundError
from agent.modeling import Policy
from agent.registry import ModelRegistry
from agent.store.api import Store
from rl.env import (
    BatchScorer,
    DialogueVectorEnv,
    Prompt,
    RewardFn,
    db_prompts,
    jsonl_prompts,
    score_batch,
)
from rl.ppo.config import PPOConfig
from rl.ppo.maths import PPODivergedError
from rl.ppo.trainer import PPOTrainer
from rl.runs import Run, training_run

log = logging.getLogger(__name__)


@dataclass
class Config(PPOConfig):
    """The `rlchat train ppo` job: PPO hyperparameters (see `PPOConfig`) plus what to train on."""

    policy: str = ""
    """Starting policy: a model version id (sft/base/ppo), or a base model dir / hub id; empty:
    the newest sft version, else the deployed policy."""
    reward: str = ""
    """A reward model version id or directory, or an oracle `module:function` (context, reply)
    -> float; empty: the newest reward model version."""
    prompts: str = "db"
    """Where contexts come from: "db" (user turns logged in the database) or a JSONL file."""
    sources: list[str] = field(default_factory=list)
    """Conversation sources whose prompts are used (chat, arena, simulated, import); empty: all,
    allowed only when the database does not mix real and simulated conversations."""
    max_turns: int = 1
    """Replies per episode; > 1 continues with the logged next user turn when there is one."""
    iterations: int = 100
    """PPO iterations (one batch of rollouts and its update each)."""
    checkpoint_every: int = 10
    """Save a checkpoint every this many iterations (and at the end)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    eval_prompts: int = 32
    """Held-out contexts scored at the end for the policy and the reference (0: skip)."""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda."""
    name: str = ""
    """Name of the registered model version."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.iterations < 1 or self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ConfigError("iterations, checkpoint_every and keep_checkpoints must be >= 1")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device: {self.device!r} is not one of auto, cpu, cuda")


# ---- what to train -----------------------------------------------------------------------


def resolve_policy(spec: str, registry: ModelRegistry) -> tuple[str, list[str], int | None]:
    """(base, adapter dirs, version id or None for a bare base path/hub id) of the start policy."""
    if spec.isdigit():
        resolved = registry.resolve(int(spec))
        return resolved.base, resolved.adapters, int(spec)
    if spec:
        return spec, [], None
    sft = registry.versions("sft")
    start = sft[-1] if sft else registry.deployed()
    if start is None:
        raise ConfigError(
            "policy: no sft version and nothing deployed; give policy=<version id> or a base "
            "model directory (e.g. the starter model), or run `rlchat train sft` first"
        )
    resolved = registry.resolve(start.id)
    return resolved.base, resolved.adapters, start.id


def load_reward(spec: str, store: Store, device: torch.device) -> BatchScorer | RewardFn:
    """The reward named by `Config.reward`."""
    if ":" in spec and not Path(spec).exists():
        module_name, _, attr = spec.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(
                f"reward: cannot import {spec!r} ({exc}); give module:function"
            ) from exc
    from rl.reward_model import RewardModel

    if spec.isdigit():
        version = store.get_model_version(int(spec))
        if version.kind != "reward":
            raise ConfigError(
                f"reward: model version {spec} is a {version.kind} model, not a reward model"
            )
        return RewardModel.load(version.path, device=device)
    if spec:
        return RewardModel.load(spec, device=device)
    versions = store.list_model_versions("reward")
    if not versions:
        raise ConfigError(
            "reward: no reward model version is registered; run `rlchat train reward` or give "
            "reward=<dir> or reward=module:function"
        )
    return RewardModel.load(versions[-1].path, device=device)


def reward_head(
    reward: BatchScorer | RewardFn, policy: Policy
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The reward model's score head, scaled to its normalised scores, when its shape fits the
    policy's hidden size (the critic's value head starts from it); None otherwise."""
    from rl.reward_model import RewardModel

    if not isinstance(reward, RewardModel):
        return None
    head = getattr(
        reward.model, "score", None
    )  # the head of transformers' *ForSequenceClassification
    hidden = policy.base_model.config.get_text_config().hidden_size
    if not isinstance(head, torch.nn.Linear) or head.weight.shape != (1, hidden):
        log.info("the reward head does not fit the critic (%s): a random value head", head)
        return None
    weight = head.weight.detach().float().cpu() / reward.std
    bias = head.bias.detach().float().cpu() if head.bias is not None else torch.zeros(1)
    log.info("the critic's value head starts from the reward model's score head")
    return weight.to(policy.device), ((bias - reward.mean) / reward.std).to(policy.device)


def check_normalisation(config: Config, reward: BatchScorer | RewardFn) -> None:
    """Scores are normalised once: by the reward model's fixed statistics, or (for a raw reward
    function) by running moments when asked, never both."""
    from rl.reward_model import RewardModel

    if config.normalize_scores and isinstance(reward, RewardModel):
        raise ConfigError(
            "normalize_scores: the reward model already normalises its scores with fixed "
            "statistics; a second, running normalisation would drift against kl_coef. Drop it."
        )


def load_prompts(config: Config, store: Store, split: str, cutoff: Any) -> list[Prompt]:
    if config.prompts == "db":  # the conversation's stored split (agent.store.splits)
        return db_prompts(store, split, cutoff=cutoff, sources=config.sources)
    return jsonl_prompts(config.prompts, split)


# ---- checkpoints -------------------------------------------------------------------------


def ptx_conversations(n: int) -> list[list[dict[str, str]]]:
    """The first `n` chitchat conversations of the starter's training split: disjoint from the
    held-out ones the gate's perplexity guard scores (`rl.evaluate.human_replies`)."""
    from agent.starter import StarterConfig, split_conversations
    from agent.tiny import chitchat_conversations

    train, _ = split_conversations(chitchat_conversations(), StarterConfig())
    return train[:n]


def human_rows(tokenizer, config: Config) -> list[tuple[list[int], list[int]]]:
    """(ids, reply mask) of the ptx conversations in the policy's chat template, each cut after
    its last reply within max_prompt_tokens + max_new_tokens tokens."""
    from agent.heldout import encode_replies

    limit = config.max_prompt_tokens + config.max_new_tokens
    rows = [
        encode_replies(tokenizer, c, limit) for c in ptx_conversations(config.ptx_conversations)
    ]
    return [(ids, mask) for ids, mask, _ in rows if any(mask)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("iter-*"))
    return found[-1] if found else None


def save_checkpoint(
    trainer: PPOTrainer, envs: DialogueVectorEnv, run_dir: Path, iteration: int, keep: int
) -> Path:
    """Write a checkpoint atomically: every rank its own state, rank 0 the weights; then rename."""
    acc = trainer.accelerator
    root = run_dir / "checkpoints"
    tmp = root / f".tmp-iter-{iteration:06d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    state = {**trainer.state_dict(), "iteration": iteration, "env": json.dumps(envs.get_state())}
    torch.save(state, tmp / f"state-rank{acc.process_index}.pt")
    acc.wait_for_everyone()
    final = root / f"iter-{iteration:06d}"
    if acc.is_main_process:
        trainer.save(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(root.glob("iter-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load_checkpoint(trainer: PPOTrainer, envs: DialogueVectorEnv, path: Path) -> int:
    """Restore a checkpoint written by `save_checkpoint`; returns its iteration."""
    rank_file = path / f"state-rank{trainer.accelerator.process_index}.pt"
    if not rank_file.is_file():
        raise NotFoundError(
            f"checkpoint {path} has no {rank_file.name}; resume with the same number of processes"
        )
    trainer.load(path)
    state = torch.load(rank_file, weights_only=True)
    trainer.load_state_dict(state)
    envs.set_state(json.loads(state["env"]))
    return int(state["iteration"])


# ---- the job -----------------------------------------------------------------------------


def main(config: Config, settings: Settings, resume: bool = False) -> int:
    """Train; returns the id of the registered `ppo` model version (on every process)."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    acc = Accelerator(cpu=config.device == "cpu" or not torch.cuda.is_available())
    store = Store.open(settings) if acc.is_main_process else None
    acc.wait_for_everyone()  # rank 0 migrates the schema before the others connect
    store = store or Store.open(settings, migrate=False)
    try:
        registry = ModelRegistry(store, settings)
        base, adapters, parent_id = resolve_policy(config.policy, registry)
        reward = load_reward(config.reward, store, acc.device)
        check_normalisation(config, reward)
        run_ctx = (
            training_run(store, settings, "ppo", config, resume=resume)
            if acc.is_main_process
            else nullcontext()
        )
        with run_ctx as run:
            shared = [str(run.dir), run.data_cutoff] if run is not None else [None, None]
            broadcast_object_list(shared)
            run_dir, cutoff = Path(shared[0]), shared[1]
            prompts = load_prompts(config, store, "train", cutoff)
            if run is not None:
                run.record_data(
                    {"messages": [p.message_id for p in prompts if p.message_id is not None]}
                )
            policy = Policy(base, device=acc.device)
            policy.set_adapters(adapters)
            ptx = human_rows(policy.tokenizer, config) if config.ptx_coef > 0 else None
            trainer = PPOTrainer(
                config, policy, acc, value_init=reward_head(reward, policy), ptx_rows=ptx
            )
            envs = DialogueVectorEnv(
                config.num_contexts, prompts, reward, max_turns=config.max_turns
            )
            envs.reset(seed=config.seed + 10_000 * acc.process_index)
            start = _resume(trainer, envs, run_dir) if resume else 0
            _train(config, trainer, envs, run, run_dir, start)
            version_id = _finish(config, settings, store, trainer, reward, run, base, parent_id)
        log.info(
            "rank %d: trainable weights sha256 %s", acc.process_index, trainer.weights_digest()
        )
        return version_id
    finally:
        store.close()


def _resume(trainer: PPOTrainer, envs: DialogueVectorEnv, run_dir: Path) -> int:
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        log.warning("no checkpoint in %s; starting from iteration 0", run_dir)
        return 0
    iteration = load_checkpoint(trainer, envs, checkpoint)
    log.info("resumed from %s (iteration %d)", checkpoint, iteration)
    return iteration


def _train(
    config: Config,
    trainer: PPOTrainer,
    envs: DialogueVectorEnv,
    run: Run | None,
    run_dir: Path,
    start: int,
) -> None:
    """The loop: iterate, log, checkpoint; divergence stops it with the last good checkpoint named."""
    bar = tqdm(
        range(start, config.iterations),
        initial=start,
        total=config.iterations,
        desc="ppo",
        disable=run is None,
    )
    for it in bar:
        try:
            metrics = trainer.train_step(envs)
        except PPODivergedError as exc:
            last = latest_checkpoint(run_dir)
            where = (
                f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            )
            raise PPODivergedError(f"iteration {it + 1}: {exc}; {where}") from exc
        if run is not None:
            run.log(it + 1, metrics)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics['kl/mean']:.2f}")
        if (it + 1) % config.checkpoint_every == 0 or it + 1 == config.iterations:
            save_checkpoint(trainer, envs, run_dir, it + 1, config.keep_checkpoints)


def _finish(
    config: Config,
    settings: Settings,
    store: Store,
    trainer: PPOTrainer,
    reward: BatchScorer | RewardFn,
    run: Run | None,
    base: str,
    parent_id: int | None,
) -> int:
    """Evaluate on held-out contexts, save the adapter and register it (rank 0); share the id."""
    from accelerate.utils import broadcast_object_list

    shared: list[Any] = [None]
    if run is not None:
        metrics = {**run.last_metrics, **_evaluate(config, trainer, reward, store, run)}
        out = trainer.save(run.dir / "final")
        registry = ModelRegistry(store, settings)
        if parent_id is None:
            parent_id = registry.add("base", base, name=Path(base).name)
        shared[0] = registry.add(
            "ppo",
            out,
            name=config.name or f"ppo-run-{run.id}",
            parent_id=parent_id,
            metrics=metrics,
        )
        run.finish(output_version_id=shared[0], metrics=metrics)
    broadcast_object_list(shared)
    return int(shared[0])


def _evaluate(
    config: Config, trainer: PPOTrainer, reward: BatchScorer | RewardFn, store: Store, run: Run
) -> dict[str, float]:
    """Mean score of the policy's and the reference's replies to held-out contexts."""
    prompts = load_prompts(config, store, "validation", run.data_cutoff)[: config.eval_prompts]
    if not prompts:
        return {}
    contexts = [p.messages for p in prompts]
    replies = trainer.generate(contexts)
    with trainer.reference():
        ref_replies = trainer.generate(contexts)
    return {
        "eval/reward_mean": float(score_batch(reward, contexts, replies).mean()),
        "eval/ref_reward_mean": float(score_batch(reward, contexts, ref_replies).mean()),
        "eval/n": float(len(prompts)),
    }
