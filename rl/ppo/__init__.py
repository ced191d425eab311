"""PPO and RLOO for a LoRA policy, in four files that follow the ideas:

- `maths`: the formulas as tensor functions (GAE, whitening, KL estimators, clipped losses,
  RLOO's leave-one-out baseline, the KL controller);
- `modules`: the policy, critic and reference as LoRA adapters on one frozen base, dropout off;
- `config` and `trainer`: `PPOConfig` and `PPOTrainer` (rollouts, the update, save / load);
- `job`: `rlchat train ppo` (`Config`, `main`), with checkpoints and resume.
"""

from rl.ppo.config import PPOConfig
from rl.ppo.job import Config, main
from rl.ppo.maths import PPODivergedError
from rl.ppo.trainer import PPOTrainer

__all__ = ["Config", "PPOConfig", "PPODivergedError", "PPOTrainer", "main"]
