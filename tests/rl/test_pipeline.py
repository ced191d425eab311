"""The pipeline's config: one stored split, PPO's sampling for the gate, the flywheel's checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.config import Settings
from agent.errors import ConfigError
from agent.registry import ModelRegistry
from agent.store.api import Store
from rl import flywheel, pipeline
from rl.runs import training_run


def test_eval_samples_with_ppos_rollout_configuration_unless_told_otherwise() -> None:
    config = pipeline.Config(ppo={"max_new_tokens": 17, "temperature": 0.9})
    done = {"sft": 1, "reward": 2, "judge": 3, "ppo": 4}
    ev = config.stage_config("eval", pipeline._links("eval", done, config))
    assert (ev.max_new_tokens, ev.temperature) == (17, 0.9)
    assert (ev.candidate, ev.reward_version, ev.judge_version) == (4, 2, 3)
    own = pipeline.Config(ppo={"max_new_tokens": 17}, eval={"max_new_tokens": 9})
    assert own.stage_config("eval", pipeline._links("eval", done, own)).max_new_tokens == 9


def test_the_judge_learns_from_the_judge_split_with_the_reward_fields() -> None:
    config = pipeline.Config(reward={"num_epochs": 4}, judge={"learning_rate": 1e-3})
    done = {"sft": 1}
    judge = config.stage_config("judge", pipeline._links("judge", done, config))
    reward = config.stage_config("reward", pipeline._links("reward", done, config))
    assert (judge.train_split, reward.train_split) == ("judge", "train")
    assert judge.num_epochs == 4 and judge.learning_rate == 1e-3
    assert reward.learning_rate != 1e-3


def test_config_fails_fast_on_splits_and_sources() -> None:
    with pytest.raises(Exception, match="sum to 1"):
        pipeline.Config(splits={"train": 0.9, "test": 0.9})
    config = pipeline.Config(sources=["simulated"])
    assert config.stage_config("sft", pipeline._links("sft", {}, config)).sources == ["simulated"]


def test_the_flywheel_needs_a_simulate_section(
    sqlite_store: Store, sqlite_settings: Settings
) -> None:
    with pytest.raises(ConfigError, match="simulate"):
        flywheel.run_flywheel(pipeline.Config(), sqlite_settings, sqlite_store, 2)
    with pytest.raises(ConfigError, match="generations"):
        flywheel.run_flywheel(
            pipeline.Config(simulate={"users": 2}), sqlite_settings, sqlite_store, 0
        )
    rounds = [flywheel.simulate_config(pipeline.Config(simulate={"seed": 3}), g) for g in (1, 2)]
    assert rounds[0].seed != rounds[1].seed


@pytest.fixture
def tiny_flywheel(
    sqlite_store: Store, sqlite_settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> tuple[int, pipeline.Config]:
    """The tiny model deployed and a flywheel config small enough for a test: (start, config)."""
    store, settings, model_dir = sqlite_store, sqlite_settings, tiny_model_dir
    registry = ModelRegistry(store, settings)
    start = registry.add("base", model_dir)
    registry.deploy(start)
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": f"tell me about thing number {i}"} for i in range(80)]
    prompts.write_text("\n".join(json.dumps(line) for line in lines))
    steps = {"max_steps": 2, "eval_steps": 1, "save_steps": 1, "batch_size": 4, "device": "cpu"}
    config = pipeline.Config(
        splits={"train": 0.4, "validation": 0.2, "judge": 0.2, "test": 0.2},
        sources=["simulated"],
        simulate={
            "oracle": "concise",
            "users": 30,
            "turns": 1,
            "replies": 2,
            "annotators": 2,
            "overlap": 2,
            "noise": 0.0,
            "prompts": str(prompts),
            "max_new_tokens": 8,
        },
        sft={**steps, "min_examples": 1},
        reward={**steps, "min_pairs": 1, "early_stopping_patience": 0, "max_length": 128},
        ppo={
            "iterations": 2,
            "batch_size": 4,
            "mini_batch_size": 2,
            "max_new_tokens": 8,
            "checkpoint_every": 1,
            "eval_prompts": 0,
            "device": "cpu",
        },
        eval={
            "oracle": "concise",
            "human_replies": 2,
            "samples_per_prompt": 1,
            "num_prompts": 8,
            "bootstrap": 100,
            "device": "cpu",
        },
    )
    return start, config


@pytest.mark.slow
def test_two_flywheel_generations_each_gated_against_the_policy_serving_then(
    sqlite_store: Store, sqlite_settings: Settings, tiny_flywheel: tuple[int, pipeline.Config]
) -> None:
    start, config = tiny_flywheel
    result = flywheel.run_flywheel(config, sqlite_settings, sqlite_store, 2)
    first, second = result["generations"]
    assert first["serving_before"] == start
    assert second["serving_before"] == first["serving_after"]  # the next round goes on from it
    for row in (first, second):
        deployed = row["verdict"] == "deploy"
        assert row["serving_after"] == (row["candidate"] if deployed else row["serving_before"])
        assert deployed == (not row["reasons"])
        assert row["feedback"]["conversations"] == 30
        assert "win_rate/oracle_lo" in row and "win_rate/judge_lo" in row
        ev = sqlite_store.get_run(row["eval_run"]).metrics
        assert ev["baseline"] == row["serving_before"] and ev["candidate"] == row["candidate"]
    (run,) = sqlite_store.list_runs("flywheel")
    assert run.status == "succeeded" and len(run.metrics["generations"]) == 2
    assert len(sqlite_store.list_runs("pipeline")) == 2
    table = flywheel.summary_table(result).splitlines()
    rows = [line for line in table[1:] if not line.strip().startswith("refused:")]
    assert [line.split()[3] for line in rows] == [first["verdict"], second["verdict"]]
    assert len(table) == 3 + len(first["reasons"]) + len(second["reasons"])


@pytest.mark.slow
def test_a_flywheel_that_crashed_mid_round_resumes_where_it_stopped(
    sqlite_store: Store,
    sqlite_settings: Settings,
    tiny_flywheel: tuple[int, pipeline.Config],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Round 2 crashes in its evaluation; `resume` keeps round 1, does not gather round 2's
    feedback again, resumes round 2's pipeline (its trained stages skipped) and finishes."""
    _, config = tiny_flywheel
    real_eval = pipeline.evaluate.run_recorded
    evals = []

    def crash_in_the_second_eval(*args, **kwargs):  # type: ignore[no-untyped-def]
        evals.append(1)
        if len(evals) == 2:
            raise RuntimeError("the machine went away")
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(pipeline.evaluate, "run_recorded", crash_in_the_second_eval)
    with pytest.raises(RuntimeError, match="went away"):
        flywheel.run_flywheel(config, sqlite_settings, sqlite_store, 2)
    (crashed,) = sqlite_store.list_runs("flywheel")
    assert crashed.status == "failed" and len(crashed.metrics["generations"]) == 1
    assert crashed.metrics["round"]["generation"] == 2
    first = crashed.metrics["generations"][0]
    trained = {kind: len(sqlite_store.list_runs(kind)) for kind in ("sft", "reward", "ppo")}

    result = flywheel.run_flywheel(config, sqlite_settings, sqlite_store, 2, resume=True)
    (run,) = sqlite_store.list_runs("flywheel")
    assert run.id == crashed.id and run.status == "succeeded"
    assert result["generations"][0] == first
    second = result["generations"][1]
    assert second["generation"] == 2 and second["serving_before"] == first["serving_after"]
    assert second["feedback"]["conversations"] == 30
    assert sqlite_store.counts()["conversations"] == 60  # round 2's feedback was gathered once
    assert len(sqlite_store.list_runs("pipeline")) == 2  # round 2's pipeline was resumed
    assert {k: len(sqlite_store.list_runs(k)) for k in trained} == trained  # nothing retrained
    assert sqlite_store.get_run(second["pipeline_run"]).status == "succeeded"
    assert second["serving_after"] == (
        second["candidate"] if second["verdict"] == "deploy" else second["serving_before"]
    )


@pytest.mark.slow
def test_a_resumed_stage_never_reopens_an_older_unfinished_run_of_its_kind(
    sqlite_store: Store,
    sqlite_settings: Settings,
    tiny_flywheel: tuple[int, pipeline.Config],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reward run that failed long before (say a standalone `rlchat train reward`) is not
    this pipeline's judge: the judge stage crashed before it opened its run, so the resume
    starts the judge afresh on this round's data, and the old run stays as it was."""
    _, config = tiny_flywheel
    with pytest.raises(RuntimeError), training_run(sqlite_store, sqlite_settings, "reward", {}):
        raise RuntimeError("an old reward run that failed")
    (stale,) = sqlite_store.list_runs("reward")
    real_main = pipeline.reward.main
    judges = []

    def crash_before_the_first_judge(cfg, *args, **kwargs):  # type: ignore[no-untyped-def]
        if cfg.train_split == "judge":
            judges.append(1)
            if len(judges) == 1:
                raise RuntimeError("the machine went away")
        return real_main(cfg, *args, **kwargs)

    monkeypatch.setattr(pipeline.reward, "main", crash_before_the_first_judge)
    with pytest.raises(RuntimeError, match="went away"):
        flywheel.run_flywheel(config, sqlite_settings, sqlite_store, 1)
    result = flywheel.run_flywheel(config, sqlite_settings, sqlite_store, 1, resume=True)
    assert sqlite_store.get_run(stale.id).status == "failed"  # not reopened
    stages = sqlite_store.get_run(result["generations"][0]["pipeline_run"]).metrics["stages"]
    (judge_run,) = [
        r for r in sqlite_store.list_runs("reward") if r.output_version_id == stages["judge"]
    ]
    assert judge_run.id > stale.id and judge_run.status == "succeeded"
