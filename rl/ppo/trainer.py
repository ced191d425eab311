"""Token-level PPO (and RLOO) for a LoRA policy: rollouts, the update, save and load.

    trainer = PPOTrainer(PPOConfig(), Policy(base_dir))        # + policy.set_adapters([sft])
    envs = DialogueVectorEnv(trainer.config.num_contexts, prompts, reward)
    envs.reset(seed=0)
    for _ in range(iterations):
        metrics = trainer.train_step(envs)                      # rollout, score, update

It optimises exactly what it samples: rollouts use an explicit generation config (nothing
from the model's `generation_config.json`), log-probs come from the model's own forward at
the reply positions, and dropout is off everywhere for the whole run. The modules (policy,
critic, reference: adapters on one base) are in `rl.ppo.modules`, the maths in `rl.ppo.maths`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent.errors import ConfigError
from agent.modeling import Policy, encode_chat, end_of_turn_ids
from agent.sampling import generation_config, logprobs_of, sample
from rl.env import DialogueVectorEnv, Messages, score_batch
from rl.ppo.config import PPOConfig
from rl.ppo.distributed import add_to, mean_gradients, mean_metrics
from rl.ppo.maths import (
    KLController,
    PPODivergedError,
    RunningMoments,
    affine_fit,
    affine_stats,
    entropy_of,
    explained_variance,
    gae,
    kl_estimate,
    masked_mean,
    masked_whiten,
    policy_loss,
    rloo_advantages,
    token_rewards,
    value_loss,
)
from rl.ppo.modules import (
    CRITIC,
    POLICY,
    ActorCritic,
    Rollout,
    ValueHead,
    add_adapters,
    capture_layer_input,
    disable_dropout,
    left_pad,
    load_ppo,
    reply_mask,
    save_ppo,
    set_trainable,
    top_layer_modules,
    top_layers_problem,
    use_adapters,
    weights_digest,
)

log = logging.getLogger(__name__)


def critic_first_layer(policy: Policy, config: PPOConfig) -> int:
    """The first decoder layer of a critic of the top `critic_layers` layers (0: all of them)."""
    decoder, k = policy.base_model.get_decoder(), config.critic_layers
    if k == 0:
        return 0
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(
            f"critic_layers: {k}: this model's decoder ({type(decoder).__name__}) keeps its "
            "layers under another name than `layers`; use critic_layers: 0"
        )
    return len(layers) - k if k < len(layers) else 0


class PPOTrainer:
    """PPO or RLOO on a `Policy`: owns the adapters, the value head, the optimizer and the
    controllers. Runs unchanged in one process or under `accelerate launch` / `torchrun`
    (gradients are averaged over processes before each step; metrics are cross-process means).

    `value_init` (weight (1, H), bias (1,)) initialises the value head, e.g. from the reward
    model's score head; the job passes it when the shapes fit.
    """

    def __init__(
        self,
        config: PPOConfig,
        policy: Policy,
        accelerator: Any = None,
        value_init: tuple[torch.Tensor, torch.Tensor] | None = None,
        ptx_rows: list[tuple[list[int], list[int]]] | None = None,
    ) -> None:
        from accelerate import Accelerator

        self.config = config
        self.accelerator = accelerator or Accelerator(cpu=policy.device.type == "cpu")
        self.tokenizer = policy.tokenizer
        self.device = policy.device
        self.end_ids = end_of_turn_ids(self.tokenizer)
        self.rloo = config.algorithm == "rloo"
        self.trainable = [POLICY] if self.rloo else [POLICY, CRITIC]
        torch.manual_seed(config.seed)  # identical adapters and head on every process
        self.critic_first_layer = 0 if self.rloo else critic_first_layer(policy, config)
        adapters = {POLICY: config.lora_config()}
        if not self.rloo:
            first, targets = self.critic_first_layer, config.target_modules()
            top = top_layer_modules(policy.base_model, first, targets) if first else None
            adapters[CRITIC] = config.lora_config(top)
        self.model, self.below = add_adapters(policy.model, adapters)
        n_dropout = disable_dropout(self.model)
        self.policy_adapters, self.critic_adapters = [*self.below, POLICY], [*self.below, CRITIC]
        self.model.base_model.set_adapter(self.policy_adapters)  # the policy, by default
        set_trainable(self.model, self.trainable)
        lm = self.model.get_base_model()
        hidden_size = lm.config.get_text_config().hidden_size
        self.value_head = ValueHead(hidden_size, config.seed).to(self.device)
        self.ptx_rows = (ptx_rows or []) if config.ptx_coef > 0 else []
        if config.ptx_coef > 0 and not self.ptx_rows:
            raise ConfigError("ptx_coef: > 0 needs human replies (ptx_rows), and none were given")
        self.calibrate_head = (
            value_init is not None and not self.rloo and config.calibrate_value_head
        )
        if value_init is not None and not self.rloo:
            self.value_head.init_from(*value_init)
        self.module = ActorCritic(self.model, self.value_head, self.critic_first_layer)
        first = self.critic_first_layer
        if first and (problem := top_layers_problem(self.model, first)):
            raise ConfigError(
                f"critic_layers: {config.critic_layers}: this model ({type(lm).__name__}) cannot "
                f"run a critic of its top layers alone: {problem}; use critic_layers: 0"
            )
        named = list(self.model.named_parameters())
        self.policy_params = [p for n, p in named if f".{POLICY}." in n]
        self.critic_params = [] if self.rloo else [p for n, p in named if f".{CRITIC}." in n]
        self.critic_params += [] if self.rloo else list(self.value_head.parameters())
        groups = [{"params": self.policy_params, "lr": config.learning_rate}]
        if self.critic_params:
            groups.append({"params": self.critic_params, "lr": config.critic_learning_rate})
        self.optimizer = torch.optim.AdamW(groups, eps=1e-5)
        if config.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.generation_config = generation_config(
            config.sampling(), self.end_ids, self.tokenizer.pad_token_id
        )
        self.kl_ctl = KLController(config.kl_coef, config.target_kl or None, config.kl_horizon)
        self.score_moments = RunningMoments()
        self.iteration = 0
        torch.manual_seed(config.seed + 1 + self.accelerator.process_index)  # sampling differs
        log.info(
            "%s: %d policy + %d critic trainable parameters on %s (dropout off in %d places), "
            "process %d of %d", config.algorithm.upper(), sum(p.numel() for p in self.policy_params),
            sum(p.numel() for p in self.critic_params), self.device, n_dropout,
            self.accelerator.process_index, self.accelerator.num_processes,
        )  # fmt: skip

    # ---- rollouts ------------------------------------------------------------------------

    @contextmanager
    def reference(self) -> Iterator[None]:
        """The reference policy: the same weights with our adapters off (SFT stack kept)."""
        with use_adapters(self.model, self.below, self.trainable):
            yield

    @torch.no_grad()
    def _generate(self, contexts: list[Messages]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Sample one reply per context (left padding, KV cache) -> (sequences, prompt mask, P)."""
        tok, n_max = self.tokenizer, self.config.max_prompt_tokens
        rows = [encode_chat(tok, c)[-n_max:] for c in contexts]
        input_ids, prompt_mask = left_pad(rows, tok.pad_token_id, self.device)  # (B, P)
        self.model.eval()
        sequences = sample(self.model, input_ids, prompt_mask, self.generation_config)
        return sequences, prompt_mask, input_ids.shape[1]  # (B, P + R), (B, P), P

    def generate(self, contexts: list[Messages]) -> list[str]:
        """Replies of the current policy (inside `reference()`: of the reference) as text."""
        sequences, _, n_prompt = self._generate(contexts)
        mask, _ = reply_mask(sequences[:, n_prompt:], self.end_ids)
        return self._decode(sequences[:, n_prompt:], mask)

    @torch.no_grad()
    def rollout(self, contexts: list[Messages]) -> Rollout:
        """Generate one reply per context, then the log-probs of the policy and the reference
        and (PPO) the critic's values of every reply token."""
        start = time.perf_counter()
        sequences, prompt_mask, n_prompt = self._generate(contexts)
        responses = sequences[:, n_prompt:]  # (B, R)
        mask, ended = reply_mask(responses, self.end_ids)
        attention_mask = torch.cat([prompt_mask, mask.long()], dim=1)
        logprobs = self._logprobs(sequences, attention_mask, responses)
        with self.reference(), self._keep_critic_inputs() as kept:
            ref_logprobs = self._logprobs(sequences, attention_mask, responses)
        critic_inputs = torch.cat(kept) if kept else None  # below its layers, critic = reference
        values = mask[:, :0]
        if not self.rloo:
            values = self._values(sequences, attention_mask, responses.shape[1], critic_inputs)
        replies = self._decode(responses, mask)
        return Rollout(
            sequences, attention_mask, responses, mask, ended, logprobs, ref_logprobs, values,
            replies, time.perf_counter() - start, critic_inputs,
        )  # fmt: skip

    @contextmanager
    def _keep_critic_inputs(self) -> Iterator[list[torch.Tensor]]:
        """With a critic of the top layers: the hidden states entering its first layer, of
        every forward inside; otherwise nothing."""
        if not self.critic_first_layer:
            yield []
            return
        decoder = self.model.get_base_model().get_decoder()
        with capture_layer_input(decoder, self.critic_first_layer) as kept:
            yield kept

    def _logprobs(
        self, sequences: torch.Tensor, attention_mask: torch.Tensor, responses: torch.Tensor
    ) -> torch.Tensor:
        """Log-probs (B, R) of `responses` under the active adapters, in mini_batch_size chunks."""
        out, n = [], self.config.mini_batch_size
        for i in range(0, len(sequences), n):
            logits = self.module(
                sequences[i : i + n], attention_mask[i : i + n], responses.shape[1], "policy"
            )
            out.append(logprobs_of(logits, responses[i : i + n], self.config.temperature))
        return torch.cat(out)

    def _values(
        self,
        sequences: torch.Tensor,
        attention_mask: torch.Tensor,
        n_reply: int,
        critic_inputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The critic's values (B, R), in mini_batch_size chunks (a critic of the top layers
        needs `critic_inputs`, the reference's hidden states entering them)."""
        out, n = [], self.config.mini_batch_size
        with use_adapters(self.model, self.critic_adapters, self.trainable):
            for i in range(0, len(sequences), n):
                rows = slice(i, i + n)
                inputs = None if critic_inputs is None else critic_inputs[rows]
                out.append(
                    self.module(sequences[rows], attention_mask[rows], n_reply, "critic", inputs)
                )
        return torch.cat(out)

    def _decode(self, responses: torch.Tensor, mask: torch.Tensor) -> list[str]:
        lengths = mask.sum(1).long().tolist()
        rows = [r[:n].tolist() for r, n in zip(responses, lengths, strict=True)]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    # ---- one iteration ----------------------------------------------------------------------

    def train_step(self, envs: DialogueVectorEnv) -> dict[str, float]:
        """One iteration: a rollout on the envs' current contexts (rloo: rloo_k replies each),
        their rewards, an update. The envs advance with the first reply to each context."""
        cfg = self.config
        if envs.num_envs != cfg.num_contexts:
            raise ConfigError(
                f"batch_size: {cfg.batch_size} ({cfg.algorithm}) needs {cfg.num_contexts} "
                f"contexts per iteration, but the env has {envs.num_envs}"
            )
        k = cfg.rloo_k if self.rloo else 1
        contexts = envs.contexts
        batch = self.rollout([c for c in contexts for _ in range(k)])  # grouped: i*k + j
        rewards = np.empty(cfg.batch_size)
        _, rewards[::k], _, _, _ = envs.step(batch.replies[::k])
        others = [i for i in range(cfg.batch_size) if i % k]
        if others:
            rewards[others] = score_batch(
                envs.reward, [contexts[i // k] for i in others], [batch.replies[i] for i in others]
            )
        return self.update(batch, torch.as_tensor(rewards, dtype=torch.float32, device=self.device))

    def update(self, batch: Rollout, rewards: torch.Tensor) -> dict[str, float]:
        """Epochs of minibatch updates on `batch` scored with `rewards` (B,); the metrics."""
        cfg = self.config
        start = time.perf_counter()
        rollout_values = batch.values
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
        if self.rloo:
            seq_advantages, returns = rloo_advantages(
                scores, kl, batch.mask, self.kl_ctl.value, cfg.rloo_k
            )  # (B,), (B,)
            advantages = masked_whiten(seq_advantages[:, None] * batch.mask, batch.mask)
            total = returns
        else:
            token_r = token_rewards(scores, kl, batch.mask, self.kl_ctl.value)  # (B, R)
            if self.calibrate_head and self.iteration == 0:
                batch = replace(batch, values=self._calibrate(batch, token_r))
            advantages, returns = gae(token_r, batch.values, batch.mask, cfg.gamma, cfg.lam)
            advantages = masked_whiten(advantages, batch.mask)
            total = token_r.sum(1)
        # ---- epochs over minibatches
        stats = self._epochs(batch, advantages, returns)
        self.kl_ctl.update(kl_mean, cfg.batch_size * self.accelerator.num_processes)
        self.iteration += 1
        # ---- metrics
        n_tokens = batch.mask.sum().item()
        update_s = time.perf_counter() - start
        metrics = {
            "reward/mean": rewards.mean().item(),
            "reward/score": scores.mean().item(),
            "reward/total": total.mean().item(),
            "kl/mean": kl_seq.mean().item(),
            "reply/length": batch.mask.sum(1).mean().item(),
            "reply/ended_frac": batch.ended.float().mean().item(),
            "perf/rollout_tokens_per_s": n_tokens / max(batch.seconds, 1e-9),
            "perf/update_tokens_per_s": n_tokens / max(update_s, 1e-9),
            "perf/tokens_per_s": n_tokens / max(batch.seconds + update_s, 1e-9),
            **stats,
        }
        if not self.rloo:  # of the values as the critic predicted them (before any calibration)
            metrics["value/explained_variance"] = explained_variance(
                rollout_values, returns, batch.mask
            )
            metrics["value/mean"] = masked_mean(batch.values, batch.mask).item()
        metrics = mean_metrics(self.accelerator, metrics, self.device)
        metrics["kl/coef"] = self.kl_ctl.value
        return metrics

    @torch.no_grad()
    def _calibrate(self, batch: Rollout, token_r: torch.Tensor) -> torch.Tensor:
        """Fit the scale and offset of a value head copied from the reward model to the first
        batch's rewards-to-go (least squares, two numbers; its direction is kept) and return
        the batch's values as the calibrated head gives them.

        The copied head was trained on the reward model's own (LoRA-tuned) trunk and on its
        score's scale; on the critic's hidden states and against returns that carry the KL
        penalty it can be far off (explained variance -7.3 on the first batch of a SmolLM2 run).
        """
        to_go = gae(token_r, torch.zeros_like(token_r), batch.mask, self.config.gamma, 1.0)[1]
        stats = self.accelerator.reduce(affine_stats(batch.values, to_go, batch.mask), "sum")
        a, b = affine_fit(stats)
        summary = self.value_head.summary
        summary.weight.mul_(a)
        summary.bias.mul_(a).add_(b)
        log.info(
            "value head from the reward model calibrated on the first batch: %.3g·v + %.3g", a, b
        )
        self.calibrate_head = False
        return (a * batch.values + b) * batch.mask

    def _scores(self, rewards: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
        """Rewards -> the scores used: clipped, minus the missing-EOS penalty; normalised by
        running moments only when `normalize_scores` (a reward model has normalised them)."""
        cfg = self.config
        scores = rewards.float()
        if cfg.normalize_scores:
            self.score_moments.update(self.accelerator.gather(scores))
            scores = self.score_moments.normalize(scores)
        if cfg.score_clip > 0:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        return scores - cfg.missing_eos_penalty * (~ended).float()

    # ---- the update --------------------------------------------------------------------------

    def _epochs(
        self, batch: Rollout, advantages: torch.Tensor, returns: torch.Tensor
    ) -> dict[str, float]:
        """ppo_epochs passes of minibatch steps; the critic alone during its warm-up."""
        cfg = self.config
        train_policy = self.rloo or self.iteration >= cfg.critic_warmup
        params = (self.policy_params if train_policy else []) + self.critic_params
        micro = cfg.mini_batch_size // cfg.gradient_accumulation_steps
        sums: dict[str, float] = {}
        n_steps = 0
        self.model.train()
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.batch_size, device=self.device)
            for start in range(0, cfg.batch_size, cfg.mini_batch_size):
                self.optimizer.zero_grad(set_to_none=True)
                for m in range(start, start + cfg.mini_batch_size, micro):
                    idx = order[m : m + micro]
                    first = epoch == 0 and m == 0  # the sampling policy: measure entropy here
                    if train_policy:
                        add_to(sums, self._policy_backward(batch, idx, advantages, first))
                    if self.critic_params:
                        add_to(sums, self._critic_backward(batch, idx, returns))
                if train_policy and self.ptx_rows:
                    add_to(sums, self._ptx_backward())
                add_to(sums, self._step(params, train_policy))
                n_steps += 1
        self.model.eval()
        once = {}  # with ent_coef 0, entropy was measured once, not per step
        if cfg.ent_coef == 0 and "policy/entropy" in sums:
            once["policy/entropy"] = sums.pop("policy/entropy")
        return {**{k: v / n_steps for k, v in sums.items()}, **once}

    def _policy_backward(
        self, batch: Rollout, idx: torch.Tensor, advantages: torch.Tensor, measure: bool
    ) -> dict[str, float]:
        """Forward and backward of the clipped policy loss on the micro-batch `idx`."""
        cfg, mask = self.config, batch.mask[idx]
        scale = 1 / cfg.gradient_accumulation_steps
        with use_adapters(self.model, self.policy_adapters, self.trainable):
            logits = self.module(
                batch.sequences[idx], batch.attention_mask[idx], batch.responses.shape[1], "policy"
            )  # (b, R, V)
            logprobs = logprobs_of(logits, batch.responses[idx], cfg.temperature)
            loss, stats = policy_loss(
                logprobs, batch.logprobs[idx], advantages[idx], mask, cfg.cliprange
            )
            out = {f"policy/{k}": v.item() * scale for k, v in stats.items()}
            if cfg.ent_coef > 0:
                entropy = masked_mean(entropy_of(logits, cfg.temperature), mask)
                loss = loss - cfg.ent_coef * entropy
                out["policy/entropy"] = entropy.item() * scale
            elif measure and cfg.entropy_rows:
                rows = cfg.entropy_rows
                with torch.no_grad():
                    entropy = entropy_of(logits[:rows].detach(), cfg.temperature)
                    out["policy/entropy"] = masked_mean(entropy, mask[:rows]).item()
            self.accelerator.backward(loss * scale)
        out["loss/policy"] = loss.item() * scale
        return out

    def _ptx_backward(self) -> dict[str, float]:
        """Forward and backward of ptx_coef x the mean next-token loss of `ptx_batch_size` human
        conversations' reply tokens under the policy (right-padded; drawn with torch's RNG)."""
        cfg = self.config
        picks = torch.randint(len(self.ptx_rows), (cfg.ptx_batch_size,)).tolist()
        rows = [self.ptx_rows[i] for i in picks]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        scored = torch.zeros(len(rows), width)
        attention = torch.zeros(len(rows), width, dtype=torch.long)
        for r, (row_ids, row_mask) in enumerate(rows):
            ids[r, : len(row_ids)] = torch.tensor(row_ids)
            scored[r, : len(row_mask)] = torch.tensor(row_mask, dtype=torch.float)
            attention[r, : len(row_ids)] = 1
        ids, scored, attention = (
            ids.to(self.device),
            scored.to(self.device),
            attention.to(self.device),
        )
        with use_adapters(self.model, self.policy_adapters, self.trainable):
            logits = self.model(input_ids=ids, attention_mask=attention).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(
                logits.float().transpose(1, 2), ids[:, 1:], reduction="none"
            )  # (b, T-1)
            loss = (nll * scored[:, 1:]).sum() / scored[:, 1:].sum().clamp(min=1)
            self.accelerator.backward(cfg.ptx_coef * loss)
        return {"loss/ptx": loss.item()}

    def _critic_backward(
        self, batch: Rollout, idx: torch.Tensor, returns: torch.Tensor
    ) -> dict[str, float]:
        """Forward and backward of the clipped value loss on the micro-batch `idx`."""
        cfg = self.config
        scale = 1 / cfg.gradient_accumulation_steps
        with use_adapters(self.model, self.critic_adapters, self.trainable):
            inputs = None if batch.critic_inputs is None else batch.critic_inputs[idx]
            n_reply = batch.responses.shape[1]
            values = self.module(
                batch.sequences[idx], batch.attention_mask[idx], n_reply, "critic", inputs
            )  # (b, R)
            loss, clipfrac = value_loss(
                values, batch.values[idx], returns[idx], batch.mask[idx], cfg.cliprange_value
            )
            self.accelerator.backward(loss * scale)
        return {"loss/value": loss.item() * scale, "value/clipfrac": clipfrac.item() * scale}

    def _step(self, params: list[torch.nn.Parameter], train_policy: bool) -> dict[str, float]:
        """Average gradients over processes, clip policy and critic each, step; the norms."""
        mean_gradients(self.accelerator, params)
        norms = {}
        if train_policy:
            norms["perf/grad_norm"] = float(
                torch.nn.utils.clip_grad_norm_(self.policy_params, self.config.max_grad_norm)
            )
        if self.critic_params:
            norms["perf/critic_grad_norm"] = float(
                torch.nn.utils.clip_grad_norm_(self.critic_params, self.config.max_grad_norm)
            )
        if not all(np.isfinite(list(norms.values()))):
            raise PPODivergedError(
                f"the loss or its gradient is not finite (gradient norms {norms}); this update "
                "was not applied"
            )
        self.optimizer.step()
        return norms

    # ---- saving and resuming ---------------------------------------------------------------

    def save(self, out_dir: str | Path) -> Path:
        """The policy adapter (a LoRA adapter directory) and the critic, in `out_dir`."""
        return save_ppo(self.model, None if self.rloo else self.value_head, out_dir)

    def load(self, src: str | Path) -> None:
        """Weights written by `save` (or a checkpoint) into this trainer's adapters and head."""
        load_ppo(self.model, None if self.rloo else self.value_head, src)

    def state_dict(self) -> dict[str, Any]:
        """What besides the weights a checkpoint needs to continue exactly: optimizer,
        controllers, the iteration (for the critic warm-up) and this process's random state."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "kl_ctl": self.kl_ctl.state_dict(),
            "score_moments": self.score_moments.state_dict(),
            "updates": self.iteration,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.score_moments.load_state_dict(state["score_moments"])
        self.iteration = int(state["updates"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def weights_digest(self) -> str:
        """sha256 of the trainable weights (adapters + value head)."""
        return weights_digest(self.module)
