"""The deployment gate: named guards on the evaluation's metrics, each with value and bound.

    decision = gate(metrics, bounds)
    decision["deploy"]      # True only when every guard passed
    decision["reasons"]     # one line per failed guard: "guard NAME: value V, bound B"
    decision["guards"]      # every guard: name, value, bound, passed (stored on the eval run)

A guard whose value could not be measured (NaN) fails: the gate never passes on a number it
does not have. `format_table` is what `rlchat eval` prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from agent.errors import ConfigError


@dataclass
class GateBounds:
    """The gate's bounds (fields of `rl.evaluate.Config`)."""

    gate_min_judge_accuracy: float = 0.6
    """The judge's test-split pairwise accuracy must reach this."""
    gate_min_reward_accuracy: float = 0.6
    """PPO's reward model's test-split pairwise accuracy must reach this."""
    gate_min_win_rate_lower: float = 0.5
    """The lower end of the judge win-rate's 95% interval must be above this."""
    gate_min_lc_win_rate: float = 0.5
    """The length-controlled judge win-rate must be above this."""
    gate_max_perplexity_rise: float = 0.15
    """Human-reply perplexity may rise by at most this share over the deployed policy's."""
    gate_max_length_factor: float = 2.0
    """Mean reply length (words) may change by at most this factor, either way."""
    allow_length_change: bool = False
    """The operator allows any change of reply length (the length guard reports, never refuses)."""
    gate_min_distinct2_share: float = 0.8
    """Distinct-2 may not fall below this share of the deployed policy's."""
    gate_max_kl_per_token: float = 0.5
    """KL(candidate ‖ deployed), k3 estimate, nats per token, at most this."""

    def __post_init__(self) -> None:
        if self.gate_max_length_factor < 1:
            raise ConfigError(
                f"gate_max_length_factor: must be >= 1, got {self.gate_max_length_factor}"
            )
        for name in (
            "gate_max_perplexity_rise",
            "gate_min_distinct2_share",
            "gate_max_kl_per_token",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")


def _ratio(metrics: dict[str, Any], key: str) -> float:
    cand = metrics.get(f"{key}/candidate", math.nan)
    base = metrics.get(f"{key}/baseline", math.nan)
    if base == 0:
        return 1.0 if cand == 0 else math.inf
    return cand / base


def _guards(metrics: dict[str, Any], b: GateBounds) -> list[tuple[str, float, str, bool]]:
    """(name, value, bound as text, passed) of every guard."""
    nan = math.nan
    judge_acc = metrics.get("judge/test_accuracy", nan)
    reward_acc = metrics.get("reward/test_accuracy", nan)
    lower = metrics.get("win_rate/judge_lo", nan)
    lc = metrics.get("win_rate/judge_lc", nan)
    ppl_rise = _ratio(metrics, "human/perplexity") - 1
    length = _ratio(metrics, "length/words")
    distinct = _ratio(metrics, "distinct/2")
    kl = metrics.get("kl/k3_per_token", nan)
    f = b.gate_max_length_factor
    length_ok = b.allow_length_change or 1 / f <= length <= f
    return [
        ("judge_accuracy", judge_acc, f">= {b.gate_min_judge_accuracy}", judge_acc >= b.gate_min_judge_accuracy),
        ("reward_accuracy", reward_acc, f">= {b.gate_min_reward_accuracy}", reward_acc >= b.gate_min_reward_accuracy),
        ("judge_win_rate_lower", lower, f"> {b.gate_min_win_rate_lower}", lower > b.gate_min_win_rate_lower),
        ("judge_lc_win_rate", lc, f"> {b.gate_min_lc_win_rate}", lc > b.gate_min_lc_win_rate),
        ("perplexity_rise", ppl_rise, f"<= {b.gate_max_perplexity_rise}", ppl_rise <= b.gate_max_perplexity_rise),
        (
            "length_ratio",
            length,
            "any (allow_length_change)" if b.allow_length_change else f"in [{1 / f:.3g}, {f:.3g}]",
            bool(length_ok) and not math.isnan(length),
        ),
        ("distinct2_share", distinct, f">= {b.gate_min_distinct2_share}", distinct >= b.gate_min_distinct2_share),
        ("kl_per_token", kl, f"<= {b.gate_max_kl_per_token}", kl <= b.gate_max_kl_per_token),
    ]  # fmt: skip


def gate(metrics: dict[str, Any], bounds: GateBounds) -> dict[str, Any]:
    """The deployment decision, every guard with value and bound, and a reason per failure."""
    guards, reasons = [], []
    for name, value, bound, passed in _guards(metrics, bounds):
        measured = not math.isnan(value)
        guards.append(
            {"name": name, "value": value if measured else None, "bound": bound, "passed": passed}
        )
        if not passed:
            shown = f"{value:.4g}" if measured else "not measured"
            reasons.append(f"guard {name}: value {shown}, bound {bound}")
    return {"deploy": not reasons, "reasons": reasons, "guards": guards}


def format_table(metrics: dict[str, Any]) -> str:
    """Candidate and deployed side by side, the judge's win-rates, the KL, each guard, the verdict."""

    def num(key: str) -> float:  # stored metrics hold null where a value was NaN or missing
        value = metrics.get(key)
        return math.nan if value is None else float(value)

    lines = [f"{'metric':<24} {'candidate':>12} {'deployed':>12}"]
    keys = sorted(k.rsplit("/", 1)[0] for k in metrics if k.endswith("/candidate"))
    for key in keys:
        lines.append(f"{key:<24} {num(key + '/candidate'):>12.4f} {num(key + '/baseline'):>12.4f}")
    for name in ("judge", "reward", "oracle", "judge_lc"):
        if f"win_rate/{name}" in metrics:
            lo, hi = num(f"win_rate/{name}_lo"), num(f"win_rate/{name}_hi")
            label = f"win-rate ({name.replace('_lc', ', length-controlled')})"
            lines.append(f"{label:<34} {num(f'win_rate/{name}'):.3f}  95% CI [{lo:.3f}, {hi:.3f}]")
    lines.append(
        f"{'KL(candidate || deployed)':<34} k1 {num('kl/k1_per_token'):.4f}, "
        f"k3 {num('kl/k3_per_token'):.4f} nats/token; "
        f"k1 {num('kl/k1_per_reply'):.3f}, k3 {num('kl/k3_per_reply'):.3f} nats/reply"
    )
    for name in ("judge", "reward"):
        lines.append(f"{name + ' test accuracy':<34} {num(f'{name}/test_accuracy'):.3f}")
    decision = metrics["gate"]
    for g in decision["guards"]:
        value = "not measured" if g["value"] is None else f"{g['value']:.4g}"
        mark = "pass" if g["passed"] else "FAIL"
        lines.append(f"guard {g['name']:<22} {mark:<5} value {value:<12} bound {g['bound']}")
    lines.append(
        "verdict: "
        + ("DEPLOY" if decision["deploy"] else "REFUSE: " + "; ".join(decision["reasons"]))
    )
    return "\n".join(lines)
