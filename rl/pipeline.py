"""`rlchat pipeline`: SFT -> reward model -> PPO -> evaluation -> gate -> deploy, from one config.

    sft:    {num_epochs: 3}            # fields of rl.sft.Config
    reward: {num_epochs: 2}            # rl.reward.Config
    ppo:    {iterations: 40}           # rl.ppo_train.Config
    eval:   {oracle: follow_up}        # rl.evaluate.Config (gate bounds included)
    deploy: true                       # act on the gate's decision

Each stage is a training run of its own; the pipeline's own run (kind "pipeline") records
the stage results as they finish. After a crash, `--resume` skips the finished stages and
resumes the interrupted one from its last checkpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from agent.config import Settings, build_dataclass
from agent.errors import ConfigError
from agent.registry import ModelRegistry
from agent.store.api import Store
from rl import evaluate, reward, sft
from rl import ppo as ppo_train
from rl.runs import training_run

log = logging.getLogger(__name__)

STAGES = ("sft", "reward", "ppo", "eval", "deploy")


@dataclass
class Config:
    """One config for the whole loop: a mapping of fields per stage."""

    sft: dict[str, Any] = field(default_factory=dict)
    """Fields of rl.sft.Config."""
    reward: dict[str, Any] = field(default_factory=dict)
    """Fields of rl.reward.Config (policy_version_id is set to the SFT result)."""
    ppo: dict[str, Any] = field(default_factory=dict)
    """Fields of rl.ppo_train.Config (policy and reward versions are set by the pipeline)."""
    eval: dict[str, Any] = field(default_factory=dict)
    """Fields of rl.evaluate.Config, gate bounds included (candidate and reward are set)."""
    deploy: bool = True
    """Deploy the PPO result when the gate passes (False: evaluate and record only)."""
    heldout_fraction: float = 0.2
    """Share of conversations every stage holds out (one split for the whole loop)."""
    split_seed: int = 0
    """Seed of that split (and of each stage)."""

    def __post_init__(self) -> None:
        # Validate every stage's config now, not an hour in, after SFT has trained.
        for stage in ("sft", "reward", "ppo", "eval"):
            self.stage_config(stage, _links(stage, dict.fromkeys(STAGES, 0), self))

    def stage_config(self, stage: str, links: dict[str, Any]) -> Any:
        cls = {
            "sft": sft.Config,
            "reward": reward.Config,
            "ppo": ppo_train.Config,
            "eval": evaluate.Config,
        }[stage]
        values = {**getattr(self, stage), **links}
        try:
            return build_dataclass(cls, values)
        except ConfigError as exc:
            raise ConfigError(f"pipeline {stage}: {exc}") from exc


def _links(stage: str, done: dict[str, Any], config: Config) -> dict[str, Any]:
    """Fields that tie a stage to the results before it, and one held-out split for all."""
    split = {"heldout_fraction": config.heldout_fraction}
    if stage == "ppo":
        split["split_seed"] = config.split_seed
    else:
        split["seed"] = config.split_seed
    if stage == "reward":
        return {**split, "policy_version_id": done["sft"]}
    if stage == "ppo":
        return {**split, "policy": str(done["sft"]), "reward": str(done["reward"])}
    if stage == "eval":
        return {**split, "candidate": done["ppo"], "reward_version": done["reward"]}
    return split


def run_pipeline(
    config: Config, settings: Settings, store: Store, resume: bool = False
) -> dict[str, Any]:
    """Run (or resume) the stages in order; returns what each produced and how long it took."""
    with training_run(store, settings, "pipeline", config, resume=resume) as run:
        done: dict[str, Any] = dict(store.get_run(run.id).metrics.get("stages", {}))
        timings: dict[str, float] = dict(store.get_run(run.id).metrics.get("seconds", {}))
        bar = tqdm(STAGES, desc="pipeline", unit="stage")
        for stage in bar:
            bar.set_postfix_str(stage)
            if stage in done:
                log.info("pipeline: %s already done (%s), skipping", stage, done[stage])
                continue
            start = time.perf_counter()
            done[stage] = _run_stage(stage, config, settings, store, done, resume)
            timings[stage] = time.perf_counter() - start
            store.update_run(run.id, metrics={"stages": done, "seconds": timings})
        run.finish(output_version_id=done["ppo"], metrics={"stages": done, "seconds": timings})
        return {"run_id": run.id, "stages": done, "seconds": timings}


def _run_stage(
    stage: str, config: Config, settings: Settings, store: Store, done: dict[str, Any], resume: bool
) -> Any:
    if stage in ("sft", "reward", "ppo"):
        module = {"sft": sft, "reward": reward, "ppo": ppo_train}[stage]
        return module.main(
            config.stage_config(stage, _links(stage, done, config)), settings, resume=resume
        )
    if stage == "eval":
        eval_config = config.stage_config("eval", _links("eval", done, config))
        run_id, metrics = evaluate.run_recorded(eval_config, store, settings)
        return {"run_id": run_id, **{k: v for k, v in metrics.items() if k != "samples"}}
    decision = done["eval"]["gate"]
    if decision["deploy"] and config.deploy:
        ModelRegistry(store, settings).deploy(done["ppo"])
        return {"deployed": done["ppo"]}
    why = "deploy: false in the config" if decision["deploy"] else "; ".join(decision["reasons"])
    return {"deployed": None, "refused": why}


def summary_table(result: dict[str, Any]) -> str:
    stages, seconds = result["stages"], result["seconds"]
    ev = stages.get("eval", {})
    rows = [
        ("sft", f"version {stages.get('sft')}", ""),
        (
            "reward",
            f"version {stages.get('reward')}",
            f"held-out acc {ev.get('reward_model/accuracy', float('nan')):.3f}",
        ),
        ("ppo", f"version {stages.get('ppo')}", f"KL {ev.get('kl/candidate', float('nan')):.2f}"),
        (
            "eval",
            f"run {ev.get('run_id')}",
            f"win-rate {ev.get('win_rate/reward', float('nan')):.3f}"
            + (
                f", oracle {ev['oracle/baseline']:.3f} -> {ev['oracle/candidate']:.3f}"
                if "oracle/candidate" in ev
                else ""
            ),
        ),
        (
            "deploy",
            str(stages.get("deploy", {}).get("deployed")),
            stages.get("deploy", {}).get("refused", ""),
        ),
    ]
    lines = [f"{'stage':<8} {'result':<14} {'seconds':>8}  notes"]
    lines += [f"{s:<8} {r:<14} {seconds.get(s, 0.0):>8.1f}  {n}" for s, r, n in rows]
    return "\n".join(lines)
