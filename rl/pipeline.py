"""`rlchat pipeline`: SFT -> reward model -> judge -> PPO -> evaluation -> gate -> deploy.

    splits: {train: 0.6, validation: 0.1, judge: 0.15, test: 0.15}   # agent.store.splits
    sft:    {num_epochs: 3}            # fields of rl.sft.Config
    reward: {num_epochs: 2}            # rl.reward.Config
    judge:  {}                         # rl.reward.Config over `reward` (train_split: judge)
    ppo:    {iterations: 40}           # rl.ppo.Config
    eval:   {oracle: follow_up}        # rl.evaluate.Config (gate bounds included)
    deploy: true                       # act on the gate's decision

Every stage reads the conversations' stored splits (drawn with `splits` for conversations
that have none yet): SFT and the reward model learn from train and select on validation, the
judge learns from judge only, PPO's prompts come from train, the gate's from test. The
evaluation samples with PPO's own rollout configuration unless `eval` sets it.

Each stage is a training run of its own; the pipeline's own run (kind "pipeline") records
the stage results as they finish. After a crash, `--resume` skips the finished stages and
resumes the interrupted one from its last checkpoint: the run that stage opened in this
pipeline, never an older unfinished run of the same kind (a failed `rlchat train reward`
from last week is not the judge of this pipeline).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from tqdm.auto import tqdm

from agent.config import Settings, build_dataclass
from agent.errors import ConfigError
from agent.registry import ModelRegistry
from agent.store.api import Store
from agent.store.models import Conversation
from agent.store.splits import SplitFractions, assign_splits
from rl import evaluate, reward, sft
from rl import ppo as ppo_train
from rl.runs import Run, run_child, training_run

log = logging.getLogger(__name__)

STAGES = ("sft", "reward", "judge", "ppo", "eval", "deploy")
SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p")
"""Fields of PPO's rollout sampling that the evaluation copies (unless `eval` sets them)."""


@dataclass
class Config:
    """One config for the whole loop: a mapping of fields per stage."""

    sft: dict[str, Any] = field(default_factory=dict)
    """Fields of rl.sft.Config."""
    reward: dict[str, Any] = field(default_factory=dict)
    """Fields of rl.reward.Config (policy_version_id is set to the SFT result)."""
    judge: dict[str, Any] = field(default_factory=dict)
    """Fields of rl.reward.Config for the judge, over those of `reward` (train_split: judge)."""
    ppo: dict[str, Any] = field(default_factory=dict)
    """Fields of rl.ppo.Config (policy and reward versions are set by the pipeline)."""
    eval: dict[str, Any] = field(default_factory=dict)
    """Fields of rl.evaluate.Config, gate bounds included (versions are set by the pipeline)."""
    deploy: bool = True
    """Deploy the PPO result when the gate passes (False: evaluate and record only)."""
    splits: dict[str, float] = field(default_factory=dict)
    """Fractions of agent.store.splits.SplitFractions for conversations with no stored split."""
    simulate: dict[str, Any] = field(default_factory=dict)
    """Fields of rl.simulate.Config: each flywheel round's feedback (`--generations N` only)."""
    sources: list[str] = field(default_factory=list)
    """Conversation sources every training stage learns from (chat, arena, simulated, import);
    empty: all, allowed only when the database does not mix real and simulated feedback."""

    def __post_init__(self) -> None:
        self.fractions()
        # Validate every stage's config now, not an hour in, after SFT has trained.
        for stage in ("sft", "reward", "judge", "ppo", "eval"):
            self.stage_config(stage, _links(stage, dict.fromkeys(STAGES, 0), self))

    def fractions(self) -> SplitFractions:
        return build_dataclass(SplitFractions, dict(self.splits))

    def stage_config(self, stage: str, links: dict[str, Any]) -> Any:
        cls = {
            "sft": sft.Config,
            "reward": reward.Config,
            "judge": reward.Config,
            "ppo": ppo_train.Config,
            "eval": evaluate.Config,
        }[stage]
        values = {**self.reward, **self.judge} if stage == "judge" else getattr(self, stage)
        try:
            return build_dataclass(cls, {**values, **links})
        except ConfigError as exc:
            raise ConfigError(f"pipeline {stage}: {exc}") from exc


def _links(stage: str, done: dict[str, Any], config: Config) -> dict[str, Any]:
    """Fields that tie a stage to the results before it."""
    sources = {"sources": config.sources}
    if stage == "sft":
        return sources
    if stage == "reward":
        return {**sources, "policy_version_id": done["sft"], "train_split": "train"}
    if stage == "judge":
        return {**sources, "policy_version_id": done["sft"], "train_split": "judge"}
    if stage == "ppo":
        return {**sources, "policy": str(done["sft"]), "reward": str(done["reward"])}
    if stage == "eval":
        ppo = config.stage_config("ppo", _links("ppo", done, config))
        rollout = {k: getattr(ppo, k) for k in SAMPLING if k not in config.eval}
        return {
            **rollout,
            "candidate": done["ppo"],
            "reward_version": done["reward"],
            "judge_version": done["judge"],
        }
    raise ValueError(f"no stage {stage!r}")


def run_pipeline(
    config: Config, settings: Settings, store: Store, resume: bool = False
) -> dict[str, Any]:
    """Run (or resume) the stages in order; returns what each produced and how long it took."""
    with store.reading() as s:
        conversation_ids = list(s.scalars(select(Conversation.id)))
    assign_splits(store, conversation_ids, config.fractions())  # before any stage reads them
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
            done[stage] = _run_stage(stage, config, settings, store, done, run)
            timings[stage] = time.perf_counter() - start
            store.update_run(run.id, metrics={"stages": done, "seconds": timings})
        run.finish(output_version_id=done["ppo"], metrics={"stages": done, "seconds": timings})
        return {"run_id": run.id, "stages": done, "seconds": timings}


def _run_stage(
    stage: str, config: Config, settings: Settings, store: Store, done: dict[str, Any], run: Run
) -> Any:
    """Run one stage; a training stage records the run it opens on the pipeline's run
    (`metrics["current"]`), and resumes that run, and no other, if an earlier try left it
    unfinished."""
    if stage in ("sft", "reward", "judge", "ppo"):
        module = {"sft": sft, "reward": reward, "judge": reward, "ppo": ppo_train}[stage]
        kind = {"judge": "reward"}.get(stage, stage)
        stage_config = config.stage_config(stage, _links(stage, done, config))
        current = store.get_run(run.id).metrics.get("current", {})
        began = current.get("run") if current.get("stage") == stage else None
        return run_child(
            store,
            kind,
            began,
            remember=lambda opened: store.update_run(
                run.id, metrics={"current": {"stage": stage, "run": opened}}
            ),
            job=lambda resume: module.main(stage_config, settings, resume=resume),
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
    """One line per stage: what it produced, how long it took, and its key numbers."""
    stages, seconds = result["stages"], result["seconds"]
    ev = stages.get("eval", {})
    nan = float("nan")

    def num(key: str) -> float:
        value = ev.get(key)
        return nan if value is None else float(value)

    oracle = (
        f", oracle {num('oracle/baseline'):.3f} -> {num('oracle/candidate'):.3f}"
        if "oracle/candidate" in ev
        else ""
    )
    rows = [
        ("sft", f"version {stages.get('sft')}", ""),
        (
            "reward",
            f"version {stages.get('reward')}",
            f"test acc {num('reward/test_accuracy'):.3f}",
        ),
        ("judge", f"version {stages.get('judge')}", f"test acc {num('judge/test_accuracy'):.3f}"),
        ("ppo", f"version {stages.get('ppo')}", f"KL {num('kl/k3_per_token'):.4f} nats/token (k3)"),
        (
            "eval",
            f"run {ev.get('run_id')}",
            f"judge win-rate {num('win_rate/judge'):.3f} [{num('win_rate/judge_lo'):.3f}, "
            f"{num('win_rate/judge_hi'):.3f}], LC {num('win_rate/judge_lc'):.3f}{oracle}",
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
