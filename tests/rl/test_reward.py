"""The reward model job and scoring API on a synthetic DB whose raters like replies that ask back."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from synthetic import fill_synthetic_feedback
from transformers import TrainerCallback

from agent.config import Settings
from agent.errors import ConfigError, ValidationError
from agent.store.api import Store
from agent.store.splits import SplitFractions, assign_splits
from rl import reward
from rl.reward_model import STATS_FILE, RewardModel, pooling_of, set_pooling

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/rl/conftest.py


def fast_config(base: Path, **overrides: Any) -> reward.Config:
    values: dict[str, Any] = dict(
        base_model=str(base),
        learning_rate=1e-3,
        num_epochs=4,
        batch_size=8,
        eval_steps=5,
        save_steps=5,
        logging_steps=5,
        lora_r=8,
        lora_alpha=16,
        max_length=256,
        early_stopping_patience=3,
    )
    return reward.Config(**{**values, **overrides})


@pytest.fixture(scope="module")
def feedback_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, dict[str, Any]]:
    """A synthetic feedback DB (50 conversations), shared by the training tests of this module."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("reward") / "data")
    store = Store.open(settings)
    info = fill_synthetic_feedback(store, 50, seed=0)
    ids = {store.get_message(m).conversation_id for m in info["good"]}
    assign_splits(store, ids, SplitFractions(train=0.5, validation=0.2, judge=0.1, test=0.2))
    store.close()
    return settings, info


@pytest.fixture(scope="module")
def trained(feedback_db: tuple[Settings, dict[str, Any]], tiny_model_dir: Path) -> dict[str, Any]:
    """One uninterrupted reward run: its version, run row and wall time."""
    settings, _ = feedback_db
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    version_id = reward.main(fast_config(tiny_model_dir), settings)
    seconds = time.perf_counter() - started
    torch.set_num_threads(threads)
    store = Store.open(settings)
    version = store.get_model_version(version_id)
    run = store.get_run(version.metrics["run_id"])
    store.close()
    return {"version": version, "run": run, "seconds": seconds}


@pytest.mark.slow
def test_reward_model_learns_the_raters_rule(trained: dict[str, Any]) -> None:
    version, run = trained["version"], trained["run"]
    assert trained["seconds"] < 60
    assert version.kind == "reward" and version.status == "candidate"
    assert version.metrics["eval/pairwise_accuracy"] >= 0.9
    assert version.metrics["eval/pairs"] >= 8
    assert version.metrics["eval/mean_margin"] > 0
    assert 0 <= version.metrics["eval/ece"] <= 0.5
    assert version.metrics["perf/pairs_per_s"] > 0
    # Selected on validation, reported on test: pairs no stage trained or selected on.
    assert version.metrics["test/pairs"] >= 8 and version.metrics["test/pairwise_accuracy"] >= 0.8
    assert version.metrics["data/train_split"] == "train"
    assert run.status == "succeeded" and run.output_version_id == version.id
    assert run.data_ids["pairs"] and run.data_ids["heldout_conversations"]
    assert "eval/pairwise_accuracy" in run.metrics  # logged during training too
    assert list((Path(run.log_path) / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_saved_reward_model_scores_held_out_replies(
    trained: dict[str, Any], feedback_db: tuple[Settings, dict[str, Any]]
) -> None:
    settings, info = feedback_db
    version, run = trained["version"], trained["run"]
    assert (Path(version.path) / STATS_FILE).is_file()
    rm = RewardModel.load(version.path, device="cpu")
    assert rm.mean == pytest.approx(version.metrics["reference/mean"])
    store = Store.open(settings)
    pairs = run.data_ids["heldout_pairs"]
    contexts, chosen, rejected = [], [], []
    for good_id, bad_id in pairs:
        path = store.path(good_id)
        contexts.append(
            [
                {
                    "role": "system",
                    "content": store.get_conversation(path[0].conversation_id).system_prompt,
                }
            ]
            + [{"role": m.role, "content": m.content} for m in path[:-1]]
        )
        chosen.append(path[-1].content)
        rejected.append(store.get_message(bad_id).content)
    store.close()
    assert {g for g, _ in pairs} <= set(info["good"])
    good = rm.score(contexts, chosen, batch_size=3)
    bad = rm.score(contexts, rejected, batch_size=3)
    accuracy = (good > bad).float().mean().item()
    assert accuracy == pytest.approx(version.metrics["eval/pairwise_accuracy"], abs=1e-6)
    raw = rm.score(contexts, chosen, normalize=False, batch_size=len(chosen))
    assert torch.allclose((raw - rm.mean) / rm.std, good, atol=1e-4)  # batching does not matter
    assert good.dtype == torch.float32 and good.shape == (len(pairs),)


class CrashAt(TrainerCallback):
    """Simulate a crash (e.g. a killed process) after `step` optimiser steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


class FirstStep(TrainerCallback):
    def __init__(self) -> None:
        self.first: int | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.first = state.global_step if self.first is None else self.first


@pytest.mark.slow
def test_killed_and_resumed_run_matches_an_uninterrupted_one(
    trained: dict[str, Any], feedback_db: tuple[Settings, dict[str, Any]], tiny_model_dir: Path
) -> None:
    settings, _ = feedback_db
    config = fast_config(tiny_model_dir)
    with pytest.raises(RuntimeError, match="simulated crash"):
        reward.main(config, settings, callbacks=[CrashAt(7)])
    store = Store.open(settings)
    crashed = store.list_runs("reward")[-1]
    assert crashed.status == "failed" and "simulated crash" in crashed.error
    first = FirstStep()
    version_id = reward.main(config, settings, resume=True, callbacks=[first])
    resumed = store.get_model_version(version_id)
    run = store.get_run(resumed.metrics["run_id"])
    store.close()
    assert run.id == crashed.id and run.status == "succeeded"
    assert first.first == 6  # continued after the checkpoint at step 5
    reference = trained["version"].metrics
    assert resumed.metrics["eval/pairwise_accuracy"] == pytest.approx(
        reference["eval/pairwise_accuracy"], abs=0.05
    )
    assert resumed.metrics["eval/mean_margin"] == pytest.approx(
        reference["eval/mean_margin"], rel=0.1
    )


@pytest.mark.slow
def test_full_fine_tuning_saves_a_loadable_model(
    feedback_db: tuple[Settings, dict[str, Any]], tiny_model_dir: Path
) -> None:
    settings, _ = feedback_db
    config = fast_config(
        tiny_model_dir, lora=False, learning_rate=1e-4, max_steps=6, eval_steps=3, save_steps=3
    )
    store = Store.open(settings)
    version = store.get_model_version(reward.main(config, settings))
    store.close()
    rm = RewardModel.load(version.path, device="cpu")
    assert not any("lora" in name for name, _ in rm.model.named_parameters())
    context = [{"role": "user", "content": "How was your day?"}]
    assert rm.score([context, context], ["Fine. And yours?", "Fine."]).shape == (2,)


def test_too_little_data_is_a_clear_error(sqlite_settings: Settings, tiny_model_dir: Path) -> None:
    with pytest.raises(ValidationError, match=r"need at least 16 preference pairs .* found 0"):
        reward.main(fast_config(tiny_model_dir), sqlite_settings)
    store = Store.open(sqlite_settings)
    fill_synthetic_feedback(store, 4, seed=1)
    assert store.list_runs("reward")[-1].status == "failed"
    store.close()
    with pytest.raises(ValidationError, match=r"need at least 16 preference pairs .* found [1-9]"):
        reward.main(fast_config(tiny_model_dir), sqlite_settings)


def test_score_checks_its_inputs(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(Exception, match="reward_stats.json"):
        RewardModel.load(tiny_model_dir)
    from transformers import AutoModelForSequenceClassification

    from agent.modeling import load_tokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    rm = RewardModel(model, load_tokenizer(tiny_model_dir), mean=1.0, std=2.0, max_length=64)
    context = [{"role": "user", "content": "hello there"}]
    with pytest.raises(ValidationError, match="replies"):
        rm.score([context], ["a", "b"])
    saved = RewardModel.load(rm.save(tmp_path / "rm"))
    assert (saved.mean, saved.std, saved.max_length) == (1.0, 2.0, 64)
    long_reply = "word " * 200
    scores = saved.score([context, context], ["short", long_reply])
    assert scores.shape == (2,) and torch.isfinite(scores).all()  # cut to max_length, not failing


def test_reward_model_starts_from_the_deployed_policy(
    sqlite_settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model

    from agent.modeling import load_base
    from agent.registry import ModelRegistry
    from rl.sft import starting_point

    model, _ = load_base(tiny_model_dir, device="cpu")
    adapter = get_peft_model(
        model,
        LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False, task_type="CAUSAL_LM"),
    )
    adapter.save_pretrained(str(tmp_path / "adapter"))
    store = Store.open(sqlite_settings)
    registry = ModelRegistry(store, sqlite_settings)
    base_id = registry.add("base", tiny_model_dir)
    sft_id = registry.add("sft", tmp_path / "adapter", parent_id=base_id)
    registry.deploy(sft_id)
    start = starting_point(store, sqlite_settings, reward.Config())
    store.close()
    assert (start.version_id, start.base_version_id, len(start.adapters)) == (sft_id, base_id, 1)
    cpu = torch.device("cpu")
    merged = reward.build_model(start, reward.Config(init_from="policy"), cpu)[0]
    assert all(p.requires_grad for p in merged.parameters())  # full training can train them
    from_policy = merged.state_dict()
    from_base = reward.build_model(start, reward.Config(init_from="base"), cpu)[0].state_dict()
    layer = "model.layers.0.self_attn"
    assert not torch.equal(
        from_policy[f"{layer}.q_proj.weight"], from_base[f"{layer}.q_proj.weight"]
    )
    assert torch.equal(from_policy[f"{layer}.k_proj.weight"], from_base[f"{layer}.k_proj.weight"])
    assert not any("lora" in key for key in from_policy)  # merged, not stacked


def test_cli_prints_the_too_little_data_error(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from rlchat.cli import main

    argv = [
        "--data-dir",
        str(tmp_path / "data"),
        "--database-url",
        f"sqlite:///{tmp_path / 'x.db'}",
    ]
    code = main([*argv, "train", "reward", "--set", f"base_model={tiny_model_dir}"])
    assert code == 2
    assert "need at least 16 preference pairs to train a reward model" in capsys.readouterr().err


def test_mean_pooling_reads_the_mean_of_every_tokens_score(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    import copy

    from transformers import AutoModelForSequenceClassification

    from agent.modeling import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    plain = copy.deepcopy(model)  # the same weights, read at the last token
    rm = RewardModel(set_pooling(model, "mean"), tokenizer)
    contexts = [[{"role": "user", "content": "hello there"}]] * 3
    replies = ["short", "a much longer reply with many words in it", "mid length one"]

    def expected(context: list[dict[str, str]], reply: str) -> float:
        ids = torch.tensor([rm.encode(context, reply)])  # (1, T)
        with torch.no_grad():
            hidden = plain.base_model(ids).last_hidden_state  # (1, T, H)
            return plain.score(hidden.mean(1)).item()

    batched = rm.score(contexts, replies, normalize=False)  # right-padded to the longest
    assert batched.tolist() == pytest.approx(
        [expected(c, r) for c, r in zip(contexts, replies, strict=True)], abs=1e-6
    )
    last = RewardModel(plain, tokenizer).score(contexts, replies, normalize=False)
    assert not torch.allclose(batched, last)

    saved = RewardModel.load(rm.save(tmp_path / "rm"))
    assert pooling_of(saved.model) == "mean"
    assert torch.allclose(saved.score(contexts, replies, normalize=False), batched, atol=1e-5)
    assert (
        pooling_of(RewardModel.load(RewardModel(plain, tokenizer).save(tmp_path / "last")).model)
        == "last"
    )


def test_an_unknown_pooling_fails_at_start_up(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="pooling: 'max' is not one of last, mean"):
        fast_config(tiny_model_dir, pooling="max")


@pytest.mark.slow
def test_a_mean_pooled_reward_model_learns_through_lora(
    feedback_db: tuple[Settings, dict[str, Any]], tiny_model_dir: Path
) -> None:
    settings, _ = feedback_db
    store = Store.open(settings)
    version = store.get_model_version(
        reward.main(fast_config(tiny_model_dir, pooling="mean"), settings)
    )
    store.close()
    rm = RewardModel.load(version.path, device="cpu")
    assert pooling_of(rm.model) == "mean"
    # Scored mean-pooled after training: high only if LoRA trained the mean-pooled score.
    assert version.metrics["eval/pairwise_accuracy"] >= 0.9
    assert version.metrics["test/pairwise_accuracy"] >= 0.8
