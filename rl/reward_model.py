"""The reward model's scoring API: `RewardModel.load(dir).score(contexts, replies) -> (B,)`.

A `reward` model version directory is self-contained: a Hugging Face sequence-classification
model with one label (LoRA already merged in), its tokenizer, and `reward_stats.json` with the
mean and std of its raw scores on a reference set, so that `score(..., normalize=True)` puts
rewards on a standard scale (mean 0, std 1 on the reference replies). Replies are encoded
exactly as in training: the chat template over context + the assistant reply.

Where the score is read (`set_pooling`, recorded in the saved config as `reward_pooling`):
`last`, Hugging Face's own, reads the head at the last token; `mean` reads it at the mean of
the last hidden states over every attended token, so each word of the reply counts directly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from agent.errors import ConfigError, NotFoundError, ValidationError
from agent.modeling import default_dtype, encode_chat, load_tokenizer, pick_device

log = logging.getLogger(__name__)

STATS_FILE = "reward_stats.json"
"""Mean, std and max_length of a saved reward model, next to its weights."""

Chat = list[dict[str, str]]

POOLING = ("last", "mean")


def check_pooling(pooling: str) -> None:
    """A ConfigError naming the field unless `pooling` is one of POOLING."""
    if pooling not in POOLING:
        raise ConfigError(f"pooling: {pooling!r} is not one of {', '.join(POOLING)}")


def set_pooling(model: PreTrainedModel, pooling: str) -> PreTrainedModel:
    """Make a one-label classifier read its score the `pooling` way, and record it in its config.

    last: the head at the last non-PAD token (the classifier's own pooling). mean: the head at
    the mean of the last hidden states over the attended tokens (a context's hidden states are
    the same under every reply to it, so replies differ by their own tokens). Since the head is
    linear, that is the mean of the head's per-token scores. Why (docs/LOOP.md,
    benchmarks/reward_readout.py): on 141 SmolLM2 preference pairs, a linear probe of frozen
    SmolLM2 separated the test pairs 0.75-0.76 of the time from this mean, 0.54-0.60 from the
    last token; trained end to end, 0.716 against 0.552.
    """
    check_pooling(pooling)
    model.config.reward_pooling = pooling
    if pooling == "mean":
        _MeanPooling(model.base_model)
    return model


def pooling_of(model: PreTrainedModel) -> str:
    """The pooling recorded in a classifier's config (`last` for models saved before it was)."""
    return str(model.config.to_dict().get("reward_pooling", "last"))


class _MeanPooling:
    """Hooks on a classifier's trunk: every position's last hidden state becomes the masked mean
    over the attended positions, so the classifier's last-token read-out reads the mean.

    On the trunk rather than the classifier because peft's LoRA wrapper calls the classifier's
    `forward` directly (bypassing its hooks) but calls the trunk as a module."""

    def __init__(self, trunk: torch.nn.Module) -> None:
        self.attention_mask: torch.Tensor | None = None
        trunk.register_forward_pre_hook(self._keep_mask, with_kwargs=True)
        trunk.register_forward_hook(self._pool)

    def _keep_mask(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.attention_mask = kwargs.get("attention_mask")

    def _pool(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        hidden = output.last_hidden_state  # (B, T, H)
        mask = self.attention_mask
        if mask is None:
            mask = torch.ones(hidden.shape[:2], device=hidden.device)
        weights = mask.to(torch.float32).unsqueeze(-1)  # (B, T, 1)
        mean = (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, H)
        output.last_hidden_state = mean.to(hidden.dtype).unsqueeze(1).expand_as(hidden)
        self.attention_mask = None
        return output


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: Chat, reply: str) -> list[int]:
    """Token ids of context + assistant reply; contents stay text (see `encode_chat`)."""
    chat = [*context, {"role": "assistant", "content": reply}]
    return encode_chat(tokenizer, chat, add_generation_prompt=False)


def tokenize_pairs(tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]]) -> list[dict]:
    """Preference rows ({"prompt", "chosen", "rejected", "margin"}) with `chosen_ids` and
    `rejected_ids` added, so TRL's RewardTrainer trains on exactly what `score` encodes and
    never re-tokenises message text (where `<|im_end|>` would become a special token)."""
    return [
        {
            **row,
            "chosen_ids": encode_pair(tokenizer, row["prompt"], row["chosen"][-1]["content"]),
            "rejected_ids": encode_pair(tokenizer, row["prompt"], row["rejected"][-1]["content"]),
        }
        for row in rows
    ]


class RewardModel:
    """A scalar reward for (context, reply), batched, on CPU or GPU."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        mean: float = 0.0,
        std: float = 1.0,
        max_length: int = 1024,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.mean = mean
        self.std = std
        self.max_length = max_length
        self.model.config.pad_token_id = tokenizer.pad_token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device | None = None) -> RewardModel:
        """A saved reward model version directory, on `device` (auto: CUDA in bf16, else CPU)."""
        path = Path(path)
        if not (path / "config.json").is_file() or not (path / STATS_FILE).is_file():
            raise NotFoundError(
                f"reward model {path}: looked for config.json and {STATS_FILE} there and did not "
                "find both; give the directory of a `reward` model version (`rlchat models list`)"
            )
        stats = json.loads((path / STATS_FILE).read_text())
        chosen = pick_device(device)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=1, dtype=default_dtype(chosen)
        )
        set_pooling(model, pooling_of(model))
        return cls(
            model.to(chosen),
            load_tokenizer(path),
            mean=float(stats["mean"]),
            std=float(stats["std"]),
            max_length=int(stats.get("max_length", 1024)),
        )

    def save(self, path: str | Path, extra_stats: dict[str, Any] | None = None) -> Path:
        """Write weights, tokenizer and `reward_stats.json` to `path` (a new directory)."""
        path = Path(path)
        self.model.save_pretrained(str(path))
        self.tokenizer.save_pretrained(str(path))
        stats = {"mean": self.mean, "std": self.std, "max_length": self.max_length}
        (path / STATS_FILE).write_text(json.dumps({**stats, **(extra_stats or {})}, indent=2))
        return path

    def encode(self, context: Chat, reply: str) -> list[int]:
        """Token ids of context + reply, as the trainer saw them; the start is cut when too long."""
        return encode_pair(self.tokenizer, context, reply)[-self.max_length :]

    @torch.no_grad()
    def score(
        self,
        contexts: list[Chat],
        replies: list[str],
        *,
        normalize: bool = True,
        batch_size: int = 16,
    ) -> torch.Tensor:
        """Rewards (B,) float32 on the CPU; contexts are chats that end with a user turn."""
        if len(contexts) != len(replies):
            raise ValidationError(
                f"replies: got {len(replies)} replies for {len(contexts)} contexts; give one each"
            )
        if batch_size < 1:
            raise ValidationError(f"batch_size: must be >= 1, got {batch_size}")
        encoded = [self.encode(c, r) for c, r in zip(contexts, replies, strict=True)]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        scores = torch.empty(len(encoded), dtype=torch.float32)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            scores[idx] = self._forward([encoded[i] for i in idx])
        if normalize:
            scores = (scores - self.mean) / self.std
        return scores

    def _forward(self, batch: list[list[int]]) -> torch.Tensor:
        """Raw scores of one batch, right-padded (the model pools as `set_pooling` made it)."""
        width = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        out = self.model(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
        )
        return out.logits.squeeze(-1).float().cpu()  # (B,)
