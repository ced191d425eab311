"""The statistics of the gate: paired win-rates with intervals, the length-controlled win-rate,
the KL estimators and the intrinsic text metrics.

All intervals are 95% paired bootstraps over prompts from `scipy.stats.bootstrap` (BCa; the
percentile interval where BCa is undefined, e.g. when every prompt gives the same value).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from scipy import stats

log = logging.getLogger(__name__)


def distinct_n(replies: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the replies (word level); 0 when there are none."""
    grams = [
        tuple(ws[i : i + n]) for r in replies for ws in [r.split()] for i in range(len(ws) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def text_overlap(replies: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, 0..100) and mean ROUGE-L F1 (rouge-score, 0..1) of `replies`
    against one human reference each. Reported beside perplexity, never gated: a chat reply
    can be good and share no words with the human one."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [
        scorer.score(ref, hyp)["rougeL"].fmeasure
        for hyp, ref in zip(replies, references, strict=True)
    ]
    return {
        "bleu": float(sacrebleu.corpus_bleu(replies, [references]).score),
        "rouge_l": float(np.mean(rouge)) if rouge else 0.0,
    }


def wins(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per item: 1 where a beats b, 0.5 on a tie, 0 where b wins (any shape, elementwise)."""
    return (a > b).astype(float) + 0.5 * (a == b)


def paired_interval(
    data: tuple[np.ndarray, ...],
    statistic: Callable[..., float],
    resamples: int,
    seed: int,
) -> tuple[float, float, float]:
    """(estimate, lower, upper): `statistic(*data)` and its 95% paired bootstrap interval.

    The arrays are paired by position (one entry per prompt): a resample draws prompts, so
    both versions' replies to a prompt always travel together.
    """
    estimate = float(statistic(*data))
    if len(data[0]) < 2:
        return estimate, estimate, estimate
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # degenerate data: handled by the fallback below
            result = stats.bootstrap(
                data,
                statistic,
                n_resamples=resamples,
                paired=True,
                vectorized=False,
                confidence_level=0.95,
                method=method,
                random_state=np.random.default_rng(seed),
            )
        lo, hi = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if math.isfinite(lo) and math.isfinite(hi):
            return estimate, min(lo, estimate), max(hi, estimate)
    return estimate, estimate, estimate  # every resample gives the same value


def win_rate(a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> tuple[float, float, float]:
    """Share of prompts where a beats b (ties half; a (N, k) array averages k samples per
    prompt first), with its 95% paired bootstrap interval over prompts."""
    per_prompt = wins(a, b).reshape(len(a), -1).mean(axis=1)
    return paired_interval((per_prompt,), np.mean, resamples, seed)


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0) -> np.ndarray:
    """θ of P(y=1) = σ(θ0 + θ1 x) for soft labels y in [0, 1], by Newton's method, with an
    L2 penalty on θ1 (and a tiny one on θ0) so a perfect separation stays finite."""
    features = np.stack([np.ones_like(x), x], axis=1)  # (N, 2)
    penalty = np.diag([1e-6, l2])
    theta = np.zeros(2)
    for _ in range(50):
        p = 1 / (1 + np.exp(-features @ theta))
        grad = features.T @ (p - y) + penalty @ theta
        hess = features.T @ (features * (p * (1 - p))[:, None]) + penalty
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-8:
            break
    return theta


def length_controlled(prefs: np.ndarray, length_diff: np.ndarray) -> float:
    """The win-rate at equal length: σ(θ0) of a logistic regression of the judge's preference
    on tanh(length difference / its std), as AlpacaEval's length-controlled win-rate does
    (Dubois et al. 2024, https://arxiv.org/abs/2404.04475, Eq. 3, one model pair)."""
    scale = float(np.std(length_diff)) or 1.0
    theta = _fit_logistic(np.tanh(length_diff / scale), prefs)
    return float(1 / (1 + np.exp(-theta[0])))


def lc_win_rate(
    prefs: np.ndarray, length_diff: np.ndarray, resamples: int, seed: int
) -> tuple[float, float, float]:
    """Length-controlled win-rate with its 95% paired bootstrap interval over prompts.

    prefs: per prompt, the judge's preference for the candidate (1 / 0.5 / 0, or a mean of
    several samples); length_diff: candidate minus baseline reply length (tokens) per prompt.
    """
    return paired_interval((prefs, length_diff), length_controlled, resamples, seed)


def kl_estimates(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """KL(candidate ‖ reference) from tokens sampled by the candidate, (B, R) each.

    k1 = log p − log q and k3 = (q/p − 1) − log(q/p) per token, both unbiased for the KL when
    the tokens come from p (http://joschu.net/blog/kl-approx.html); k3 is never negative.
    Returned in nats per token (over all reply tokens) and per reply (sum, then mean).
    """
    mask = mask.float()
    log_ratio = (logprobs - ref_logprobs) * mask  # (B, R)
    k3 = (torch.expm1(-log_ratio) + log_ratio) * mask  # (B, R)
    tokens = mask.sum().clamp(min=1)
    return {
        "kl/k1_per_token": (log_ratio.sum() / tokens).item(),
        "kl/k3_per_token": (k3.sum() / tokens).item(),
        "kl/k1_per_reply": log_ratio.sum(dim=1).mean().item(),
        "kl/k3_per_reply": k3.sum(dim=1).mean().item(),
    }
