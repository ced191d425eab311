"""The pipeline's config: one stored split, PPO's sampling for the gate, the flywheel's checks."""

from __future__ import annotations

import pytest

from agent.config import Settings
from agent.errors import ConfigError
from agent.store.api import Store
from rl import flywheel, pipeline


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
