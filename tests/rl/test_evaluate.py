"""The evaluation and its gate: paired intervals, the length-controlled win-rate, the true KL,
named guards, and the hacked candidates the gate must refuse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from agent.chat import ChatAgent
from agent.config import Settings
from agent.errors import ConfigError
from agent.registry import ModelRegistry
from agent.store.api import Store
from agent.store.splits import SplitFractions, assign_splits
from agent.tiny import build_tiny_adapter
from rl import eval_stats, evaluate
from rl.env import Prompt
from rl.gate import format_table, gate

# ---- statistics --------------------------------------------------------------------------


def test_distinct_n() -> None:
    assert eval_stats.distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert eval_stats.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert eval_stats.distinct_n(["", "x"], 2) == 0.0


def test_win_rate_counts_ties_half_and_brackets_the_estimate() -> None:
    a, b = np.array([2.0, 1.0, 0.0, 5.0]), np.array([1.0, 1.0, 1.0, 4.0])
    rate, lo, hi = eval_stats.win_rate(a, b, resamples=2000, seed=0)
    assert rate == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert lo <= rate <= hi and lo >= 0.0 and hi <= 1.0
    assert eval_stats.win_rate(np.ones(200), np.zeros(200), 500, 0) == (1.0, 1.0, 1.0)


def test_a_point_estimate_of_055_from_30_prompts_is_not_a_win() -> None:
    """The old gate deployed on win-rate >= 0.55 from 30 prompts; the interval says chance."""
    wins = np.array([1.0] * 16 + [0.0] * 13 + [0.5])  # 0.55
    rate, lo, hi = eval_stats.win_rate(wins, np.full(30, 0.5), 2000, 0)
    assert rate == pytest.approx(0.55) and lo < 0.5 < hi


def test_length_controlled_win_rate_removes_a_pure_length_preference() -> None:
    rng = np.random.default_rng(0)
    diff = rng.normal(0, 5, size=200)  # candidate minus baseline length
    prefs = (diff > 0).astype(float)  # a judge that only likes longer replies
    raw = prefs.mean()
    lc, lo, hi = eval_stats.lc_win_rate(prefs, diff, 500, 0)
    assert lo <= lc <= hi and abs(lc - 0.5) < 0.1 and abs(raw - 0.5) < 0.1
    biased = np.where(diff > 0, 1.0, 0.0)
    biased[:100] = 1.0  # prefers the candidate beyond length, too
    lc2, lo2, _ = eval_stats.lc_win_rate(biased, diff, 500, 0)
    assert lc2 > 0.6 and lo2 > 0.5


def test_text_overlap_against_human_replies() -> None:
    refs = ["i love my dog very much", "the weather is nice today"]
    same = eval_stats.text_overlap(refs, refs)
    assert same["bleu"] == pytest.approx(100) and same["rouge_l"] == pytest.approx(1)
    other = eval_stats.text_overlap(["my dog", "no idea"], refs)
    assert other["bleu"] < 50 and 0 < other["rouge_l"] < 1


def test_kl_estimates_are_zero_for_the_same_policy_and_k3_never_negative() -> None:
    logprobs = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.1, 0.3, 1.0]]))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    same = eval_stats.kl_estimates(logprobs, logprobs, mask)
    assert all(v == 0 for v in same.values())
    ref = torch.log(torch.tensor([[0.4, 0.3, 0.5], [0.2, 0.1, 0.01]]))
    kl = eval_stats.kl_estimates(logprobs, ref, mask)
    ratio = (logprobs - ref) * mask
    assert kl["kl/k1_per_token"] == pytest.approx(ratio.sum().item() / 5)
    assert kl["kl/k1_per_reply"] == pytest.approx(ratio.sum().item() / 2)
    assert kl["kl/k3_per_token"] > 0 and kl["kl/k3_per_reply"] > 0


# ---- the gate on constructed observations ------------------------------------------------

N = 40


def _observations(**over: object) -> evaluate.Observations:
    """A healthy candidate: the judge and the reward model prefer it on 36 of 40 prompts,
    same length, same diversity, perplexity barely up, small KL, accurate scorers."""
    rng = np.random.default_rng(0)
    words = [" ".join(f"w{rng.integers(50)}" for _ in range(8)) for _ in range(N)]
    base = rng.normal(size=N)
    better = base + np.where(np.arange(N) < 36, 1.0, -1.0)
    obs = evaluate.Observations(
        prompts=[Prompt([{"role": "user", "content": f"p{i}"}]) for i in range(N)],
        candidate=list(words),
        baseline=list(reversed(words)),
        tokens={"candidate": np.full(N, 10.0), "baseline": np.full(N, 10.0)},
        scores={
            "judge": {"candidate": better, "baseline": base},
            "reward": {"candidate": better, "baseline": base},
        },
        kl={
            "kl/k1_per_token": 0.05,
            "kl/k3_per_token": 0.04,
            "kl/k1_per_reply": 0.5,
            "kl/k3_per_reply": 0.4,
        },
        perplexity={"candidate": 105.0, "baseline": 100.0},
        accuracy={"judge": 0.85, "reward": 0.88},
    )
    for key, value in over.items():
        setattr(obs, key, value)
    return obs


CONFIG = evaluate.Config(samples_per_prompt=1, bootstrap=500)


def _failed(metrics: dict) -> set[str]:
    return {g["name"] for g in metrics["gate"]["guards"] if not g["passed"]}


def test_a_healthy_candidate_passes_every_guard_and_the_table_shows_them() -> None:
    metrics = evaluate.summarise(_observations(), CONFIG)
    assert metrics["gate"]["deploy"], metrics["gate"]["reasons"]
    assert len(metrics["gate"]["guards"]) == 8
    table = format_table(metrics)
    for text in ("95% CI", "length-controlled", "k3", "guard length_ratio", "verdict: DEPLOY"):
        assert text in table


def test_the_table_prints_unmeasured_values_as_stored() -> None:
    """Stored metrics hold null for NaN (no test pairs, say): the table shows nan, no crash."""
    metrics = evaluate.summarise(_observations(), CONFIG)
    metrics.update({"judge/test_accuracy": None, "kl/k3_per_reply": None})
    metrics["length/words/baseline"] = None
    table = format_table(metrics)
    assert "judge test accuracy" in table and "nan" in table


def test_refuses_a_candidate_of_an_under_trained_reward_model() -> None:
    """PPO against a reward model at chance: the reward model "approves", the judge does not."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=N)
    obs = _observations(
        accuracy={"judge": 0.85, "reward": 0.52},
        scores={
            "judge": {"candidate": rng.normal(size=N), "baseline": base},
            "reward": {"candidate": base + 1, "baseline": base},
        },
    )
    metrics = evaluate.summarise(obs, CONFIG)
    assert not metrics["gate"]["deploy"]
    assert {"reward_accuracy", "judge_win_rate_lower"} <= _failed(metrics)
    reason = next(r for r in metrics["gate"]["reasons"] if "reward_accuracy" in r)
    assert reason == "guard reward_accuracy: value 0.52, bound >= 0.6"


def test_refuses_a_candidate_whose_replies_collapsed_in_length() -> None:
    """The documented follow_up run: replies shrank from 8.2 to 2.2 words, and the (length-
    biased) judge liked it. The length guard refuses, and the LC win-rate does not rise."""
    short = [" ".join(r.split()[:2]) + "?" for r in _observations().candidate]
    obs = _observations(
        candidate=short,
        tokens={"candidate": np.full(N, 3.0), "baseline": np.full(N, 10.0)},
    )
    metrics = evaluate.summarise(obs, CONFIG)
    assert "length_ratio" in _failed(metrics)
    reason = next(r for r in metrics["gate"]["reasons"] if "length_ratio" in r)
    assert reason.startswith("guard length_ratio: value 0.2") and "bound in [0.5, 2]" in reason
    allowed = evaluate.Config(samples_per_prompt=1, bootstrap=500, allow_length_change=True)
    assert "length_ratio" not in _failed(evaluate.summarise(obs, allowed))


def test_refuses_a_candidate_that_won_on_the_ppo_reward_model_but_not_on_the_judge() -> None:
    rng = np.random.default_rng(2)
    base = rng.normal(size=N)
    obs = _observations(
        scores={
            "judge": {"candidate": base + rng.normal(0, 1, size=N), "baseline": base},
            "reward": {"candidate": base + 2, "baseline": base},
        }
    )
    metrics = evaluate.summarise(obs, CONFIG)
    assert metrics["win_rate/reward"] == 1.0
    assert not metrics["gate"]["deploy"] and "judge_win_rate_lower" in _failed(metrics)
    assert "reward_accuracy" not in _failed(metrics)


def test_refusals_name_guard_value_and_bound_for_perplexity_diversity_kl() -> None:
    obs = _observations(
        perplexity={"candidate": 130.0, "baseline": 100.0},
        candidate=["same words every time"] * N,
        kl={**_observations().kl, "kl/k3_per_token": 0.9},
    )
    metrics = evaluate.summarise(obs, CONFIG)
    reasons = "; ".join(metrics["gate"]["reasons"])
    assert "guard perplexity_rise: value 0.3, bound <= 0.15" in reasons
    assert "guard distinct2_share" in reasons and "bound >= 0.8" in reasons
    assert "guard kl_per_token: value 0.9, bound <= 0.5" in reasons


def test_an_unmeasured_guard_refuses() -> None:
    metrics = evaluate.summarise(
        _observations(perplexity={}, accuracy={"judge": float("nan"), "reward": 0.9}), CONFIG
    )
    assert {"perplexity_rise", "judge_accuracy"} <= _failed(metrics)
    assert "guard perplexity_rise: value not measured" in "; ".join(metrics["gate"]["reasons"])
    assert gate({}, CONFIG)["deploy"] is False


def test_config_fails_fast() -> None:
    with pytest.raises(ConfigError, match="oracle"):
        evaluate.Config(oracle="nope")
    with pytest.raises(ConfigError, match="num_prompts"):
        evaluate.Config(num_prompts=0)
    with pytest.raises(ConfigError, match="temperature"):
        evaluate.Config(temperature=0)
    with pytest.raises(ConfigError, match="gate_max_length_factor"):
        evaluate.Config(gate_max_length_factor=0.5)


# ---- end to end on a tiny model ----------------------------------------------------------


def _reward_dir(tiny_model_dir: Path, out: Path, seed: int) -> Path:
    from transformers import AutoModelForSequenceClassification

    from agent.modeling import load_tokenizer
    from rl.reward_model import RewardModel

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=1)
    return RewardModel(model, load_tokenizer(tiny_model_dir)).save(out)


@pytest.fixture
def versions(
    sqlite_store: Store, sqlite_settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> dict[str, int]:
    registry = ModelRegistry(sqlite_store, sqlite_settings)
    base = registry.add("base", tiny_model_dir)
    registry.deploy(base)
    adapter = build_tiny_adapter(tiny_model_dir, tmp_path / "adapter", seed=3)
    candidate = registry.add("sft", adapter, parent_id=base)
    accurate = {"test/pairwise_accuracy": 0.9}
    # Under-trained: fine on the validation pairs it was early-stopped on, chance on test.
    selected = {"eval/pairwise_accuracy": 0.95, "test/pairwise_accuracy": 0.55}
    reward = registry.add(
        "reward", _reward_dir(tiny_model_dir, tmp_path / "rm", 1), metrics=selected
    )
    judge = registry.add(
        "reward",
        _reward_dir(tiny_model_dir, tmp_path / "judge", 2),
        metrics={**accurate, "data/train_split": "judge"},
    )
    user = sqlite_store.get_or_create_user("u").id
    test_only = SplitFractions(train=0, validation=0, judge=0, test=1)
    for i in range(6):
        conv = sqlite_store.create_conversation(user, "")
        sqlite_store.append_message(conv, "user", f"tell me about thing {i}")
        assign_splits(sqlite_store, [conv], test_only)
    return {"base": base, "candidate": candidate, "reward": reward, "judge": judge}


def test_evaluate_end_to_end_measures_a_true_kl_to_the_deployed_policy(
    sqlite_store: Store, sqlite_settings: Settings, versions: dict[str, int]
) -> None:
    agent = ChatAgent(sqlite_store, sqlite_settings, device="cpu")
    config = evaluate.Config(
        max_new_tokens=8, human_replies=4, samples_per_prompt=2, bootstrap=200, device="cpu"
    )
    metrics = evaluate.evaluate(config, sqlite_store, sqlite_settings, agent)
    assert metrics["candidate"] == versions["candidate"] and metrics["baseline"] == versions["base"]
    assert metrics["judge_version"] == versions["judge"]
    assert metrics["reward_version"] == versions["reward"]
    assert metrics["prompts"] == 6
    # The accuracy the gate reads is the test split's, not the one selection saw.
    assert metrics["reward/test_accuracy"] == 0.55
    assert "guard reward_accuracy: value 0.55, bound >= 0.6" in metrics["gate"]["reasons"]
    # A random adapter moves the policy: the KL on its own samples is positive, never 0.
    assert metrics["kl/k3_per_token"] > 0 and metrics["kl/k3_per_reply"] > 0
    assert 0 <= metrics["win_rate/judge_lo"] <= metrics["win_rate/judge"] <= 1
    assert metrics["human/perplexity/candidate"] > 1
    assert 0 <= metrics["human/bleu/candidate"] <= 100
    assert 0 <= metrics["human/rouge_l/baseline"] <= 1
    # The deployed policy against itself: exactly no KL, and the same replies.
    same = evaluate.Config(**{**config.__dict__, "candidate": versions["base"]})
    itself = evaluate.evaluate(same, sqlite_store, sqlite_settings, agent)
    assert itself["kl/k1_per_token"] == 0 and itself["kl/k3_per_token"] == 0
    assert itself["samples"][0]["candidate"] == itself["samples"][0]["baseline"]
    assert not itself["gate"]["deploy"]  # no better than itself: the interval says so


def test_rlchat_eval_prints_win_rate_interval_lc_kl_guards_and_verdict(
    sqlite_settings: Settings, versions: dict[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    from rlchat.cli import main as cli

    args = ["--data-dir", str(sqlite_settings.data_dir), "eval", "--oracle", "concise"]
    args += ["--judge", str(versions["judge"])]
    for field in ("max_new_tokens=8", "human_replies=2", "bootstrap=200", "device=cpu"):
        args += ["--set", field]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "win-rate (judge)" in out and "95% CI [" in out
    assert "win-rate (judge, length-controlled)" in out
    assert "KL(candidate || deployed)" in out and "nats/token" in out
    for name in ("judge_accuracy", "reward_accuracy", "perplexity_rise", "kl_per_token"):
        assert f"guard {name}" in out
    assert "verdict: REFUSE: guard reward_accuracy: value 0.55, bound >= 0.6" in out
