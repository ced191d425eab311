"""`rlchat eval`: a candidate policy against the deployed one on test-split prompts, and the gate.

Both versions sample replies to the same prompts under one explicit sampling configuration
(`agent.sampling`, nothing inherited from `generation_config.json`; by default the PPO
rollouts' own). Measured, per version: reply length, distinct-1/2, perplexity of held-out human
replies, the PPO reward model's and the judge's scores, and the oracle's when one is named.
Between them: the judge's win-rate with its 95% paired interval over prompts, the
length-controlled win-rate (AlpacaEval style), and the true KL(candidate ‖ deployed): the
candidate's own sampled token ids scored under both policies (no decode / re-encode), k1 and
k3, per token and per reply.

The judge is a reward model trained on the judge split only (`rlchat train reward --set
train_split=judge`): PPO never optimised against it, and its accuracy is read on the test
split. The gate (`rl.gate`) deploys only when every guard passes; each refusal names the
guard, the measured value and the bound.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from agent.chat import ChatAgent
from agent.config import Settings
from agent.errors import ConfigError, NotFoundError, ValidationError
from agent.modeling import Policy, encode_chat, end_of_turn_ids
from agent.sampling import Sampling, generation_config, sample, token_logprobs
from agent.store.api import Store
from rl import eval_stats
from rl.env import Prompt, db_prompts, jsonl_prompts
from rl.gate import GateBounds, gate
from rl.oracles import load_oracle
from rl.reward_model import RewardModel

log = logging.getLogger(__name__)
Chat = list[dict[str, str]]


@dataclass
class Config(GateBounds):
    """What to compare, on which prompts, how replies are sampled, and the gate's bounds."""

    candidate: int | None = None
    """Policy version to evaluate (default: the newest candidate policy)."""
    baseline: int | None = None
    """Policy version to compare with (default: the deployed one)."""
    reward_version: int | None = None
    """PPO's reward model, reported (default: the newest reward version trained on train)."""
    judge_version: int | None = None
    """The judge (default: the newest reward version trained on the judge split)."""
    oracle: str = ""
    """Hidden-preference oracle to report as well (a name in rl.oracles.BUILTIN, or module:function)."""
    prompts: str = "db"
    """db: user turns of the test split's conversations; or a JSONL file (its test lines)."""
    num_prompts: int = 64
    """Prompts to evaluate on (the first N of the test split)."""
    samples_per_prompt: int = 2
    """Replies per prompt and version; the win-rate averages them per prompt (paired by prompt)."""
    human_replies: int = 64
    """Held-out human replies (chitchat) for perplexity (0: skip, and the guard refuses)."""
    max_new_tokens: int = 48
    """Reply length limit (the pipeline sets PPO's)."""
    temperature: float = 1.0
    """Sampling temperature (the pipeline sets PPO's; log-probs use the same)."""
    top_k: int = 0
    """Top-k of the sampler (0: off; the KL is of the full softmax, so keep it off)."""
    top_p: float = 1.0
    """Nucleus mass of the sampler (1.0: off; as for top_k)."""
    batch_size: int = 16
    """Prompts sampled (and scored) per forward."""
    bootstrap: int = 2000
    """Bootstrap resamples for the intervals."""
    seed: int = 0
    """Seed of the sampling and the bootstrap."""
    device: str = "auto"
    """auto, cpu or cuda."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_prompts", "samples_per_prompt", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.bootstrap < 100:
            raise ConfigError(f"bootstrap: must be >= 100, got {self.bootstrap}")
        try:
            self.sampling()
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if self.oracle:
            load_oracle(self.oracle)

    def sampling(self) -> Sampling:
        return Sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p)


# ---- sampling and scoring ------------------------------------------------------------------


@dataclass
class Samples:
    """One version's replies: the texts, and per batch the token ids as sampled."""

    replies: list[str]
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    """(sequences (B, P + R), attention mask (B, P + R), reply mask (B, R)) per batch."""

    @property
    def tokens(self) -> np.ndarray:
        """Reply length in tokens (the end-of-turn token included), (N,)."""
        return np.concatenate([m.sum(dim=1).numpy() for _, _, m in self.batches]).astype(float)


@torch.no_grad()
def sample_replies(
    policy: Policy, contexts: list[Chat], sampling: Sampling, batch_size: int, seed: int
) -> Samples:
    """Replies to `contexts` sampled under exactly `sampling`, kept as token ids too."""
    tok, model = policy.tokenizer, policy.model
    eos = end_of_turn_ids(tok)
    config = generation_config(sampling, eos, tok.pad_token_id)
    limit = model.config.max_position_embeddings - sampling.max_new_tokens
    torch.manual_seed(seed)
    replies, batches = [], []
    for start in range(0, len(contexts), batch_size):
        encoded = [encode_chat(tok, c)[-limit:] for c in contexts[start : start + batch_size]]
        width = max(len(ids) for ids in encoded)
        ids = torch.full((len(encoded), width), tok.pad_token_id, dtype=torch.long)  # (B, P)
        mask = torch.zeros_like(ids)  # (B, P)
        for row, e in enumerate(encoded):  # left padding
            ids[row, width - len(e) :], mask[row, width - len(e) :] = torch.tensor(e), 1
        seq = sample(model, ids.to(policy.device), mask.to(policy.device), config).cpu()
        reply = seq[:, width:]  # (B, R)
        is_eos = torch.isin(reply, torch.tensor(eos))  # (B, R)
        after_end = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0  # (B, R)
        reply_mask = ~after_end & (reply != tok.pad_token_id)  # (B, R)
        attention = torch.cat([mask, torch.ones_like(reply)], dim=1)  # (B, P + R)
        batches.append((seq, attention, reply_mask))
        for row in range(len(encoded)):
            text_ids = reply[row][reply_mask[row] & ~is_eos[row]]
            replies.append(tok.decode(text_ids, skip_special_tokens=True).strip())
    return Samples(replies, batches)


@torch.no_grad()
def sampled_logprobs(policy: Policy, samples: Samples, temperature: float) -> torch.Tensor:
    """Log-probs under `policy` of the sampled reply tokens, (N, R_max) (0 past each reply)."""
    rows = []
    width = max(m.shape[1] for _, _, m in samples.batches)
    for seq, attention, reply_mask in samples.batches:
        n_reply = reply_mask.shape[1]
        logps = token_logprobs(
            policy.model, seq.to(policy.device), attention.to(policy.device), n_reply, temperature
        ).cpu()
        rows.append(torch.nn.functional.pad(logps * reply_mask, (0, width - n_reply)))
    return torch.cat(rows)


def reply_masks(samples: Samples) -> torch.Tensor:
    """The reply masks of all batches, (N, R_max)."""
    width = max(m.shape[1] for _, _, m in samples.batches)
    return torch.cat(
        [torch.nn.functional.pad(m, (0, width - m.shape[1])) for _, _, m in samples.batches]
    )


@torch.no_grad()
def human_perplexity(policy: Policy, contexts: list[Chat], replies: list[str]) -> float:
    """Perplexity of human `replies` (and their end-of-turn token) given their contexts."""
    tok, model = policy.tokenizer, policy.model
    eot = end_of_turn_ids(tok)[:1]
    limit = model.config.max_position_embeddings
    total, count = 0.0, 0
    for context, reply in zip(contexts, replies, strict=True):
        target = tok(reply, add_special_tokens=False)["input_ids"] + eot
        ids = (encode_chat(tok, context) + target)[-limit:]
        n = min(len(target), len(ids) - 1)
        seq = torch.tensor([ids], device=policy.device)
        logps = token_logprobs(model, seq, torch.ones_like(seq), n)
        total, count = total - logps.sum().item(), count + n
    return math.exp(total / max(count, 1))


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
    """The test split's prompts (deduplicated against train prompts), the first num_prompts."""
    if config.prompts == "db":
        prompts = db_prompts(store, "test")
    else:
        prompts = jsonl_prompts(config.prompts, "test")
    if not prompts:
        raise ValidationError(
            "no test-split prompts to evaluate on: log more conversations (or `rlchat simulate`) "
            "or give prompts=FILE.jsonl"
        )
    return prompts[: config.num_prompts]


# ---- versions ----------------------------------------------------------------------------


def _newest_reward(store: Store, split: str) -> int | None:
    versions = [
        v
        for v in store.list_model_versions("reward")
        if v.metrics.get("data/train_split", "train") == split
    ]
    return versions[-1].id if versions else None


def pick_versions(config: Config, store: Store) -> dict[str, int]:
    """Candidate, baseline, reward and judge ids, defaults filled in; errors say what is missing."""
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
    reward = config.reward_version or _newest_reward(store, "train")
    if reward is None:
        raise NotFoundError(
            "no reward model version; run `rlchat train reward` or give reward_version=ID"
        )
    judge = config.judge_version or _newest_reward(store, "judge")
    if judge is None:
        raise NotFoundError(
            "no judge: train one on the judge split with `rlchat train reward --set "
            "train_split=judge`, or give judge_version=ID"
        )
    return {"candidate": candidate, "baseline": baseline, "reward": reward, "judge": judge}


# ---- measuring ---------------------------------------------------------------------------


@dataclass
class Observations:
    """Everything measured, per prompt where it is per prompt; `summarise` turns it into metrics."""

    prompts: list[Prompt]
    candidate: list[str]
    """Candidate replies, prompt-major (samples_per_prompt per prompt)."""
    baseline: list[str]
    tokens: dict[str, np.ndarray]
    """Reply lengths in tokens per version, (N * k,)."""
    scores: dict[str, dict[str, np.ndarray]]
    """Per scorer (judge, reward, oracle) and version: scores (N * k,)."""
    kl: dict[str, float]
    perplexity: dict[str, float]
    accuracy: dict[str, float]
    """Test-split pairwise accuracy of the judge and of PPO's reward model (NaN: unknown)."""
    overlap: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per version: BLEU and ROUGE-L of its replies to the human replies' contexts."""


def _rm_scores(
    path: str, contexts: list[Chat], cand: list[str], base: list[str], device: str
) -> dict[str, np.ndarray]:
    """A saved reward model's normalised scores of both versions' replies."""
    rm = RewardModel.load(path, device=device)
    return {
        "candidate": rm.score(contexts, cand).numpy(),
        "baseline": rm.score(contexts, base).numpy(),
    }


def _accuracy(store: Store, version_id: int) -> float:
    """A reward version's test-split accuracy (NaN when it has none: nothing to trust)."""
    value = store.get_model_version(version_id).metrics.get("test/pairwise_accuracy")
    return math.nan if value is None else float(value)


def measure(
    config: Config, store: Store, agent: ChatAgent, versions: dict[str, int]
) -> Observations:
    """Sample both versions, score the candidate's own tokens under both, run the scorers."""
    prompts = load_prompts(config, store)
    k = config.samples_per_prompt
    contexts = [p.messages for p in prompts for _ in range(k)]
    human = human_replies(config.human_replies) if config.human_replies else ([], [])
    sampling = config.sampling()
    out: dict[str, Samples] = {}
    ppl: dict[str, float] = {}
    overlap: dict[str, dict[str, float]] = {}
    for side in ("candidate", "baseline"):  # one version at a time: they may share a base
        policy = agent.policy(versions[side])
        out[side] = sample_replies(policy, contexts, sampling, config.batch_size, config.seed)
        if side == "candidate":
            logprobs = sampled_logprobs(policy, out["candidate"], sampling.temperature)
        else:
            ref_logprobs = sampled_logprobs(policy, out["candidate"], sampling.temperature)
        if human[0]:
            ppl[side] = human_perplexity(policy, *human)
            answers = sample_replies(policy, human[0], sampling, config.batch_size, config.seed)
            overlap[side] = eval_stats.text_overlap(answers.replies, human[1])
    kl = eval_stats.kl_estimates(logprobs, ref_logprobs, reply_masks(out["candidate"]))
    cand, base = out["candidate"].replies, out["baseline"].replies
    scores = {
        name: _rm_scores(
            store.get_model_version(versions[name]).path, contexts, cand, base, config.device
        )
        for name in ("judge", "reward")
    }
    if config.oracle:
        _, oracle = load_oracle(config.oracle)
        scores["oracle"] = {
            "candidate": np.array([oracle(c, r) for c, r in zip(contexts, cand, strict=True)]),
            "baseline": np.array([oracle(c, r) for c, r in zip(contexts, base, strict=True)]),
        }
    return Observations(
        prompts=prompts,
        candidate=cand,
        baseline=base,
        tokens={side: s.tokens for side, s in out.items()},
        scores=scores,
        kl=kl,
        perplexity=ppl,
        overlap=overlap,
        accuracy={name: _accuracy(store, versions[name]) for name in ("judge", "reward")},
    )


# ---- summarising -------------------------------------------------------------------------


def summarise(obs: Observations, config: Config) -> dict[str, Any]:
    """Metrics of both versions, the comparisons with intervals, and the gate's decision."""
    n, k = len(obs.prompts), config.samples_per_prompt
    m: dict[str, Any] = {"prompts": n, "samples_per_prompt": k, "oracle": config.oracle, **obs.kl}
    for side, replies in (("candidate", obs.candidate), ("baseline", obs.baseline)):
        m[f"length/words/{side}"] = float(np.mean([len(r.split()) for r in replies]))
        m[f"length/tokens/{side}"] = float(obs.tokens[side].mean())
        m[f"distinct/1/{side}"] = eval_stats.distinct_n(replies, 1)
        m[f"distinct/2/{side}"] = eval_stats.distinct_n(replies, 2)
        if side in obs.perplexity:
            m[f"human/perplexity/{side}"] = obs.perplexity[side]
        for name, value in obs.overlap.get(side, {}).items():
            m[f"human/{name}/{side}"] = value
    for name, acc in obs.accuracy.items():
        m[f"{name}/test_accuracy"] = acc
    for name, s in obs.scores.items():
        cand, base = s["candidate"].reshape(n, k), s["baseline"].reshape(n, k)
        m[f"{name}/candidate"], m[f"{name}/baseline"] = float(cand.mean()), float(base.mean())
        rate, lo, hi = eval_stats.win_rate(cand, base, config.bootstrap, config.seed)
        m[f"win_rate/{name}"], m[f"win_rate/{name}_lo"], m[f"win_rate/{name}_hi"] = rate, lo, hi
    judge = obs.scores["judge"]
    prefs = eval_stats.wins(judge["candidate"], judge["baseline"]).reshape(n, k).mean(axis=1)
    length_diff = (obs.tokens["candidate"] - obs.tokens["baseline"]).reshape(n, k).mean(axis=1)
    lc, lc_lo, lc_hi = eval_stats.lc_win_rate(prefs, length_diff, config.bootstrap, config.seed)
    m["win_rate/judge_lc"], m["win_rate/judge_lc_lo"], m["win_rate/judge_lc_hi"] = lc, lc_lo, lc_hi
    m["gate"] = gate(m, config)
    m["samples"] = [
        {"prompt": p.messages[-1]["content"], "candidate": c, "baseline": b}
        for p, c, b in list(zip(obs.prompts, obs.candidate[::k], obs.baseline[::k], strict=True))[
            :5
        ]
    ]
    return m


def evaluate(
    config: Config, store: Store, settings: Settings, agent: ChatAgent | None = None
) -> dict[str, Any]:
    """All metrics of candidate vs baseline, and the gate's decision (not acted on)."""
    versions = pick_versions(config, store)
    agent = agent or ChatAgent(store, settings, device=config.device)
    metrics = summarise(measure(config, store, agent, versions), config)
    return {
        **{f"{k}_version" if k in ("reward", "judge") else k: v for k, v in versions.items()},
        **metrics,
    }


def run_recorded(config: Config, store: Store, settings: Settings) -> tuple[int, dict[str, Any]]:
    """`evaluate` as an `eval` training run, so the decision and its numbers are kept (and
    shown on the dashboard); returns (run id, metrics)."""
    from rl.runs import training_run

    with training_run(store, settings, "eval", config) as run:
        metrics = json_safe(evaluate(config, store, settings))
        run.finish(metrics=metrics)
    return run.id, metrics


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities as None (PostgreSQL's JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
