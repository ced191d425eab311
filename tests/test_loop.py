"""The proof: simulated feedback -> `rlchat pipeline` -> a deployed policy the oracle prefers.

The oracle ("asks a follow-up question") is hidden from every training stage: the reward
model learns it only through the simulated annotators' noisy judgements. So a higher oracle
score after SFT -> reward model -> PPO means the loop learned what the annotators wanted.
And the deploy is only a success when the gate passed every guard: the judge (trained on
its own split) prefers the candidate beyond chance, also at equal length, and perplexity,
reply length, diversity and the true KL stayed within their bounds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from agent.chat import ChatAgent
from agent.config import Settings
from agent.starter import StarterConfig, build_starter
from agent.store.api import Store
from rl import pipeline, simulate

MARGIN = 0.1
"""How much higher the deployed policy's mean oracle score (0..1) must be than the start's."""
ORACLE = "follow_up"
USERS = 160
PPO_ITERS = 60
REPLY_TOKENS = 24
SPLITS = {"train": 0.5, "validation": 0.1, "judge": 0.2, "test": 0.2}
"""A small database: more of it for the judge and the test than the defaults give."""


def loop_config() -> pipeline.Config:
    """The documented loop's config (docs/loop.yaml), at test size."""
    return pipeline.Config(
        splits=SPLITS,
        sources=["simulated"],
        sft={
            "max_steps": 20,
            "learning_rate": 1e-3,
            "batch_size": 8,
            "eval_steps": 10,
            "save_steps": 10,
            "device": "cpu",
            "min_examples": 4,
        },
        reward={
            "num_epochs": 10,
            "learning_rate": 2e-3,
            "lora": False,  # a tiny model: train every weight
            "early_stopping_patience": 0,
            "batch_size": 8,
            "eval_steps": 10,
            "save_steps": 10,
            "device": "cpu",
        },
        ppo={
            "iterations": PPO_ITERS,
            "batch_size": 16,
            "mini_batch_size": 8,
            "max_new_tokens": REPLY_TOKENS,
            "learning_rate": 3e-3,
            "kl_coef": 0.05,
            "checkpoint_every": 10,
            "eval_prompts": 0,
            "device": "cpu",
        },
        eval={
            "oracle": ORACLE,
            "human_replies": 32,
            "samples_per_prompt": 4,
            "bootstrap": 1000,
            "device": "cpu",
        },
    )


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One whole loop on the tiny starter: starter -> simulate -> pipeline (once per module)."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("loop") / "data")
    store = Store.open(settings)
    # A tiny starter model trained on chitchat: it speaks (badly), and sometimes asks back.
    starter = StarterConfig(size="tiny", max_conversations=300, num_threads=1)
    start = build_starter(starter, settings, store).version_id
    assert store.deployed_version().id == start

    agent = ChatAgent(store, settings, device="cpu")
    sim = simulate.Config(
        oracle=ORACLE,
        users=USERS,
        turns=1,
        replies=3,
        annotators=3,
        overlap=2,
        noise=0.1,
        max_new_tokens=REPLY_TOKENS,
        seed=0,
    )
    summary = simulate.simulate(sim, store, agent, settings)
    assert summary["comparisons"] >= USERS  # replies that failed (empty) are not compared
    result = pipeline.run_pipeline(loop_config(), settings, store)
    yield {"store": store, "start": start, "stages": result["stages"]}
    store.close()


@pytest.mark.slow
def test_the_gate_deploys_only_a_candidate_that_passed_every_guard(loop: dict[str, Any]) -> None:
    """Whatever this run's candidate is, the gate's decision is the truth about it."""
    store, stages = loop["store"], loop["stages"]
    ev = stages["eval"]
    assert ev["baseline"] == loop["start"] and ev["candidate"] == stages["ppo"]
    assert ev["judge_version"] == stages["judge"] != stages["reward"]
    guards = {g["name"]: g for g in ev["gate"]["guards"]}
    assert len(guards) == 8 and all(g["value"] is not None for g in guards.values()), guards
    failed = [name for name, g in guards.items() if not g["passed"]]
    assert ev["gate"]["deploy"] == (not failed)
    assert len(ev["gate"]["reasons"]) == len(failed)
    for name, reason in zip(failed, ev["gate"]["reasons"], strict=True):
        assert reason.startswith(f"guard {name}: value ") and ", bound " in reason
    serving = store.deployed_version().id
    assert serving == (stages["ppo"] if ev["gate"]["deploy"] else loop["start"])
    assert [r.status for r in store.list_runs("pipeline")] == ["succeeded"]


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="not met yet on the tiny starter: with an honest gate the loop's candidate is refused. "
    "Measured 2026-11-23 with this config (kl_coef 0.05): reward model test accuracy 0.48, "
    "oracle 0.157 -> 0.116, judge win-rate 0.47 [0.37, 0.59], 9.6 -> 3.9 words per reply, "
    "human perplexity x2.4; with kl_coef 0.2 and 300 users the oracle stayed flat and the "
    "judge preferred the start (0.35 [0.25, 0.45]). "
    "See docs/LOOP.md. Strict: when the loop starts passing, this marker must go.",
)
def test_feedback_makes_the_deployed_policy_better_under_the_oracle(
    loop: dict[str, Any],
) -> None:
    store, stages = loop["store"], loop["stages"]
    ev = stages["eval"]
    assert ev["gate"]["deploy"], ev["gate"]["reasons"]
    assert all(g["passed"] for g in ev["gate"]["guards"])
    assert ev["oracle/candidate"] >= ev["oracle/baseline"] + MARGIN, ev
    assert ev["win_rate/oracle_lo"] > 0.5, ev
    assert store.deployed_version().id == stages["ppo"]
