"""Token-level PPO for a LoRA policy: rollouts, the update, save and load.

    trainer = PPOTrainer(PPOConfig(), Policy(base_dir))        # + policy.set_adapters([sft])
    envs = DialogueVectorEnv(trainer.config.batch_size, prompts, reward)
    envs.reset(seed=0)
    for _ in range(iterations):
        metrics = trainer.train_step(envs)                      # rollout, score, update

The policy is the base (plus the SFT adapter, when there is one) plus a trainable LoRA adapter
named "ppo"; the reference is the same weights with that adapter switched off, so there is no
second copy of the model. The value head sits on the policy trunk (see `PolicyValueModel`).
The maths lives in `rl.ppo_core`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agent.errors import ConfigError
from agent.modeling import Policy, encode_chat, end_of_turn_ids
from rl.env import DialogueVectorEnv, Messages
from rl.ppo_core import (
    KLController,
    PPODivergedError,
    RunningMoments,
    ValueHead,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from rl.ppo_policy import (
    PolicyValueModel,
    Rollout,
    activate_ppo,
    add_ppo_adapter,
    left_pad,
    load_ppo,
    reply_mask,
    save_ppo,
    weights_digest,
)

log = logging.getLogger(__name__)


@dataclass
class PPOConfig:
    """PPO hyperparameters (defaults follow the N-implementation-details recipe, scaled down)."""

    batch_size: int = 16
    """Replies generated and scored per iteration, per process."""
    mini_batch_size: int = 8
    """Replies per gradient step; batch_size must be a multiple of it."""
    ppo_epochs: int = 2
    """Passes over each batch of rollouts."""
    learning_rate: float = 1e-4
    """AdamW learning rate of the LoRA adapter and the value head."""
    max_grad_norm: float = 1.0
    """Gradient clipping: the global norm of all trainable parameters."""
    max_prompt_tokens: int = 256
    """Contexts longer than this keep their last tokens."""
    max_new_tokens: int = 48
    """Longest reply in tokens; replies that hit it without ending get `missing_eos_penalty`."""
    temperature: float = 1.0
    """Sampling temperature of rollouts (log-probabilities use the same one)."""
    top_k: int = 0
    """Top-k of rollouts; 0 keeps the full distribution, which PPO's ratios assume."""
    top_p: float = 1.0
    """Nucleus sampling of rollouts; 1.0 keeps the full distribution."""
    gamma: float = 1.0
    """Discount over reply tokens."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """Policy ratio clip epsilon."""
    cliprange_value: float = 0.2
    """Value clip: how far a value may move from its rollout estimate per update."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    ent_coef: float = 0.0
    """Weight of the entropy bonus (0: none)."""
    kl_coef: float = 0.05
    """Per-token KL penalty coefficient (the initial one when adaptive)."""
    kl_estimator: str = "k1"
    """KL estimator of the penalty: k1 (log-ratio) or k3 (low-variance, non-negative)."""
    target_kl: float = 0.0
    """> 0: adapt kl_coef so the reply KL (nats) tracks this target; 0: fixed kl_coef."""
    kl_horizon: int = 10_000
    """Horizon (in replies) of the adaptive KL controller."""
    normalize_scores: bool = True
    """Normalise scores by their running mean and std before use."""
    score_clip: float = 5.0
    """Clip normalised scores to +-this (0: no clipping)."""
    missing_eos_penalty: float = 1.0
    """Subtracted from the score of replies that reach max_new_tokens without ending."""
    max_kl: float = 50.0
    """Stop the run when the mean reply KL to the reference exceeds this many nats."""
    lora_r: int = 16
    """LoRA rank of the PPO adapter."""
    lora_alpha: int = 32
    """LoRA alpha of the PPO adapter."""
    lora_dropout: float = 0.0
    """LoRA dropout; 0 keeps the first PPO epoch's ratios exactly 1."""
    lora_target_modules: str = "all-linear"
    """Modules the adapter wraps: all-linear or a comma-separated list (q_proj,v_proj)."""
    seed: int = 0
    """Seed of the adapter's initialisation, sampling and prompt draws."""

    def __post_init__(self) -> None:
        positive = (
            "batch_size",
            "mini_batch_size",
            "ppo_epochs",
            "max_new_tokens",
            "max_prompt_tokens",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.mini_batch_size:
            raise ConfigError(
                f"mini_batch_size: {self.mini_batch_size} does not divide batch_size {self.batch_size}"
            )
        if self.kl_estimator not in ("k1", "k3"):
            raise ConfigError(f"kl_estimator: {self.kl_estimator!r} is not one of k1, k3")
        if self.temperature <= 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        for name in ("learning_rate", "cliprange", "cliprange_value", "max_kl", "max_grad_norm"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")

    def lora_config(self) -> Any:
        """The peft LoraConfig of the PPO adapter."""
        from peft import LoraConfig

        targets = self.lora_target_modules
        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=targets
            if targets == "all-linear"
            else [t.strip() for t in targets.split(",")],
            task_type="CAUSAL_LM",
        )


class PPOTrainer:
    """PPO on a `Policy`: owns the PPO adapter, the value head, the optimizer and the controllers.

    Runs unchanged in one process or under `accelerate launch` (the module is DDP-wrapped by
    `accelerator.prepare`; metrics and the KL controller use cross-process means).
    """

    def __init__(self, config: PPOConfig, policy: Policy, accelerator: Any = None) -> None:
        from accelerate import Accelerator

        self.config = config
        self.accelerator = accelerator or Accelerator(cpu=policy.device.type == "cpu")
        self.tokenizer = policy.tokenizer
        self.device = policy.device
        self.end_ids = end_of_turn_ids(self.tokenizer)
        torch.manual_seed(config.seed)  # identical adapter and head on every process
        self.model, self.below = add_ppo_adapter(policy.model, config.lora_config())
        hidden_size = self.model.get_base_model().config.hidden_size
        self.value_head = ValueHead(hidden_size).to(self.device)
        self.module = PolicyValueModel(self.model, self.value_head)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, eps=1e-5)
        self.wrapped, self.optimizer = self.accelerator.prepare(self.module, optimizer)
        self.kl_ctl = KLController(config.kl_coef, config.target_kl or None, config.kl_horizon)
        self.score_moments = RunningMoments()
        torch.manual_seed(config.seed + 1 + self.accelerator.process_index)  # sampling differs
        n_train = sum(p.numel() for p in self.params)
        log.info(
            "PPO: %d trainable parameters (adapter + value head) on %s, process %d of %d",
            n_train, self.device, self.accelerator.process_index, self.accelerator.num_processes,
        )  # fmt: skip

    # ---- rollouts ------------------------------------------------------------------------

    @contextmanager
    def reference(self) -> Iterator[None]:
        """The reference policy: the same weights with the ppo adapter off (SFT stack kept)."""
        if not self.below:
            with self.model.disable_adapter():
                yield
            return
        self.model.base_model.set_adapter(self.below, inference_mode=True)
        try:
            yield
        finally:
            activate_ppo(self.model, self.below)

    @torch.no_grad()
    def _generate(self, contexts: list[Messages]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Sample one reply per context (left padding, KV cache) -> (sequences, prompt mask, P)."""
        cfg, tok = self.config, self.tokenizer
        rows = [encode_chat(tok, c)[-cfg.max_prompt_tokens :] for c in contexts]
        input_ids, prompt_mask = left_pad(rows, tok.pad_token_id, self.device)  # (B, P)
        self.model.eval()
        sequences = self.model.generate(
            input_ids=input_ids,
            attention_mask=prompt_mask,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=True,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            eos_token_id=self.end_ids,
            pad_token_id=tok.pad_token_id,
            suppress_tokens=[tok.pad_token_id],
            use_cache=True,
        )  # (B, P + R)
        return sequences, prompt_mask, input_ids.shape[1]

    def generate(self, contexts: list[Messages]) -> list[str]:
        """Replies of the current policy (inside `reference()`: of the reference) as text."""
        sequences, _, n_prompt = self._generate(contexts)
        mask, _ = reply_mask(sequences[:, n_prompt:], self.end_ids)
        return self._decode(sequences[:, n_prompt:], mask)

    @torch.no_grad()
    def rollout(self, contexts: list[Messages]) -> Rollout:
        """Generate one reply per context, then log-probs, reference log-probs and values of
        every reply token in one forward pass each over the whole (B, P + R) batch."""
        start = time.perf_counter()
        sequences, prompt_mask, n_prompt = self._generate(contexts)
        responses = sequences[:, n_prompt:]  # (B, R)
        mask, ended = reply_mask(responses, self.end_ids)
        attention_mask = torch.cat([prompt_mask, mask.long()], dim=1)
        logprobs, values = self._score(sequences, attention_mask, responses, with_values=True)
        with self.reference():
            ref_logprobs, _ = self._score(sequences, attention_mask, responses, with_values=False)
        replies = self._decode(responses, mask)
        return Rollout(
            sequences, attention_mask, responses, mask, ended, logprobs, ref_logprobs, values,
            replies, time.perf_counter() - start,
        )  # fmt: skip

    def _score(
        self,
        sequences: torch.Tensor,
        attention_mask: torch.Tensor,
        responses: torch.Tensor,
        with_values: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and values (B, R) in forward chunks of mini_batch_size, without gradients."""
        logprobs, values = [], []
        n = self.config.mini_batch_size
        for i in range(0, len(sequences), n):
            logits, v = self.module(
                sequences[i : i + n], attention_mask[i : i + n], responses.shape[1]
            )
            logprobs.append(
                logprobs_from_logits(logits / self.config.temperature, responses[i : i + n])
            )
            values.append(v.float() if with_values else v[:, :0])
        return torch.cat(logprobs), torch.cat(values)

    def _decode(self, responses: torch.Tensor, mask: torch.Tensor) -> list[str]:
        lengths = mask.sum(1).long().tolist()
        rows = [r[:n].tolist() for r, n in zip(responses, lengths, strict=True)]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    # ---- the update -----------------------------------------------------------------------

    def train_step(self, envs: DialogueVectorEnv) -> dict[str, float]:
        """One iteration: a rollout on the envs' current contexts, their rewards, a PPO update."""
        if envs.num_envs != self.config.batch_size:
            raise ConfigError(
                f"batch_size: {self.config.batch_size} but the env has {envs.num_envs} contexts"
            )
        rollout = self.rollout(envs.contexts)
        _, rewards, _, _, _ = envs.step(rollout.replies)
        return self.update(
            rollout, torch.as_tensor(rewards, dtype=torch.float32, device=self.device)
        )

    def update(self, batch: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        """PPO epochs over `batch` scored with `rewards` (B,); returns the iteration's metrics."""
        cfg = self.config
        start = time.perf_counter()
        # ---- scores, KL penalty, advantages (N implementation details #4-#7)
        scores = self._scores(rewards, batch.ended)
        kl = kl_estimate(batch.logprobs, batch.ref_logprobs, cfg.kl_estimator)  # (B, R)
        kl_seq = (kl_estimate(batch.logprobs, batch.ref_logprobs, "k1") * batch.mask).sum(1)  # (B,)
        kl_mean = self.accelerator.reduce(kl_seq.mean(), "mean").item()
        if not kl_mean < cfg.max_kl:  # NaN fails too
            raise PPODivergedError(
                f"mean KL to the reference is {kl_mean:.3g} nats per reply, above max_kl={cfg.max_kl}; "
                "the policy drifted too far: lower learning_rate or raise kl_coef"
            )
        token_r = token_rewards(scores, kl, batch.mask, self.kl_ctl.value)
        advantages, returns = gae(token_r, batch.values, batch.mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, batch.mask)
        # ---- PPO epochs over minibatches
        stats = self._epochs(batch, advantages, returns)
        self.kl_ctl.update(kl_mean, cfg.batch_size * self.accelerator.num_processes)
        # ---- metrics
        n_tokens = batch.mask.sum().item()
        update_s = time.perf_counter() - start
        metrics = {
            "reward/mean": rewards.mean().item(),
            "reward/score": scores.mean().item(),
            "reward/total": token_r.sum(1).mean().item(),
            "kl/mean": kl_seq.mean().item(),
            "value/explained_variance": explained_variance(batch.values, returns, batch.mask),
            "value/mean": masked_mean(batch.values, batch.mask).item(),
            "reply/length": batch.mask.sum(1).mean().item(),
            "reply/ended_frac": batch.ended.float().mean().item(),
            "perf/rollout_tokens_per_s": n_tokens / max(batch.seconds, 1e-9),
            "perf/update_tokens_per_s": n_tokens / max(update_s, 1e-9),
            "perf/tokens_per_s": n_tokens / max(batch.seconds + update_s, 1e-9),
            **{k: v / max(1, stats["n"]) for k, v in stats.items() if k != "n"},
        }
        metrics = self._reduce(metrics)
        metrics["kl/coef"] = self.kl_ctl.value
        return metrics

    def _scores(self, rewards: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
        """Rewards -> the scores PPO uses: normalised, clipped, minus the missing-EOS penalty."""
        cfg = self.config
        scores = rewards.float()
        if cfg.normalize_scores:
            self.score_moments.update(self.accelerator.gather(scores))
            scores = self.score_moments.normalize(scores)
        if cfg.score_clip > 0:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        return scores - cfg.missing_eos_penalty * (~ended).float()

    def _epochs(
        self, batch: Rollout, advantages: torch.Tensor, returns: torch.Tensor
    ) -> dict[str, float]:
        cfg = self.config
        self.wrapped.train()
        sums: dict[str, float] = {"n": 0}
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.batch_size, device=self.device)
            for start in range(0, cfg.batch_size, cfg.mini_batch_size):
                idx = order[start : start + cfg.mini_batch_size]
                mask = batch.mask[idx]
                logits, values = self.wrapped(
                    batch.sequences[idx], batch.attention_mask[idx], batch.responses.shape[1]
                )
                logits = logits / cfg.temperature
                logprobs = logprobs_from_logits(logits, batch.responses[idx])
                pg_loss, pg_stats = policy_loss(
                    logprobs, batch.logprobs[idx], advantages[idx], mask, cfg.cliprange
                )
                vf_loss, vf_clipfrac = value_loss(
                    values, batch.values[idx], returns[idx], mask, cfg.cliprange_value
                )
                loss = pg_loss + cfg.vf_coef * vf_loss
                with torch.set_grad_enabled(cfg.ent_coef > 0):
                    entropy = masked_mean(entropy_from_logits(logits), mask)
                if cfg.ent_coef > 0:
                    loss = loss - cfg.ent_coef * entropy
                self.optimizer.zero_grad(set_to_none=True)
                self.accelerator.backward(loss)
                grad_norm = self.accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm)
                if not torch.isfinite(torch.as_tensor(grad_norm)):
                    raise PPODivergedError(
                        f"the PPO loss or its gradient is not finite (loss {loss.item():.3g}, "
                        f"gradient norm {float(grad_norm):.3g}); this update was not applied"
                    )
                self.optimizer.step()
                step = {
                    "loss/policy": pg_loss.item(),
                    "loss/value": vf_loss.item(),
                    "policy/entropy": entropy.item(),
                    "policy/clipfrac": pg_stats["clipfrac"].item(),
                    "policy/approx_kl": pg_stats["approx_kl"].item(),
                    "policy/ratio": pg_stats["ratio"].item(),
                    "value/clipfrac": vf_clipfrac.item(),
                    "perf/grad_norm": float(grad_norm),
                    "n": 1,
                }
                for key, value in step.items():
                    sums[key] = sums.get(key, 0.0) + value
        self.wrapped.eval()
        return sums

    def _reduce(self, metrics: dict[str, float]) -> dict[str, float]:
        """The mean of every metric over processes (one collective)."""
        if self.accelerator.num_processes == 1:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.device)
        values = self.accelerator.reduce(values, "mean")
        return dict(zip(keys, values.tolist(), strict=True))

    # ---- saving and resuming ---------------------------------------------------------------

    def save(self, out_dir: str | Path) -> Path:
        """The trained adapter (a LoRA adapter directory) and the value head, in `out_dir`."""
        return save_ppo(self.model, self.value_head, out_dir)

    def load(self, src: str | Path) -> None:
        """Weights written by `save` (or a checkpoint) into this trainer's adapter and head."""
        load_ppo(self.model, self.value_head, src)

    def state_dict(self) -> dict[str, Any]:
        """What besides the weights a checkpoint needs to continue exactly: optimizer, controllers,
        and this process's random state."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "score_moments": self.score_moments.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.score_moments.load_state_dict(state["score_moments"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def weights_digest(self) -> str:
        """sha256 of the trainable weights (adapter + value head)."""
        return weights_digest(self.module)
