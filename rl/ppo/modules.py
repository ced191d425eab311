"""The policy and the critic: two LoRA adapters on one frozen base, switched like the reference.

    policy    = base (+ SFT stack) + adapter "ppo"                -> logits at reply positions
    critic    = base (+ SFT stack) + adapter "critic" + ValueHead -> a value per reply position
    reference = base (+ SFT stack)                                -> logits, no adapter of ours

There is one copy of the base weights; `use_adapters` switches which LoRA adapters are active.
With `critic_layers: k` the critic's adapter covers only the top k decoder layers; below them it
*is* the reference, so the rollout's reference pass keeps the hidden state entering the first
of them (`capture_layer_input`) and every critic forward runs the top k layers alone from it
(`top_layers`).
The policy's logits come from the model's own `forward` (`agent.sampling.reply_logits`), so
soft-capping and logit scaling apply exactly as in sampling, and only the reply positions are
projected onto the vocabulary. Dropout is off in every module for the whole run
(`disable_dropout`): PPO's ratios compare two evaluations of the same policy.

A saved PPO adapter is a standard peft directory (adapter_config.json + adapter_model.safetensors,
keys without the adapter name), so `agent.modeling.Policy.set_adapters([..., dir])` serves it;
the critic (its adapter and head) is saved beside it for further training.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agent.sampling import position_ids_of, reply_logits

POLICY = "ppo"
"""The peft name of the policy's trainable adapter."""
CRITIC = "critic"
"""The peft name of the critic's trainable adapter."""
CRITIC_FILE = "critic.safetensors"
"""The critic's adapter and value head, beside the policy adapter's files."""
HEAD_PREFIX = "value_head."
"""Key prefix of the value head's weights in CRITIC_FILE."""


class ValueHead(nn.Module):
    """V(s) from the critic's last hidden state: one linear layer. Unless it is given the reward
    model's score head (`init_from`), its weights start normal with std 1/(H+1) and its bias at
    0, as OpenRLHF's critic head. Not zero: with zero weights and the critic adapter's zero
    LoRA B, no gradient reaches the adapter until the head has grown (on PPO's learning task
    at 64 replies a batch the critic then explained less over iterations 9-12 on 5 of 6
    seeds; RESULTS.md)."""

    def __init__(self, hidden_size: int, seed: int = 0) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        with torch.no_grad():  # drawn from its own generator: torch's global one is left as is
            draw = torch.Generator().manual_seed(seed)
            self.summary.weight.copy_(torch.randn(1, hidden_size, generator=draw))
            self.summary.weight.div_(hidden_size + 1)
            self.summary.bias.zero_()

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Copy a (1, H) weight and (1,) bias, e.g. the reward model's normalised score head."""
        self.summary.weight.copy_(weight.reshape(self.summary.weight.shape))
        self.summary.bias.copy_(bias.reshape(self.summary.bias.shape))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, R, H) hidden states -> (B, R) values in float32."""
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1).float()


class ActorCritic(nn.Module):
    """The peft model and the value head as one module; `part` picks what a forward computes.

    The caller makes the part's adapters active (`use_adapters`) around the forward *and* its
    backward, so gradient checkpointing recomputes under the same adapters. `critic_first_layer`
    > 0: the critic runs only the decoder layers from it on, from the reference's hidden states
    entering it (`critic_inputs`).
    """

    def __init__(
        self, model: nn.Module, value_head: ValueHead, critic_first_layer: int = 0
    ) -> None:
        super().__init__()
        self.model = model
        self.value_head = value_head
        self.critic_first_layer = critic_first_layer

    def forward(
        self,
        sequences: torch.Tensor,
        attention_mask: torch.Tensor,
        n_reply: int,
        part: str,
        critic_inputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """part "policy": logits (B, R, V) predicting the last `n_reply` tokens; "critic": values
        (B, R) of the states before each of them."""
        if part == "policy":
            return reply_logits(self.model, sequences, attention_mask, n_reply)
        decoder, first = self.model.get_base_model().get_decoder(), self.critic_first_layer
        if first and critic_inputs is None:
            raise ValueError("a critic of the top layers needs the reference's critic_inputs")
        inputs = critic_inputs if first else sequences
        hidden = decoder_states(decoder, inputs, attention_mask, first)  # (B, T, H)
        return self.value_head(hidden[:, -n_reply - 1 : -1])  # (B, R)


def decoder_states(
    decoder: nn.Module, inputs: torch.Tensor, attention_mask: torch.Tensor, first: int = 0
) -> torch.Tensor:
    """The decoder's last hidden states (B, T, H): of token ids `inputs` (B, T) through every
    layer (`first` 0), or of hidden states `inputs` (B, T, H) entering layer `first` through
    the layers from it on. Positions skip left padding, as in sampling."""
    kind = "inputs_embeds" if first else "input_ids"
    with top_layers(decoder, first) if first else nullcontext():
        return decoder(
            **{kind: inputs},
            attention_mask=attention_mask,
            position_ids=position_ids_of(attention_mask),
            use_cache=False,
        ).last_hidden_state


# ---- a critic of the top layers -----------------------------------------------------------


@contextmanager
def top_layers(decoder: nn.Module, first: int) -> Iterator[None]:
    """Inside, `decoder` holds only its layers from `first` on: called with `inputs_embeds` = the
    hidden states entering layer `first`, it returns what the whole decoder would (checked per
    model by `top_layers_problem`: a decoder that rescales its input embeddings would not)."""
    layers = decoder.layers
    decoder.layers = nn.ModuleList(list(layers)[first:])
    try:
        yield
    finally:
        decoder.layers = layers


@contextmanager
def capture_layer_input(decoder: nn.Module, layer: int) -> Iterator[list[torch.Tensor]]:
    """Inside, every forward of `decoder` appends the hidden states entering its layer `layer`
    (B, T, H) to the yielded list, detached."""
    kept: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        kept.append(hidden.detach())

    handle = decoder.layers[layer].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        yield kept
    finally:
        handle.remove()


def top_layer_modules(model: nn.Module, first: int, targets: str | list[str]) -> list[str]:
    """Full names of the linear modules a critic of the decoder layers from `first` on adapts:
    every linear module in them ("all-linear") or those whose name ends in one of `targets`."""
    decoder = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is decoder.layers)
    names = []
    for index in range(first, len(decoder.layers)):
        for name, module in decoder.layers[index].named_modules():
            if not isinstance(module, nn.Linear) or "lora_" in name:
                continue
            name = name.removesuffix(".base_layer")  # a linear wrapped by an SFT adapter
            if targets == "all-linear" or name.rsplit(".", 1)[-1] in targets:
                names.append(f"{prefix}.{index}.{name}")
    if not names:
        raise ValueError(f"no linear modules {targets} in decoder layers {first}+")
    return names


@torch.no_grad()
def top_layers_problem(model: nn.Module, first: int) -> str | None:
    """Why `top_layers` would not be exact for this model, or None. Refused: layers of mixed
    kinds (sliding and full attention, picked by layer index inside the decoder's loop), and a
    difference between the whole decoder's last hidden states and those of its layers from
    `first` on (e.g. a decoder that scales its input embeddings), on a few tokens in two rows,
    one left-padded."""
    lm = model.get_base_model()
    kinds = set(getattr(lm.config.get_text_config(), "layer_types", None) or [])
    if len(kinds) > 1:
        return f"its layers are of different kinds ({', '.join(sorted(kinds))})"
    decoder = lm.get_decoder()
    device = next(model.parameters()).device
    ids = torch.arange(1, 9, device=device).repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with capture_layer_input(decoder, first) as kept:
        whole = decoder_states(decoder, ids, mask)
    top = decoder_states(decoder, kept[0], mask, first)
    error = float((whole - top)[mask.bool()].abs().max())
    return None if error < 1e-4 else f"its top layers run alone differ by up to {error:.3g}"


@dataclass
class Rollout:
    """One batch of generated replies and what the policy, reference and critic said about them."""

    sequences: torch.Tensor  # (B, P + R) left-padded prompt, then the reply
    attention_mask: torch.Tensor  # (B, P + R)
    responses: torch.Tensor  # (B, R)
    mask: torch.Tensor  # (B, R) float: 1 up to and including the first end-of-turn token
    ended: torch.Tensor  # (B,) bool: the reply ended by itself
    logprobs: torch.Tensor  # (B, R)
    ref_logprobs: torch.Tensor  # (B, R)
    values: torch.Tensor  # (B, R); (B, 0) without a critic (RLOO)
    replies: list[str]
    seconds: float
    critic_inputs: torch.Tensor | None = None  # (B, P + R, H): critic_layers > 0 only


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


# ---- adapters ------------------------------------------------------------------------------


def add_adapters(model: nn.Module, adapters: dict[str, Any]) -> tuple[nn.Module, list[str]]:
    """Put fresh trainable LoRA adapters (name -> peft `LoraConfig`) on the model, above its
    active adapters (the SFT stack, kept frozen). Returns the peft model and the stack below.
    """
    from peft import PeftModel, get_peft_model

    below: list[str] = []
    (first, lora), *rest = adapters.items()
    if isinstance(model, PeftModel):
        below = list(model.base_model.active_adapters)
        model.add_adapter(first, lora)
    else:
        model = get_peft_model(model, lora, adapter_name=first)
    for name, config in rest:
        model.add_adapter(name, config)
    return model, below


def set_trainable(model: nn.Module, trainable: list[str]) -> None:
    """Exactly the parameters of the adapters `trainable` require gradients."""
    for name, param in model.named_parameters():
        param.requires_grad_(any(f".{a}." in name for a in trainable))


@contextmanager
def use_adapters(model: nn.Module, active: list[str], trainable: list[str]) -> Iterator[None]:
    """Inside, exactly `active` adapters apply (none: the bare base); afterwards the previous
    ones do. `trainable` keep requiring gradients throughout (peft's switch would freeze them).
    """
    before = list(model.base_model.active_adapters)
    try:
        if active:
            model.base_model.set_adapter(active)
            set_trainable(model, trainable)
            yield
        else:
            with model.disable_adapter():
                yield
    finally:
        model.base_model.set_adapter(before)
        set_trainable(model, trainable)


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout in `model` to 0 (base layers, attention, LoRA adapters) for good.

    Modules hold dropout as `nn.Dropout` layers (GPT-2, peft's lora_dropout) or as a float
    `attention_dropout` passed to the attention kernel (Llama, Qwen, Gemma); both are zeroed.
    Returns how many were non-zero.
    """
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p, changed = 0.0, changed + 1
        rate = module.__dict__.get("attention_dropout")
        if isinstance(rate, float) and rate > 0:
            module.attention_dropout, changed = 0.0, changed + 1
    return changed


# ---- saving and loading --------------------------------------------------------------------


def save_ppo(model: nn.Module, value_head: ValueHead | None, out_dir: str | Path) -> Path:
    """Write the policy adapter (a standalone LoRA adapter dir) and, unless `value_head` is
    None (RLOO), the critic's adapter and head to `out_dir`."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    policy = get_peft_model_state_dict(model, adapter_name=POLICY, save_embedding_layers=False)
    save_file(_cpu(policy), out / "adapter_model.safetensors")
    config = copy.deepcopy(model.peft_config[POLICY])
    config.inference_mode = True
    config.save_pretrained(str(out))
    if value_head is not None:
        critic = get_peft_model_state_dict(model, adapter_name=CRITIC, save_embedding_layers=False)
        head = {HEAD_PREFIX + k: v for k, v in value_head.state_dict().items()}
        save_file(_cpu({**critic, **head}), out / CRITIC_FILE)
    return out


def load_ppo(model: nn.Module, value_head: ValueHead | None, src: str | Path) -> None:
    """Load weights written by `save_ppo` into the policy (and critic) adapters and the head."""
    from safetensors.torch import load_file

    src = Path(src)
    device = str(next(model.parameters()).device)
    _load_adapter(model, POLICY, load_file(src / "adapter_model.safetensors", device=device), src)
    if value_head is None:
        return
    if not (src / CRITIC_FILE).is_file():
        raise ValueError(f"{src}: no {CRITIC_FILE}; it was saved without a critic (by RLOO?)")
    critic = load_file(src / CRITIC_FILE, device=device)
    head = {k[len(HEAD_PREFIX) :]: v for k, v in critic.items() if k.startswith(HEAD_PREFIX)}
    adapter = {k: v for k, v in critic.items() if not k.startswith(HEAD_PREFIX)}
    _load_adapter(model, CRITIC, adapter, src)
    value_head.load_state_dict(head)


def _load_adapter(model: nn.Module, name: str, weights: dict[str, torch.Tensor], src: Path) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, weights, adapter_name=name)
    missing = [k for k in result.missing_keys if f".{name}." in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{src}: the saved {name} adapter does not match this model "
            f"(missing {missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})"
        )


def _cpu(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in weights.items()}


def weights_digest(model: nn.Module) -> str:
    """sha256 of every trainable parameter, in name order (equal on every DDP rank)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
