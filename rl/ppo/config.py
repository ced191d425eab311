"""`PPOConfig`: the hyperparameters of PPO and RLOO (one trainer, one config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.errors import ConfigError
from agent.sampling import Sampling

ALGORITHMS = ("ppo", "rloo")


@dataclass
class PPOConfig:
    """PPO / RLOO hyperparameters (defaults follow the N-implementation-details recipe, scaled down)."""

    algorithm: str = "ppo"
    """ppo (clipped policy and value losses, GAE with a learned critic) or rloo (k replies per
    context, leave-one-out baseline, no critic; the same clipped policy loss and KL penalty)."""
    batch_size: int = 16
    """Replies generated and scored per iteration, per process (for rloo: contexts x rloo_k)."""
    rloo_k: int = 2
    """rloo: replies sampled per context; the environment holds batch_size / rloo_k contexts."""
    mini_batch_size: int = 8
    """Replies per optimiser step; batch_size must be a multiple of it."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per minibatch (forward + backward each, one optimiser step): less memory."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them: less memory, ~30% slower."""
    ppo_epochs: int = 2
    """Passes over each batch of rollouts."""
    learning_rate: float = 1e-4
    """AdamW learning rate of the policy's LoRA adapter."""
    critic_learning_rate: float = 1e-3
    """AdamW learning rate of the critic's LoRA adapter and value head."""
    critic_warmup: int = 2
    """ppo: the first this many iterations train only the critic (the policy stays as it is)."""
    critic_layers: int = 0
    """ppo: the critic's LoRA adapter covers only the top this many decoder layers (0, or at
    least the model's depth: all). Below them the critic is the reference's frozen trunk, whose
    hidden states the rollout's reference pass computes anyway, so the critic's forwards and
    backwards run only its own layers: a cheaper critic that explains less early on (measured
    in benchmarks/RESULTS.md). Refused at start-up for a model whose top layers cannot run
    alone (checked on a few tokens)."""
    calibrate_value_head: bool = True
    """ppo: when the value head starts from the reward model's score head, fit its scale and
    offset to the first batch's rewards-to-go before the first update."""
    max_grad_norm: float = 1.0
    """Gradient clipping: the global norm of the policy's (and separately the critic's) weights."""
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
    ent_coef: float = 0.0
    """Weight of the entropy bonus (0: none; entropy is then only measured, on `entropy_rows`)."""
    entropy_rows: int = 4
    """With ent_coef 0: replies per iteration whose entropy is measured for the log (0: none)."""
    kl_coef: float = 0.05
    """Per-token KL penalty coefficient (the initial one when adaptive)."""
    kl_estimator: str = "k1"
    """KL estimator of the penalty: k1 (log-ratio) or k3 (low-variance, non-negative)."""
    target_kl: float = 0.0
    """> 0: adapt kl_coef so the reply KL (nats) tracks this target; 0: fixed kl_coef."""
    kl_horizon: int = 10_000
    """Horizon (in replies) of the adaptive KL controller."""
    normalize_scores: bool = False
    """Normalise scores by their running mean and std. Off: scores are normalised once, by the
    reward model's fixed statistics, so kl_coef keeps one meaning; on only for a raw reward
    function without a scale of its own (the job refuses it with a reward model)."""
    score_clip: float = 5.0
    """Clip scores to +-this (0: no clipping)."""
    missing_eos_penalty: float = 1.0
    """Subtracted from the score of replies that reach max_new_tokens without ending."""
    max_kl: float = 50.0
    """Stop the run when the mean reply KL to the reference exceeds this many nats."""
    lora_r: int = 16
    """LoRA rank of the policy and critic adapters."""
    lora_alpha: int = 32
    """LoRA alpha of the policy and critic adapters."""
    ptx_coef: float = 0.0
    """Weight of a language-modelling loss on human replies added to every policy step
    (InstructGPT's PPO-ptx), against the drift away from human language that raises the gate's
    perplexity guard. The replies are chitchat conversations of the starter's *training* split,
    never the held-out ones the guard scores. 0: off."""
    ptx_batch_size: int = 4
    """Human conversations in the ptx loss of each policy step."""
    ptx_conversations: int = 1000
    """Training-split chitchat conversations the ptx batches are drawn from."""
    lora_target_modules: str = "all-linear"
    """Modules the adapters wrap: all-linear or a comma-separated list (q_proj,v_proj)."""
    seed: int = 0
    """Seed of the adapters' initialisation, sampling and prompt draws."""

    def __post_init__(self) -> None:
        positive = (
            "batch_size",
            "mini_batch_size",
            "gradient_accumulation_steps",
            "ppo_epochs",
            "max_new_tokens",
            "max_prompt_tokens",
            "ptx_batch_size",
            "ptx_conversations",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(
                f"algorithm: {self.algorithm!r} is not one of {', '.join(ALGORITHMS)}"
            )
        if self.batch_size % self.mini_batch_size:
            raise ConfigError(
                f"mini_batch_size: {self.mini_batch_size} does not divide batch_size {self.batch_size}"
            )
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise ConfigError(
                f"gradient_accumulation_steps: {self.gradient_accumulation_steps} does not divide "
                f"mini_batch_size {self.mini_batch_size}"
            )
        if self.algorithm == "rloo" and (self.rloo_k < 2 or self.batch_size % self.rloo_k):
            raise ConfigError(
                f"rloo_k: must be >= 2 and divide batch_size {self.batch_size}, got {self.rloo_k}"
            )
        if self.kl_estimator not in ("k1", "k3"):
            raise ConfigError(f"kl_estimator: {self.kl_estimator!r} is not one of k1, k3")
        for name in ("critic_warmup", "critic_layers", "entropy_rows"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not self.ptx_coef >= 0:
            raise ConfigError(f"ptx_coef: must be >= 0, got {self.ptx_coef}")
        try:
            self.sampling()
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        rates = ("learning_rate", "critic_learning_rate", "cliprange", "cliprange_value")
        for name in (*rates, "max_kl", "max_grad_norm"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")

    @property
    def num_contexts(self) -> int:
        """Contexts per iteration: batch_size for ppo, batch_size / rloo_k for rloo."""
        return self.batch_size // self.rloo_k if self.algorithm == "rloo" else self.batch_size

    def sampling(self) -> Sampling:
        """The rollouts' sampling distribution."""
        return Sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p)

    def lora_config(self, modules: list[str] | None = None) -> Any:
        """The peft LoraConfig of the policy and critic adapters (no dropout: see
        `rl.ppo.modules.disable_dropout`); `modules`: exactly these (full names) instead of
        `lora_target_modules`."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=0.0,
            target_modules=modules or self.target_modules(),
            task_type="CAUSAL_LM",
        )

    def target_modules(self) -> str | list[str]:
        """lora_target_modules as peft takes it: "all-linear" or a list of module names."""
        targets = self.lora_target_modules
        return targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]
