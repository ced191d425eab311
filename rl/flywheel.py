"""`rlchat pipeline --generations N`: the flywheel, N rounds of the whole loop.

Each round: simulated users chat with the policy deployed *now* and annotators judge the new
replies (the pipeline config's `simulate` section) → `rl.pipeline.run_pipeline` on all the
feedback gathered so far (SFT from the deployed policy → reward model → judge → PPO → eval
against the deployed policy → gate → deploy). A round the gate refuses leaves the previous
policy serving, and the next round goes on from it.

Every round is a pipeline run of its own; the flywheel's run (kind "flywheel") records per
generation the policy that served at the start, the candidate, the verdict and the eval's
numbers, so the dashboard can draw the lineage.

After a crash, `resume=True` (`rlchat pipeline --generations N --resume`) reopens the newest
unfinished flywheel run and carries on: the finished generations stay as recorded, a round
whose feedback was gathered resumes its pipeline (finished stages skipped, the interrupted one
from its checkpoint), and the remaining rounds up to N follow. A round that crashed while
simulating gathers its feedback again from the start; the conversations the crashed attempt
stored stay in the store and count as feedback like any other.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from agent.chat import ChatAgent
from agent.config import Settings, build_dataclass
from agent.errors import ConfigError, NotFoundError
from agent.store.api import Store
from rl import pipeline, simulate
from rl.runs import run_child, training_run

log = logging.getLogger(__name__)

KEPT = (
    "win_rate/oracle",
    "win_rate/oracle_lo",
    "win_rate/oracle_hi",
    "oracle/candidate",
    "oracle/baseline",
    "win_rate/judge",
    "win_rate/judge_lo",
    "win_rate/judge_hi",
    "win_rate/judge_lc",
    "kl/k3_per_token",
    "length/words/candidate",
    "human/perplexity/candidate",
)
"""The eval numbers a generation keeps in the flywheel's summary (all are on its eval run)."""


def simulate_config(config: pipeline.Config, generation: int) -> simulate.Config:
    """The round's simulation: the config's `simulate` section, its seed moved on per round."""
    if not config.simulate:
        raise ConfigError(
            "simulate: the flywheel needs a `simulate` section (fields of rl.simulate.Config) "
            "to gather each round's feedback from the deployed policy"
        )
    values = dict(config.simulate)
    values["seed"] = int(values.get("seed", 0)) + 1000 * generation
    return build_dataclass(simulate.Config, values)


def run_flywheel(
    config: pipeline.Config,
    settings: Settings,
    store: Store,
    generations: int,
    resume: bool = False,
) -> dict[str, Any]:
    """`generations` rounds of simulate → pipeline; returns one summary row per generation.

    With `resume`, the newest unfinished flywheel run goes on from where it stopped.
    """
    if generations < 1:
        raise ConfigError(f"generations: must be >= 1, got {generations}")
    simulate_config(config, 0)  # fail now, not after the first round
    with training_run(store, settings, "flywheel", config, resume=resume) as run:
        recorded = store.get_run(run.id).metrics
        rows: list[dict[str, Any]] = list(recorded.get("generations", []))
        current: dict[str, Any] = dict(recorded.get("round", {}))
        if rows:
            log.info("flywheel: generations 1-%d already done, carrying on", len(rows))
        for generation in range(len(rows) + 1, generations + 1):
            if current.get("generation") != generation:
                current = _gather(config, settings, store, generation)
                store.update_run(run.id, metrics={"generations": rows, "round": current})
            rows.append(_finish_round(config, settings, store, run.id, current))
            store.update_run(run.id, metrics={"generations": rows})
        run.finish(output_version_id=_serving(store), metrics={"generations": rows})
    return {"run_id": run.id, "generations": rows}


def _serving(store: Store) -> int:
    deployed = store.deployed_version()
    if deployed is None:
        raise NotFoundError("nothing is deployed: the flywheel starts from the deployed policy")
    return deployed.id


def _gather(
    config: pipeline.Config, settings: Settings, store: Store, generation: int
) -> dict[str, Any]:
    """The round's first half: feedback on the policy serving now (what a resume skips)."""
    start = time.perf_counter()
    parent = _serving(store)
    log.info("flywheel generation %d: gathering feedback on version %d", generation, parent)
    agent = ChatAgent(store, settings, device=config.eval.get("device", "auto"))
    gathered = simulate.simulate(simulate_config(config, generation), store, agent, settings)
    del agent  # the pipeline loads its own models
    return {
        "generation": generation,
        "serving_before": parent,
        "feedback": {k: v for k, v in gathered.items() if k != "oracle"},
        "simulate_seconds": time.perf_counter() - start,
    }


def _finish_round(
    config: pipeline.Config,
    settings: Settings,
    store: Store,
    flywheel_run: int,
    gathered: dict[str, Any],
) -> dict[str, Any]:
    """The round's second half: the pipeline on all the feedback so far. It resumes the
    round's pipeline run if an earlier try left it unfinished, or takes the result of one that
    finished just before a crash; the run's id is kept on the flywheel's run as it opens."""
    began = gathered.get("pipeline_run")
    if began is not None and store.get_run(began).status == "succeeded":
        metrics = store.get_run(began).metrics
        result = {"run_id": began, "stages": metrics["stages"], "seconds": metrics["seconds"]}
        return _summary_row(store, gathered, result)

    def remember(opened: int) -> None:
        gathered["pipeline_run"] = opened
        store.update_run(flywheel_run, metrics={"round": gathered})

    result = run_child(
        store,
        "pipeline",
        began,
        remember,
        job=lambda resume: pipeline.run_pipeline(config, settings, store, resume=resume),
    )
    return _summary_row(store, gathered, result)


def _summary_row(store: Store, gathered: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """A finished generation: who served, the candidate, the verdict and the eval's numbers."""
    stages = result["stages"]
    ev = stages["eval"]
    return {
        "generation": gathered["generation"],
        "serving_before": gathered["serving_before"],
        "candidate": stages["ppo"],
        "deployed": stages["deploy"].get("deployed"),
        "serving_after": _serving(store),
        "verdict": "deploy" if ev["gate"]["deploy"] else "refuse",
        "reasons": ev["gate"]["reasons"],
        "pipeline_run": result["run_id"],
        "eval_run": ev["run_id"],
        "feedback": gathered["feedback"],
        **{k: ev[k] for k in KEPT if k in ev},
        "seconds": gathered["simulate_seconds"] + sum(result["seconds"].values()),
    }


def summary_table(result: dict[str, Any]) -> str:
    """One line per generation: who served, the candidate, the verdict, the oracle win-rate."""
    lines = [
        f"{'gen':>3} {'served':>6} {'cand':>5} {'verdict':<8} {'oracle win-rate vs served':<28} "
        f"{'judge win-rate':<24} {'seconds':>7}"
    ]
    for row in result["generations"]:
        oracle = (
            f"{row['win_rate/oracle']:.3f} [{row['win_rate/oracle_lo']:.3f}, "
            f"{row['win_rate/oracle_hi']:.3f}]"
            if "win_rate/oracle" in row
            else "-"
        )
        judge = (
            f"{row['win_rate/judge']:.3f} [{row['win_rate/judge_lo']:.3f}, "
            f"{row['win_rate/judge_hi']:.3f}]"
        )
        lines.append(
            f"{row['generation']:>3} {row['serving_before']:>6} {row['candidate']:>5} "
            f"{row['verdict']:<8} {oracle:<28} {judge:<24} {row['seconds']:>7.0f}"
        )
        lines += [f"      refused: {reason}" for reason in row["reasons"]]
    return "\n".join(lines)
