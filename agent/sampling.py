"""Sampling that is exactly what the maths assumes, and log-probs from the model's own forward.

RL and evaluation compare the probability of sampled tokens under several policies, so the
sampler must be the plain temperature / top-k / top-p softmax their formulas assume. A model
folder's `generation_config.json` may hold `repetition_penalty`, `min_new_tokens`,
`no_repeat_ngram_size` and the like; `generate()` silently fills every unset field from it.
`sample()` therefore runs `generate` with a blank model generation config and a
`GenerationConfig` whose every field is set here: nothing is inherited.

`token_logprobs()` scores tokens through the model's own `forward` (so soft-capping, logit
scaling and similar model-specific processing apply), asks only for the logits of the
positions it needs (`logits_to_keep`), and takes the log-softmax by gather + logsumexp in row
chunks so a 49k- or 152k-wide vocabulary never materialises as a full fp32 log-prob tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel


@dataclass(frozen=True)
class Sampling:
    """The sampling distribution of rollouts and of the evaluation's samples."""

    max_new_tokens: int = 48
    """Most tokens in one reply."""
    temperature: float = 1.0
    """Softmax temperature (log-probs are computed at the same temperature)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 keeps all."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: {self.max_new_tokens} must be at least 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature: {self.temperature} must be above 0")
        if self.top_k < 0:
            raise ValueError(f"top_k: {self.top_k} must be 0 (off) or more")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: {self.top_p} must be in (0, 1]")


def generation_config(
    sampling: Sampling, eos_token_id: Sequence[int], pad_token_id: int
) -> GenerationConfig:
    """A `GenerationConfig` with every field explicit: plain multinomial sampling, no penalties."""
    config = GenerationConfig()
    # Neutral global defaults for every field first (repetition_penalty=1.0, min_length=0, ...).
    config.update(**GenerationConfig._get_default_generation_params())
    config.update(
        do_sample=True,
        num_beams=1,
        max_new_tokens=sampling.max_new_tokens,
        min_new_tokens=0,
        # Lengths come from max/min_new_tokens alone; a set max_length / min_length as well makes
        # generate() log a warning on every call.
        max_length=None,
        min_length=None,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        eos_token_id=list(eos_token_id),
        pad_token_id=pad_token_id,
        # PAD never sampled: it would be indistinguishable from padding in the masks.
        suppress_tokens=[pad_token_id],
        use_cache=True,
    )
    return config


def _pretrained(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model under peft / DDP wrappers (the one whose generation_config counts)."""
    inner = model
    while not isinstance(inner, PreTrainedModel):
        inner = getattr(inner, "module", None) or inner.get_base_model()  # DDP, then peft
    return inner


@contextmanager
def blank_model_generation_config(model: torch.nn.Module) -> Iterator[None]:
    """Inside, the model's own generation config is empty, so `generate` inherits nothing."""
    inner = _pretrained(model)
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: GenerationConfig,
) -> torch.Tensor:
    """Sequences (B, P + R) sampled from left-padded prompts (B, P) under exactly `config`."""
    with blank_model_generation_config(model):
        return model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config
        )


def logprobs_of(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, chunk: int = 4
) -> torch.Tensor:
    """log softmax(logits / temperature) at `tokens`: (B, T, V), (B, T) -> (B, T) in fp32.

    Computed by gather + logsumexp a few rows at a time, never as a full fp32 (B, T, V) copy.
    """
    out = []
    for i in range(0, logits.shape[0], chunk):
        rows = logits[i : i + chunk].float() / temperature  # (b, T, V)
        picked = rows.gather(-1, tokens[i : i + chunk, :, None])[..., 0]  # (b, T)
        out.append(picked - torch.logsumexp(rows, dim=-1))
    return torch.cat(out)


def position_ids_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate()` counts them: (B, T) -> (B, T)."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


def reply_logits(
    model: torch.nn.Module,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    n_reply: int,
    **forward_kwargs: object,
) -> torch.Tensor:
    """The model's own logits predicting the last `n_reply` tokens of `sequences`: (B, R, V).

    Only the positions that predict reply tokens are projected onto the vocabulary, and
    positions skip left padding as they did when the tokens were sampled.
    """
    out = model(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=position_ids_of(attention_mask),
        logits_to_keep=n_reply + 1,
        use_cache=False,
        **forward_kwargs,
    )
    return out.logits[:, :-1]  # (B, R, V): position t predicts token t + 1


@torch.no_grad()
def token_logprobs(
    model: torch.nn.Module,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    n_reply: int,
    temperature: float = 1.0,
    batch_size: int = 8,
) -> torch.Tensor:
    """Log-probs (B, R) of the last `n_reply` tokens of each sequence, in forward chunks."""
    chunks = []
    for i in range(0, sequences.shape[0], batch_size):
        seq, mask = sequences[i : i + batch_size], attention_mask[i : i + batch_size]
        logits = reply_logits(model, seq, mask, n_reply)
        chunks.append(logprobs_of(logits, seq[:, -n_reply:], temperature))
    return torch.cat(chunks)
