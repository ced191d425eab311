"""Evaluation metrics and the deployment gate."""

from __future__ import annotations

import numpy as np
import pytest

from agent.errors import ConfigError
from rl import evaluate


def test_distinct_n() -> None:
    assert evaluate.distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert evaluate.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    assert evaluate.distinct_n(["", "x"], 2) == 0.0


def test_win_rate_counts_ties_half_and_brackets_the_estimate() -> None:
    a, b = np.array([2.0, 1.0, 0.0, 5.0]), np.array([1.0, 1.0, 1.0, 4.0])
    rate, lo, hi = evaluate.win_rate(a, b, bootstrap=2000, seed=0)
    assert rate == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert lo <= rate <= hi and lo >= 0.0 and hi <= 1.0
    rate, lo, hi = evaluate.win_rate(np.ones(200), np.zeros(200), bootstrap=500, seed=0)
    assert (rate, lo, hi) == (1.0, 1.0, 1.0)


def _metrics(**over: float) -> dict:
    base = {"reward_model/accuracy": 0.9, "win_rate/reward": 0.7, "kl/candidate": 3.0}
    return {**base, **over}


def test_gate_passes_only_when_every_bound_holds() -> None:
    cfg = evaluate.Config(gate_min_win_rate=0.55, gate_max_kl=10, gate_min_reward_accuracy=0.6)
    assert evaluate.gate(_metrics(), cfg) == {"deploy": True, "reasons": []}
    refused = evaluate.gate(_metrics(**{"reward_model/accuracy": 0.52, "kl/candidate": 25.0}), cfg)
    assert not refused["deploy"] and len(refused["reasons"]) == 2
    assert "cannot be trusted" in refused["reasons"][0] and "KL" in refused["reasons"][1]
    assert not evaluate.gate(_metrics(**{"reward_model/accuracy": float("nan")}), cfg)["deploy"]
    assert not evaluate.gate(_metrics(**{"win_rate/reward": 0.5}), cfg)["deploy"]


def test_config_fails_fast() -> None:
    with pytest.raises(ConfigError, match="oracle"):
        evaluate.Config(oracle="nope")
    with pytest.raises(ConfigError, match="num_prompts"):
        evaluate.Config(num_prompts=0)
