"""`rlchat train ppo`: the job end to end on a tiny model, checkpoints and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from synthetic import fill_prompts

from agent.config import Settings, load_dataclass
from agent.errors import ConfigError
from agent.modeling import Policy
from agent.registry import ModelRegistry
from agent.store.api import Store
from rl.ppo import PPOTrainer
from rl.ppo import job as ppo_train
from rl.runs import Run
from rlchat.cli import main as cli

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/rl/conftest.py


def likes_e(context: list[dict[str, str]], reply: str) -> float:
    """The oracle reward of these tests (named as `test_ppo_train:likes_e`)."""
    return reply.count("e") / max(1, len(reply))


def job_args(tiny_model_dir: Path, **extra: object) -> list[str]:
    values = dict(
        policy=str(tiny_model_dir),
        reward="test_ppo_train:likes_e",
        iterations=4,
        checkpoint_every=2,
        batch_size=4,
        mini_batch_size=2,
        max_new_tokens=6,
        eval_prompts=4,
        device="cpu",
        **extra,
    )
    return [item for k, v in values.items() for item in ("--set", f"{k}={v}")]


def test_train_ppo_command_registers_a_servable_ppo_version(
    tiny_model_dir: Path, sqlite_settings: Settings, sqlite_store: Store
) -> None:
    fill_prompts(sqlite_store)
    code = cli(
        ["--data-dir", str(sqlite_settings.data_dir), "train", "ppo", *job_args(tiny_model_dir)]
    )
    assert code == 0
    (run,) = sqlite_store.list_runs("ppo")
    assert run.status == "succeeded" and run.output_version_id is not None
    assert run.data_ids["messages"]  # the user turns it trained on
    for key in (
        "reward/mean",
        "kl/mean",
        "policy/entropy",
        "perf/tokens_per_s",
        "eval/reward_mean",
    ):
        assert key in run.metrics
    run_dir = Path(run.log_path)
    assert [p.name for p in sorted((run_dir / "checkpoints").glob("iter-*"))] == [
        "iter-000002",
        "iter-000004",
    ]
    assert list((run_dir / "tensorboard").glob("events.*"))
    registry = ModelRegistry(sqlite_store, sqlite_settings)
    version = registry.get(run.output_version_id)
    assert version.kind == "ppo" and version.metrics["eval/n"] >= 1
    assert registry.get(version.parent_id).kind == "base"
    spec = registry.resolve(version.id)
    policy = Policy(spec.base, device="cpu")
    policy.set_adapters(spec.adapters)  # base + the PPO adapter: servable
    assert policy.adapters == [str(Path(version.path).resolve())]


def record_logs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, dict[str, float]]]:
    logged: list[tuple[int, dict[str, float]]] = []
    original = Run.log

    def log(self: Run, step: int, metrics: dict[str, float]) -> None:
        logged.append((step, dict(metrics)))
        original(self, step, metrics)

    monkeypatch.setattr(Run, "log", log)
    return logged


def run_job(tiny_model_dir: Path, data_dir: Path, resume: bool = False) -> int:
    settings = Settings(data_dir=data_dir)
    config = load_dataclass(
        ppo_train.Config, None, [a for a in job_args(tiny_model_dir) if a != "--set"]
    )
    return ppo_train.main(config, settings, resume=resume)


def comparable(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 5) for k, v in metrics.items() if not k.startswith("perf/")}


def test_resume_after_a_kill_continues_like_an_uninterrupted_run(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("straight", "killed"):
        store = Store.open(Settings(data_dir=tmp_path / name))
        fill_prompts(store)
        store.close()
    logged = record_logs(monkeypatch)
    run_job(tiny_model_dir, tmp_path / "straight")
    straight = {step: comparable(m) for step, m in logged}
    logged.clear()

    original, calls = PPOTrainer.train_step, []

    def dies_in_iteration_3(self: PPOTrainer, envs):  # noqa: ANN001
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed after the checkpoint of iteration 2
        return original(self, envs)

    monkeypatch.setattr(PPOTrainer, "train_step", dies_in_iteration_3)
    with pytest.raises(KeyboardInterrupt):
        run_job(tiny_model_dir, tmp_path / "killed")
    monkeypatch.setattr(PPOTrainer, "train_step", original)
    store = Store.open(Settings(data_dir=tmp_path / "killed"))
    assert store.list_runs("ppo")[0].status == "failed"
    store.close()
    version_id = run_job(tiny_model_dir, tmp_path / "killed", resume=True)
    resumed = {step: comparable(m) for step, m in logged}
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == straight[step], step
    store = Store.open(Settings(data_dir=tmp_path / "killed"))
    (run,) = store.list_runs("ppo")  # the same run row, finished
    assert run.status == "succeeded" and run.output_version_id == version_id
    store.close()


def test_config_from_yaml_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "ppo.yaml"
    path.write_text("batch_size: 8\nmini_batch_size: 4\nkl_estimator: k3\n")
    config = load_dataclass(ppo_train.Config, path, ["target_kl=6", "prompts=prompts.jsonl"])
    assert (config.batch_size, config.kl_estimator, config.target_kl) == (8, "k3", 6.0)
    assert config.prompts == "prompts.jsonl"
    with pytest.raises(ConfigError, match="mini_batch_size"):
        load_dataclass(ppo_train.Config, None, ["batch_size=6", "mini_batch_size=4"])
    with pytest.raises(ConfigError, match="kl_estimator"):
        load_dataclass(ppo_train.Config, None, ["kl_estimator=k9"])
    with pytest.raises(ConfigError, match="unknown field"):
        load_dataclass(ppo_train.Config, None, ["learning_rat=1"])
    with pytest.raises(ConfigError, match="critic_layers: must be >= 0, got -1"):
        load_dataclass(ppo_train.Config, None, ["critic_layers=-1"])


def test_missing_reward_and_policy_are_named(
    sqlite_settings: Settings, sqlite_store: Store
) -> None:
    registry = ModelRegistry(sqlite_store, sqlite_settings)
    with pytest.raises(ConfigError, match="policy"):
        ppo_train.resolve_policy("", registry)
    with pytest.raises(ConfigError, match="reward"):
        ppo_train.load_reward("", sqlite_store, torch.device("cpu"))
    with pytest.raises(ConfigError, match="module:function"):
        ppo_train.load_reward("no_such_module:fn", sqlite_store, torch.device("cpu"))


@pytest.mark.parametrize("algorithm", ["ppo", "rloo"])
def test_jsonl_prompts_drive_the_job(tiny_model_dir: Path, tmp_path: Path, algorithm: str) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"hi {i}"}) for i in range(8)))
    settings = Settings(data_dir=tmp_path / "data")
    args = [a for a in job_args(tiny_model_dir, prompts=prompts) if a != "--set"]
    extra = ["iterations=2", "checkpoint_every=1", "eval_prompts=0", f"algorithm={algorithm}"]
    config = load_dataclass(ppo_train.Config, None, [*args, *extra])
    version_id = ppo_train.main(config, settings)
    store = Store.open(settings)
    version = store.get_model_version(version_id)
    (run,) = store.list_runs("ppo")
    store.close()
    assert version.kind == "ppo" and run.metrics["step"] == 2
    assert ("value/explained_variance" in run.metrics) == (algorithm == "ppo")
    served = Policy(tiny_model_dir, device="cpu")
    served.set_adapters([version.path])  # the same servable adapter either way
