"""`rlchat eval`: a candidate policy against a baseline (default: the deployed one) on
held-out prompts, and the deployment gate.

Per version: reward-model score, reply length, distinct-1/2, perplexity on held-out human
replies (chitchat conversations the starter never trained on) and, when an oracle is
named, the oracle's score. Between them: win-rate judged by the reward model (and by the
oracle) with a bootstrap confidence interval, and the candidate's KL to its reference (the
version it was trained from), estimated on its own samples: E_y~cand [log p_cand(y) - log p_ref(y)].

The gate deploys only when the reward model is trustworthy (held-out accuracy), the
candidate wins (reward-model win-rate) and stays close to its reference (KL).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from agent.chat import ChatAgent, SamplingParams
from agent.config import Settings
from agent.errors import ConfigError, NotFoundError, ValidationError
from agent.modeling import Policy, encode_chat, end_of_turn_ids
from agent.store.api import Store
from rl.env import Prompt, db_prompts, jsonl_prompts
from rl.oracles import load_oracle
from rl.reward_model import RewardModel

log = logging.getLogger(__name__)
Chat = list[dict[str, str]]


@dataclass
class Config:
    """What to compare, on which prompts, and the gate's bounds."""

    candidate: int | None = None
    """Policy version to evaluate (default: the newest candidate policy)."""
    baseline: int | None = None
    """Policy version to compare with (default: the deployed one)."""
    reward_version: int | None = None
    """Reward model version that judges (default: the newest reward version)."""
    oracle: str = ""
    """Hidden-preference oracle to report as well (follow_up, positive, concise, module:function)."""
    prompts: str = "db"
    """db: held-out user turns of logged conversations; or a JSONL file of prompts."""
    num_prompts: int = 64
    """Prompts to evaluate on (the first N of the held-out split)."""
    heldout_fraction: float = 0.2
    """Share of conversations held out (the same hash split as the training jobs)."""
    human_replies: int = 64
    """Held-out human replies (chitchat) for perplexity (0: skip)."""
    max_new_tokens: int = 32
    """Reply length limit."""
    temperature: float = 0.7
    """Sampling temperature (each prompt has its own seed, the same for both versions)."""
    bootstrap: int = 1000
    """Bootstrap resamples for the win-rate intervals."""
    seed: int = 0
    """Seed of the sampling and the bootstrap."""
    device: str = "auto"
    """auto, cpu or cuda."""
    gate_min_win_rate: float = 0.55
    """Deploy only if the reward-model win-rate is at least this."""
    gate_max_kl: float = 20.0
    """Deploy only if the candidate's KL to its reference is at most this (nats per reply)."""
    gate_min_reward_accuracy: float = 0.6
    """Deploy only if the judging reward model's held-out pairwise accuracy is at least this."""

    def __post_init__(self) -> None:
        for name in ("num_prompts", "max_new_tokens", "bootstrap"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.oracle:
            load_oracle(self.oracle)


def distinct_n(replies: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the replies (word level); 0 when there are none."""
    grams = [
        tuple(ws[i : i + n]) for r in replies for ws in [r.split()] for i in range(len(ws) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def win_rate(a: np.ndarray, b: np.ndarray, bootstrap: int, seed: int) -> tuple[float, float, float]:
    """Share of items where a beats b (ties count half), with a 95% bootstrap interval."""
    wins = (a > b).astype(float) + 0.5 * (a == b)
    rng = np.random.default_rng(seed)
    samples = wins[rng.integers(0, len(wins), size=(bootstrap, len(wins)))].mean(axis=1)
    return (
        float(wins.mean()),
        float(np.quantile(samples, 0.025)),
        float(np.quantile(samples, 0.975)),
    )


@torch.no_grad()
def reply_logprobs(policy: Policy, contexts: list[Chat], replies: list[str]) -> list[torch.Tensor]:
    """Per reply, the log-probabilities of its tokens (and the end-of-turn token) given its context."""
    tok, model = policy.tokenizer, policy.model
    eot = end_of_turn_ids(tok)[:1]
    limit = getattr(model.config, "max_position_embeddings", 2048)
    out = []
    for context, reply in zip(contexts, replies, strict=True):
        prompt = encode_chat(tok, context)
        target = tok(reply, add_special_tokens=False)["input_ids"] + eot
        ids = (prompt + target)[-limit:]
        n = min(len(target), len(ids) - 1)
        logits = model(input_ids=torch.tensor([ids], device=policy.device)).logits[0, -n - 1 : -1]
        logps = torch.log_softmax(logits.float(), dim=-1)
        out.append(
            logps.gather(-1, torch.tensor(ids[-n:], device=policy.device)[:, None])[:, 0].cpu()
        )
    return out


def human_replies(n: int) -> tuple[list[Chat], list[str]]:
    """The first assistant turn of `n` held-out chitchat conversations, with its context."""
    from agent.starter import StarterConfig, split_conversations
    from agent.tiny import chitchat_conversations

    _, held_out = split_conversations(chitchat_conversations(), StarterConfig())
    contexts, replies = [], []
    for conv in held_out[:n]:
        i = next(i for i, m in enumerate(conv) if m["role"] == "assistant")
        contexts.append(conv[:i])
        replies.append(conv[i]["content"])
    return contexts, replies


def load_prompts(config: Config, store: Store) -> list[Prompt]:
    if config.prompts == "db":
        prompts = db_prompts(
            store, "heldout", heldout_fraction=config.heldout_fraction, seed=config.seed
        )
    else:
        prompts = jsonl_prompts(config.prompts)
    if not prompts:
        raise ValidationError(
            "no held-out prompts to evaluate on: log some conversations (or `rlchat simulate`) "
            "or give prompts=FILE.jsonl"
        )
    return prompts[: config.num_prompts]


def _version_metrics(
    agent: ChatAgent,
    version: int,
    prompts: list[Prompt],
    config: Config,
    human: tuple[list[Chat], list[str]],
) -> tuple[list[str], dict[str, float]]:
    replies = []
    for i, p in enumerate(tqdm(prompts, desc=f"replies of version {version}", unit="prompt")):
        sampling = SamplingParams(
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            seed=config.seed + i,
        )
        replies.append(agent.generate(p.messages, sampling, version_id=version))
    metrics = {
        "length/words": float(np.mean([len(r.split()) for r in replies])),
        "distinct/1": distinct_n(replies, 1),
        "distinct/2": distinct_n(replies, 2),
    }
    if human[0]:
        logps = reply_logprobs(agent.policy(version), *human)
        nll = -torch.cat(logps).mean().item()
        metrics["human/perplexity"] = math.exp(nll)
    return replies, metrics


def _kl_to_reference(
    agent: ChatAgent, store: Store, version: int, prompts: list[Prompt], replies: list[str]
) -> float:
    parent = store.get_model_version(version).parent_id
    if parent is None or store.get_model_version(parent).kind == "reward":
        return 0.0
    contexts = [p.messages for p in prompts]
    cand = reply_logprobs(agent.policy(version), contexts, replies)
    ref = reply_logprobs(agent.policy(parent), contexts, replies)
    return float(np.mean([(c - r).sum().item() for c, r in zip(cand, ref, strict=True)]))


def pick_versions(config: Config, store: Store) -> tuple[int, int, int]:
    """(candidate, baseline, reward) ids, defaults filled in, with errors that say what is missing."""
    deployed = store.deployed_version()
    baseline = config.baseline or (deployed.id if deployed else None)
    if baseline is None:
        raise NotFoundError("no baseline: nothing is deployed; give baseline=ID")
    candidates = [
        v
        for v in store.list_model_versions()
        if v.kind in ("sft", "ppo") and v.status == "candidate"
    ]
    candidate = config.candidate or (candidates[-1].id if candidates else None)
    if candidate is None:
        raise NotFoundError(
            "no candidate policy version to evaluate; train one or give candidate=ID"
        )
    rewards = store.list_model_versions("reward")
    reward = config.reward_version or (rewards[-1].id if rewards else None)
    if reward is None:
        raise NotFoundError(
            "no reward model version; run `rlchat train reward` or give reward_version=ID"
        )
    return candidate, baseline, reward


def evaluate(
    config: Config, store: Store, settings: Settings, agent: ChatAgent | None = None
) -> dict[str, Any]:
    """All metrics of candidate vs baseline, and the gate's decision (not acted on)."""
    candidate, baseline, reward_id = pick_versions(config, store)
    agent = agent or ChatAgent(store, settings, device=config.device)
    prompts = load_prompts(config, store)
    human = human_replies(config.human_replies) if config.human_replies else ([], [])
    cand_replies, cand_m = _version_metrics(agent, candidate, prompts, config, human)
    base_replies, base_m = _version_metrics(agent, baseline, prompts, config, human)
    contexts = [p.messages for p in prompts]
    reward_version = store.get_model_version(reward_id)
    rm = RewardModel.load(reward_version.path, device=config.device)
    cand_r = rm.score(contexts, cand_replies).numpy()
    base_r = rm.score(contexts, base_replies).numpy()
    del rm
    metrics: dict[str, Any] = {
        "candidate": candidate,
        "baseline": baseline,
        "reward_version": reward_id,
        "prompts": len(prompts),
        "reward/candidate": float(cand_r.mean()),
        "reward/baseline": float(base_r.mean()),
        "kl/candidate": _kl_to_reference(agent, store, candidate, prompts, cand_replies),
        "reward_model/accuracy": float(
            reward_version.metrics.get("eval/pairwise_accuracy", float("nan"))
        ),
    }
    metrics["win_rate/reward"], metrics["win_rate/reward_lo"], metrics["win_rate/reward_hi"] = (
        win_rate(cand_r, base_r, config.bootstrap, config.seed)
    )
    for key in cand_m:
        metrics[f"{key}/candidate"], metrics[f"{key}/baseline"] = cand_m[key], base_m[key]
    if config.oracle:
        _, oracle = load_oracle(config.oracle)
        cand_o = np.array([oracle(c, r) for c, r in zip(contexts, cand_replies, strict=True)])
        base_o = np.array([oracle(c, r) for c, r in zip(contexts, base_replies, strict=True)])
        metrics["oracle"] = config.oracle
        metrics["oracle/candidate"], metrics["oracle/baseline"] = (
            float(cand_o.mean()),
            float(base_o.mean()),
        )
        metrics["win_rate/oracle"], metrics["win_rate/oracle_lo"], metrics["win_rate/oracle_hi"] = (
            win_rate(cand_o, base_o, config.bootstrap, config.seed)
        )
    metrics["gate"] = gate(metrics, config)
    metrics["samples"] = [
        {"prompt": p.messages[-1]["content"], "candidate": c, "baseline": b}
        for p, c, b in list(zip(prompts, cand_replies, base_replies, strict=True))[:5]
    ]
    return metrics


def run_recorded(config: Config, store: Store, settings: Settings) -> tuple[int, dict[str, Any]]:
    """`evaluate` as an `eval` training run, so the decision and its numbers are kept (and
    shown on the dashboard); returns (run id, metrics)."""
    from rl.runs import training_run

    with training_run(store, settings, "eval", config) as run:
        metrics = evaluate(config, store, settings)
        run.finish(metrics=metrics)
    return run.id, metrics


def gate(metrics: dict[str, Any], config: Config) -> dict[str, Any]:
    """The deployment decision and every reason against it."""
    reasons = []
    accuracy = metrics["reward_model/accuracy"]
    if not accuracy >= config.gate_min_reward_accuracy:  # also refuses NaN
        reasons.append(
            f"reward model held-out accuracy {accuracy:.3f} < {config.gate_min_reward_accuracy}: "
            "its scores cannot be trusted"
        )
    if metrics["win_rate/reward"] < config.gate_min_win_rate:
        reasons.append(f"win-rate {metrics['win_rate/reward']:.3f} < {config.gate_min_win_rate}")
    if metrics["kl/candidate"] > config.gate_max_kl:
        reasons.append(f"KL to reference {metrics['kl/candidate']:.2f} > {config.gate_max_kl}")
    return {"deploy": not reasons, "reasons": reasons}


def format_table(metrics: dict[str, Any]) -> str:
    """Candidate and baseline side by side, then the comparisons and the gate."""
    lines = [f"{'metric':<22} {'candidate':>12} {'baseline':>12}"]
    for key in sorted(
        k.rsplit("/", 1)[0] for k in metrics if k.endswith("/candidate") and k != "kl/candidate"
    ):
        lines.append(
            f"{key:<22} {metrics[key + '/candidate']:>12.4f} {metrics[key + '/baseline']:>12.4f}"
        )
    lines.append(f"{'kl to reference':<22} {metrics['kl/candidate']:>12.4f}")
    for judge in ("reward", "oracle"):
        if f"win_rate/{judge}" in metrics:
            lo, hi = metrics[f"win_rate/{judge}_lo"], metrics[f"win_rate/{judge}_hi"]
            lines.append(
                f"{'win-rate (' + judge + ')':<22} {metrics[f'win_rate/{judge}']:>12.3f}   95% CI [{lo:.3f}, {hi:.3f}]"
            )
    decision = metrics["gate"]
    lines.append(
        "gate: " + ("DEPLOY" if decision["deploy"] else "REFUSE: " + "; ".join(decision["reasons"]))
    )
    return "\n".join(lines)
