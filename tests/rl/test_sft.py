"""The SFT job: a LoRA adapter on replies rated well, registered and served by the chat agent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from synthetic import fill_synthetic_feedback
from transformers import TrainerCallback

from agent.config import Settings
from agent.errors import ConfigError, ValidationError
from agent.store.api import Store
from rl import sft

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/rl/conftest.py


class ParameterWatch(TrainerCallback):
    """Copies every parameter when training starts and ends."""

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any
    ) -> None:
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_train_end(
        self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any
    ) -> None:
        self.after = {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, Any]:
    """One SFT run on a synthetic DB of 30 conversations."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    settings = Settings(data_dir=tmp_path_factory.mktemp("sft") / "data")
    store = Store.open(settings)
    info = fill_synthetic_feedback(store, 30, seed=0)
    store.close()
    config = sft.Config(
        base_model=str(tiny_model_dir),
        learning_rate=2e-3,
        max_steps=30,
        batch_size=8,
        eval_steps=10,
        save_steps=10,
        logging_steps=5,
        max_length=256,
    )
    watch = ParameterWatch()
    version_id = sft.main(config, settings, callbacks=[watch])
    torch.set_num_threads(threads)
    return {"settings": settings, "info": info, "version_id": version_id, "watch": watch}


@pytest.mark.slow
def test_sft_lowers_held_out_loss_and_registers_a_candidate(trained: dict[str, Any]) -> None:
    store = Store.open(trained["settings"])
    version = store.get_model_version(trained["version_id"])
    run = store.get_run(version.metrics["run_id"])
    parent = store.get_model_version(version.parent_id)
    assert version.kind == "sft" and version.status == "candidate" and parent.kind == "base"
    assert version.metrics["eval/loss"] < version.metrics["eval/loss_before"]
    assert (Path(version.path) / "adapter_config.json").is_file()
    assert run.status == "succeeded" and run.output_version_id == version.id
    good = set(trained["info"]["good"])
    assert run.data_ids["messages"] and set(run.data_ids["messages"]) <= good
    held_out = set(run.data_ids["heldout_conversations"])
    train_convs = {store.get_message(m).conversation_id for m in run.data_ids["messages"]}
    assert held_out and not train_convs & held_out
    assert list((Path(run.log_path) / "tensorboard").glob("events.out.tfevents.*"))
    store.close()


@pytest.mark.slow
def test_sft_changes_only_adapter_parameters(trained: dict[str, Any]) -> None:
    watch = trained["watch"]
    changed = {n for n, p in watch.before.items() if not torch.equal(p, watch.after[n])}
    assert changed, "training changed nothing"
    assert all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)


@pytest.mark.slow
def test_sft_adapter_loads_in_the_chat_agent_and_changes_its_replies(
    trained: dict[str, Any],
) -> None:
    from agent.chat import ChatAgent, SamplingParams

    store = Store.open(trained["settings"])
    base_id = store.get_model_version(trained["version_id"]).parent_id
    agent = ChatAgent(store, trained["settings"], device="cpu")
    greedy = SamplingParams(do_sample=False, max_new_tokens=12, repetition_penalty=1.0)
    messages = [{"role": "user", "content": "Let me tell you about my garden."}]
    base_reply = agent.generate(messages, greedy, version_id=base_id)
    sft_reply = agent.generate(messages, greedy, version_id=trained["version_id"])
    store.close()
    assert sft_reply != base_reply


def test_too_little_data_is_a_clear_error(sqlite_settings: Settings, tiny_model_dir: Path) -> None:
    config = sft.Config(base_model=str(tiny_model_dir))
    with pytest.raises(ValidationError, match=r"need at least 8 rated-well replies .* found 0"):
        sft.main(config, sqlite_settings)
    store = Store.open(sqlite_settings)
    assert store.list_runs("sft")[-1].status == "failed"
    store.close()


def test_without_a_deployed_policy_or_base_model_the_error_says_what_to_set(
    sqlite_settings: Settings,
) -> None:
    store = Store.open(sqlite_settings)
    fill_synthetic_feedback(store, 16, seed=3)
    store.close()
    with pytest.raises(ConfigError, match="base_model"):
        sft.main(sft.Config(), sqlite_settings)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="save_steps"):
        sft.Config(eval_steps=10, save_steps=15)
