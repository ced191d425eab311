"""The PPO policy's modules: the LoRA adapter on top of the SFT stack, the value head on the
trunk, batching helpers, and saving / loading the result as a LoRA adapter directory.

A saved PPO adapter is a standard peft directory (adapter_config.json + adapter_model.safetensors,
keys without the adapter name), so `agent.modeling.Policy.set_adapters([..., dir])` serves it;
`value_head.safetensors` beside it holds the value head for further training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rl.ppo_core import ValueHead

ADAPTER = "ppo"
"""The peft name of the trainable adapter."""
VALUE_HEAD_FILE = "value_head.safetensors"
"""The value head's weights, beside the adapter files."""


class PolicyValueModel(nn.Module):
    """The policy's causal LM and a value head on its trunk, as one module (what DDP wraps).

    Why a head on the trunk rather than a separate critic initialised from the reward model:
    one forward pass yields logits and values, and memory stays one model plus a LoRA adapter
    (a critic copy would double both). The head reads the trunk's features through a stop-
    gradient: with a small LoRA adapter and Adam's per-parameter step sizes, value-loss
    gradients through the shared adapter steer the policy as much as the policy gradient does
    (on the tiny-model tests this made learning depend on the seed; detached, it learns on
    every seed tried). The head is zero-initialised, so the first advantages are the returns.
    """

    def __init__(self, policy: nn.Module, value_head: ValueHead) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = value_head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_response: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, R, V) and values (B, R) of the last `n_response` tokens of `input_ids`."""
        causal_lm = self.policy.get_base_model()
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # as generate() counts them
        hidden = causal_lm.get_decoder()(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state  # (B, T, H)
        hidden = hidden[:, -n_response - 1 : -1]  # (B, R, H): the states that predict the reply
        logits = causal_lm.get_output_embeddings()(hidden)
        return logits, self.value_head(hidden.detach())  # no value gradient into the adapter


@dataclass
class Rollout:
    """One batch of generated replies and what the policy and reference said about them."""

    sequences: torch.Tensor  # (B, P + R) left-padded prompt, then the reply
    attention_mask: torch.Tensor  # (B, P + R)
    responses: torch.Tensor  # (B, R)
    mask: torch.Tensor  # (B, R) float: 1 up to and including the first end-of-turn token
    ended: torch.Tensor  # (B,) bool: the reply ended by itself
    logprobs: torch.Tensor  # (B, R)
    ref_logprobs: torch.Tensor  # (B, R)
    values: torch.Tensor  # (B, R)
    replies: list[str]
    seconds: float


def left_pad(
    rows: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded on the left -> (input_ids, attention_mask), both (B, P)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        attn[i, width - len(row) :] = 1
    return ids.to(device), attn.to(device)


def reply_mask(responses: torch.Tensor, end_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask (B, R) float, ended (B,) bool): tokens up to and including the first end token."""
    is_end = torch.isin(responses, torch.tensor(end_ids, device=responses.device))
    after_end = (is_end.long().cumsum(1) - is_end.long()) > 0  # strictly after the first end
    return (~after_end).float(), is_end.any(1)


def add_ppo_adapter(model: nn.Module, lora: Any) -> tuple[nn.Module, list[str]]:
    """Put a fresh trainable LoRA adapter (peft `LoraConfig` `lora`) named "ppo" on top of the
    model's active adapters (the SFT stack, kept frozen).

    Returns the peft model and the names of the adapters under the new one.
    """
    from peft import PeftModel, get_peft_model

    if not isinstance(model, PeftModel):
        return get_peft_model(model, lora, adapter_name=ADAPTER), []
    below = list(model.base_model.active_adapters)
    model.add_adapter(ADAPTER, lora)
    activate_ppo(model, below)
    return model, below


def activate_ppo(model: nn.Module, below: list[str]) -> None:
    """Make `below` + ppo the active adapters, with only the ppo adapter trainable."""
    model.base_model.set_adapter([*below, ADAPTER])
    for name, param in model.named_parameters():
        param.requires_grad_(f".{ADAPTER}." in name)


def save_ppo(model: nn.Module, value_head: ValueHead, out_dir: str | Path) -> Path:
    """Write the ppo adapter (as a standalone LoRA adapter dir) and the value head to `out_dir`."""
    import copy

    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = get_peft_model_state_dict(model, adapter_name=ADAPTER, save_embedding_layers=False)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in weights.items()},
        out / "adapter_model.safetensors",
    )
    config = copy.deepcopy(model.peft_config[ADAPTER])
    config.inference_mode = True
    config.save_pretrained(str(out))
    head = {k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()}
    save_file(head, out / VALUE_HEAD_FILE)
    return out


def load_ppo(model: nn.Module, value_head: ValueHead, src: str | Path) -> None:
    """Load weights written by `save_ppo` into the ppo adapter and the value head, in place."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    src = Path(src)
    device = value_head.summary.weight.device
    result = set_peft_model_state_dict(
        model,
        load_file(src / "adapter_model.safetensors", device=str(device)),
        adapter_name=ADAPTER,
    )
    missing = [k for k in result.missing_keys if f".{ADAPTER}." in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{src}: the saved adapter does not match this model "
            f"(missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})"
        )
    value_head.load_state_dict(load_file(src / VALUE_HEAD_FILE, device=str(device)))


def weights_digest(model: nn.Module) -> str:
    """sha256 of every trainable parameter, in name order (equal on every DDP rank)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
