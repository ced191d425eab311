"""The maths of token-level PPO for language models, as pure tensor functions.

Follows "The 37 Implementation Details of PPO" and "The N Implementation Details of RLHF with
PPO" (Huang et al., https://iclr-blog-track.github.io/2022/03/25/ppo-implementation-details/,
https://huggingface.co/blog/the_n_implementation_details_of_rlhf_with_ppo). Shapes: B sequences,
R response tokens; `mask` (B, R) is 1 on real reply tokens (up to and including the first
end-of-turn token) and 0 after.
"""

from __future__ import annotations

import math

import torch

from agent.errors import RLChatError


class PPODivergedError(RLChatError, RuntimeError):
    """Training went numerically wrong (NaN loss, KL past the bound); the run stops here.

    An `RLChatError`, so `rlchat` prints it as one line (with the last good checkpoint)."""


# ---- masked statistics -------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` where `mask` is 1 (over all elements, or along `dim`)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` where `mask` is 1 (Bessel-corrected by default)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked elements; `shift_mean=False` keeps the mean (for rewards)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# ---- log-probabilities, entropy, KL ------------------------------------------------------


def entropy_of(logits: torch.Tensor, temperature: float = 1.0, chunk: int = 4) -> torch.Tensor:
    """Entropy of softmax(logits / temperature): (B, R, V) -> (B, R) in fp32, a few rows at a
    time so no full fp32 (B, R, V) copy exists at once (the same chunking as `logprobs_of`)."""
    out = []
    for i in range(0, logits.shape[0], chunk):
        logp = torch.log_softmax(logits[i : i + chunk].float() / temperature, dim=-1)  # (b, R, V)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out)


def kl_estimate(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy.

    k1 = log p - log q (unbiased, can be negative); k3 = (r - 1) - log r with r = q / p
    (unbiased, always >= 0, lower variance). See http://joschu.net/blog/kl-approx.html.
    """
    log_ratio = logprobs - ref_logprobs  # (B, R)
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"kl_estimator: {kind!r} is not one of k1, k3")


# ---- rewards, advantages, returns ---------------------------------------------------------


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards (B, R): -kl_coef * KL on every reply token, plus the score at the last."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)  # (B,)
    rewards[torch.arange(len(scores), device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) -> (advantages, returns), (B, R).

    Past the last reply token the value is 0 (the episode ended), so the bootstrap of the last
    token is its reward alone. One reversed loop over R computing whole-batch tensors.
    """
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(rewards[:, 0])
    next_values = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages[:, t] = last_gae
        next_values = values[:, t]
    return advantages, advantages + values


def rloo_advantages(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740).

    Replies come in groups of `k` to the same context (rows i*k .. i*k+k-1). Each reply's return
    is its score minus kl_coef times its summed per-token KL (the same penalty PPO puts on every
    token); its baseline is the mean return of the other k - 1 replies to the same context.
    Returns (advantages (B,), returns (B,)); the advantage applies to every token of the reply.
    """
    returns = token_rewards(scores, kl, mask, kl_coef).sum(1)  # (B,)
    grouped = returns.view(-1, k)  # (B / k, k)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1), returns


def affine_stats(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sums (n, Σx, Σy, Σx², Σxy) over the masked entries: add them up across processes, then
    `affine_fit`."""
    m = mask.to(torch.float64)
    x, y = x.to(torch.float64) * m, y.to(torch.float64) * m
    return torch.stack([m.sum(), x.sum(), y.sum(), (x * x).sum(), (x * y).sum()])


def affine_fit(stats: torch.Tensor) -> tuple[float, float]:
    """Least-squares (a, b) of y ≈ a·x + b from `affine_stats`; a = 0 when x is constant."""
    n, sx, sy, sxx, sxy = stats.tolist()
    if n < 1:
        return 1.0, 0.0
    var_x = sxx / n - (sx / n) ** 2
    a = (sxy / n - sx * sy / n**2) / var_x if var_x > 1e-12 else 0.0
    return a, sy / n - a * sx / n


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over masked tokens (1: perfect, <= 0: useless)."""
    var_returns = masked_var(returns, mask)
    if var_returns.item() == 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask) / var_returns)


# ---- losses --------------------------------------------------------------------------------


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate objective (as a loss to minimise) and its diagnostics."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * max((v - R)^2, (v_clip - R)^2) and the fraction clipped."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    losses = (values - returns) ** 2
    losses_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(losses, losses_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((losses_clipped > losses).float(), mask)
    return loss, clipfrac


# ---- controllers and normalisers -----------------------------------------------------------


class KLController:
    """The KL coefficient: fixed, or adaptive (Ziegler et al. 2019, https://arxiv.org/abs/1909.08593):
    a proportional controller that moves the coefficient so the sequence KL tracks `target`."""

    def __init__(self, init: float, target: float | None = None, horizon: int = 10_000) -> None:
        self.value = init
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """After a batch of `n_steps` sequences with mean KL `current_kl` (nats per sequence)."""
        if self.target is None:
            return
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class RunningMoments:
    """Running mean and std of scores (Chan et al.'s parallel update), for reward normalisation."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, xs: torch.Tensor) -> None:
        xs = xs.double()
        n = xs.numel()
        if n == 0:
            return
        batch_mean, batch_var = xs.mean().item(), xs.var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var, self.count = m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.count > 1 else 1.0

    def normalize(self, xs: torch.Tensor) -> torch.Tensor:
        return (xs - self.mean) / max(self.std, 1e-4)

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = (
            float(state["mean"]),
            float(state["var"]),
            int(state["count"]),
        )
