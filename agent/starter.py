"""The starter model: the offline default base, trained from scratch on chitchat conversations.

    result = build_starter(StarterConfig(size="small"), settings, store)

trains a byte-level BPE tokenizer and a small Llama-architecture decoder on the conversations
of the `chitchat-dataset` package (shipped inside the package: no download), rendered in
`DEFAULT_CHAT_TEMPLATE` with the first speaker as the user and the second as the assistant,
then saves it in Hugging Face format and registers it as a `base` model version (deployed
when nothing is deployed yet). Half the conversations start with the default system prompt,
so the model has seen the format the chat serves.

Loss: every assistant token (reply and closing EOS) weighs 1, every user token
`user_loss_weight` (default 0.5: the user turns are the same kind of casual English, so they
teach the language too), role markers and system prompts 0. The held-out loss is measured on
assistant tokens only, on conversations never trained on.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from transformers import (
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    get_cosine_with_min_lr_schedule_with_warmup,
)

from agent.config import Settings
from agent.errors import ConfigError
from agent.heldout import EVAL_CONVERSATIONS, reply_metrics
from agent.modeling import encode_chat, pick_device
from agent.ngram import trigram_reply_metrics
from agent.store.api import Store
from agent.tiny import (
    chitchat_conversations,
    encode_turns,
    llama_config,
    pack_rows,
    save_model,
    to_messages,
    train_tokenizer,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StarterSize:
    """Architecture and training budget of one starter size."""

    hidden_size: int
    """Width of the residual stream."""
    num_layers: int
    """Decoder layers."""
    num_heads: int
    """Attention heads (no grouped-query attention: as many KV heads)."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    vocab_size: int
    """BPE vocabulary size, special tokens included."""
    context: int
    """Training sequence length in tokens (also the model's context window)."""
    batch_size: int
    """Rows of `context` tokens per optimiser step."""
    steps: int
    """Default number of optimiser steps."""
    lr: float
    """Peak AdamW learning rate."""
    eval_every: int
    """Steps between held-out evaluations."""


SIZES = {
    # For tests: ~200 conversations train in well under a minute of CPU.
    "tiny": StarterSize(64, 2, 4, 128, 1024, 128, 16, 120, 4e-3, 40),
    # The CPU option: <= 10 minutes on 2 CPU cores (~1.4 epochs of the ~3.2M tokens). Narrow
    # and trained long beats wide and short here: 192 wide for 360 steps scored 4.97 nats per
    # held-out reply token, 128 wide for 1200 steps 4.04, a Witten-Bell trigram 4.10 (lr 6e-3:
    # 4.46; batch 8 x 2000 steps at 4e-3: 4.07). Sweep in issue #10's notes.
    "small": StarterSize(128, 4, 4, 384, 4096, 256, 16, 1200, 3e-3, 200),
    # GPU sizes. chitchat holds only ~3M tokens, so these stop at ~3-4 epochs: more overfits.
    "medium": StarterSize(384, 6, 6, 1024, 8192, 512, 32, 700, 1e-3, 100),
    "large": StarterSize(512, 8, 8, 1408, 8192, 1024, 32, 400, 8e-4, 50),
}

SAMPLE_PROMPTS = [
    "hi how are you?",
    "what do you like to do for fun?",
    "where are you from?",
    "what are you studying?",
    "do you have any pets?",
    "what is your favorite movie?",
    "i just got back from a trip to california",
    "what did you do this weekend?",
    "do you like sports?",
    "what kind of music do you listen to?",
]
"""First user turns of the sample exchanges printed after a build."""


@dataclass
class StarterConfig:
    """How to build the starter model."""

    size: str = "small"
    """One of tiny (tests), small (the CPU default), medium, large (GPU)."""
    max_conversations: int | None = None
    """Use only the first N usable chitchat conversations (None: all ~4,000 that have a reply)."""
    steps: int | None = None
    """Optimiser steps (None: the size's default)."""
    lr: float | None = None
    """Peak learning rate (None: the size's default)."""
    seed: int = 0
    """Seed of the data split, the initial weights, the batch order and the samples."""
    device: str = "auto"
    """auto (CUDA when available, bf16 autocast), cpu or cuda[:N]."""
    num_threads: int = 0
    """CPU threads for torch during the build (0: torch's default; 1 on a busy shared machine)."""
    held_out_fraction: float = 0.05
    """Fraction of conversations kept out of training to measure the held-out loss."""
    eval_batches: int = 8
    """Batches of held-out rows per evaluation."""
    user_loss_weight: float = 0.5
    """Loss weight of user tokens (assistant tokens weigh 1, markers and system prompts 0)."""
    system_prompt: str = Settings.system_prompt
    """System prompt put in front of a share of the training conversations."""
    system_prompt_prob: float = 0.5
    """Share of training conversations that start with `system_prompt`."""
    warmup_fraction: float = 0.05
    """Linear learning-rate warm-up, as a fraction of the steps; cosine decay after it."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    weight_decay: float = 0.1
    """AdamW weight decay of the weight matrices (never of norms, biases or embeddings)."""
    name: str = ""
    """Name of the registered model version (default: starter-<size>)."""
    preset: StarterSize = field(init=False)
    """The size's architecture and budget (derived)."""

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ConfigError(f"size: {self.size!r} is not one of {', '.join(SIZES)}")
        self.preset = SIZES[self.size]
        if self.max_conversations is not None and self.max_conversations < 20:
            raise ConfigError(f"max_conversations: must be >= 20, got {self.max_conversations}")
        if self.num_threads < 0:
            raise ConfigError(f"num_threads: must be >= 0, got {self.num_threads}")
        if self.lr is not None and not 0 < self.lr < 1:
            raise ConfigError(f"lr: must be in (0, 1), got {self.lr}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps: must be >= 1, got {self.steps}")
        if not 0 < self.held_out_fraction < 0.5:
            raise ConfigError(
                f"held_out_fraction: must be in (0, 0.5), got {self.held_out_fraction}"
            )
        for name in ("user_loss_weight", "system_prompt_prob", "warmup_fraction", "min_lr_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        self.name = self.name or f"starter-{self.size}"

    @property
    def total_steps(self) -> int:
        return self.steps or self.preset.steps

    @property
    def learning_rate(self) -> float:
        return self.lr or self.preset.lr


@dataclass
class StarterResult:
    """What a build produced."""

    version_id: int
    path: Path
    metrics: dict[str, Any]
    samples: list[tuple[str, str]]
    """(user message, the model's reply) pairs, sampled with a fixed seed."""


# ---- data ----------------------------------------------------------------------------------


def split_conversations(
    conversations: list[list[str]], config: StarterConfig
) -> tuple[list[list[dict[str, str]]], list[list[dict[str, str]]]]:
    """Shuffle, hold out a fraction, and render as chat messages (some with a system prompt)."""
    rng = random.Random(config.seed)
    order = list(range(len(conversations)))
    rng.shuffle(order)
    n_held = max(1, round(len(order) * config.held_out_fraction))

    def render(i: int) -> list[dict[str, str]]:
        system = config.system_prompt if rng.random() < config.system_prompt_prob else None
        return to_messages(conversations[i], system)

    return [render(i) for i in order[n_held:]], [render(i) for i in order[:n_held]]


# ---- training ------------------------------------------------------------------------------


def weighted_loss(model: torch.nn.Module, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, weighted per target token. ids, weights: (B, T)."""
    logits = model(input_ids=ids).logits[:, :-1].float()  # (B, T-1, V)
    nll = F.cross_entropy(
        logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none"
    )  # (B*(T-1),)
    w = weights[:, 1:].flatten()
    return (nll * w).sum() / w.sum().clamp(min=1e-8)


@torch.no_grad()
def held_out_loss(
    model: torch.nn.Module, ids: torch.Tensor, weights: torch.Tensor, batch_size: int
) -> float:
    """Mean next-token loss over assistant tokens (weight 1) of the held-out rows."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0.0
    for start in range(0, len(ids), batch_size):
        x = ids[start : start + batch_size].to(device)
        mask = (weights[start : start + batch_size] == 1.0).float().to(device)
        with _autocast(device):
            logits = model(input_ids=x).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        total += float((nll * mask[:, 1:]).sum())
        count += float(mask[:, 1:].sum())
    model.train()
    return total / max(count, 1.0)


def _autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: matrices decay; norms, biases and the (tied) embedding do not."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding)
                  for p in m.parameters()}  # fmt: skip
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def train(
    model: LlamaForCausalLM,
    train_rows: tuple[torch.Tensor, torch.Tensor],
    held_rows: tuple[torch.Tensor, torch.Tensor],
    config: StarterConfig,
    device: torch.device,
) -> dict[str, float]:
    """AdamW with warm-up and cosine decay to `min_lr_ratio` (transformers' schedule); held-out loss at the start, every N steps, the end."""
    size = config.preset
    ids, weights = train_rows
    opt = torch.optim.AdamW(
        param_groups(model, config.weight_decay), lr=config.learning_rate, betas=(0.9, 0.95)
    )
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        opt,
        num_warmup_steps=max(1, int(config.total_steps * config.warmup_fraction)),
        num_training_steps=config.total_steps,
        min_lr_rate=config.min_lr_ratio,
    )
    gen = torch.Generator().manual_seed(config.seed)
    order = torch.cat(
        [torch.randperm(len(ids), generator=gen) for _ in range(_epochs(config, ids))]
    )
    metrics = {"eval/loss_initial": held_out_loss(model, *held_rows, size.batch_size)}
    metrics["eval/loss"] = metrics["eval/loss_initial"]
    tokens, start, cpu_start = 0, time.perf_counter(), time.process_time()
    model.train()
    bar = tqdm(range(config.total_steps), desc=f"starter {config.size}", unit="step")
    with logging_redirect_tqdm():
        for step in bar:
            batch = order[step * size.batch_size : (step + 1) * size.batch_size]
            x, w = ids[batch].to(device), weights[batch].to(device)  # (B, T)
            with _autocast(device):
                loss = weighted_loss(model, x, w)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            scheduler.step()
            opt.zero_grad(set_to_none=True)
            tokens += int((x != model.config.pad_token_id).sum())
            metrics["train/loss"] = loss.item()
            if (step + 1) % size.eval_every == 0 or step + 1 == config.total_steps:
                metrics["eval/loss"] = held_out_loss(model, *held_rows, size.batch_size)
                log.info("step %d: train loss %.3f, held-out loss %.3f",
                         step + 1, metrics["train/loss"], metrics["eval/loss"])  # fmt: skip
            bar.set_postfix(
                loss=f"{metrics['train/loss']:.3f}", heldout=f"{metrics['eval/loss']:.3f}"
            )
    wall = time.perf_counter() - start
    metrics |= {
        "eval/perplexity": math.exp(metrics["eval/loss"]),
        "train/tokens": tokens,
        "perf/train_s": wall,
        "perf/train_cpu_s": time.process_time() - cpu_start,
        "perf/tokens_per_s": tokens / wall,
    }
    return metrics


def _epochs(config: StarterConfig, ids: torch.Tensor) -> int:
    """Passes over the training rows needed for `total_steps` batches."""
    return math.ceil(config.total_steps * config.preset.batch_size / len(ids))


@torch.no_grad()
def sample_exchanges(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[str],
    *,
    system_prompt: str | None,
    seed: int = 0,
    max_new_tokens: int = 48,
) -> list[tuple[str, str]]:
    """(prompt, reply) pairs, sampled at temperature 0.7, top-k 40, under a fixed seed."""
    model.eval()
    device = next(model.parameters()).device
    pairs = []
    for i, prompt in enumerate(prompts):
        messages = to_messages([prompt], system_prompt)
        ids = torch.tensor([encode_chat(tokenizer, messages)], device=device)
        torch.manual_seed(seed + i)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=0.7,
            top_k=40,
            repetition_penalty=1.1,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        pairs.append((prompt, tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)))
    return pairs


# ---- building ------------------------------------------------------------------------------


def train_starter(config: StarterConfig) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict]:
    """Tokenizer and model trained on chitchat per `config`; returns them and the metrics."""
    size = config.preset
    device = pick_device(config.device)
    conversations = chitchat_conversations(config.max_conversations)
    train_convs, held_convs = split_conversations(conversations, config)
    log.info(
        "chitchat: %d training and %d held-out conversations", len(train_convs), len(held_convs)
    )
    texts = [m["content"] for conv in train_convs for m in conv if m["role"] != "system"]
    tokenizer = train_tokenizer(texts, size.vocab_size, model_max_length=1 << 30)
    train_rows = pack_rows(
        encode_turns(tokenizer, train_convs, config.user_loss_weight),
        size.context,
        tokenizer.pad_token_id,
    )
    held_rows = pack_rows(
        encode_turns(tokenizer, held_convs, 0.0), size.context, tokenizer.pad_token_id
    )
    held_rows = tuple(t[: config.eval_batches * size.batch_size] for t in held_rows)
    tokenizer.model_max_length = size.context  # set after encoding: whole turns may be longer
    log.info(
        "%d training rows of %d tokens, %d held-out rows",
        len(train_rows[0]),
        size.context,
        len(held_rows[0]),
    )
    torch.manual_seed(config.seed)
    model_config = llama_config(
        tokenizer,
        hidden_size=size.hidden_size,
        num_layers=size.num_layers,
        num_heads=size.num_heads,
        intermediate_size=size.intermediate_size,
        max_positions=size.context,
    )
    model = LlamaForCausalLM(model_config).to(device)
    metrics = train(model, train_rows, held_rows, config, device)
    # Comparable across tokenizers and with counting: bits per character of held-out replies.
    held = held_convs[:EVAL_CONVERSATIONS]
    metrics |= reply_metrics(model, tokenizer, held)
    metrics |= trigram_reply_metrics(tokenizer, train_convs, held)
    metrics.update(
        {
            "params": model.num_parameters(),
            "conversations/train": len(train_convs),
            "conversations/held_out": len(held_convs),
            "size": config.size,
            "steps": config.total_steps,
        }
    )
    return model.float().cpu(), tokenizer, metrics


def build_starter(
    config: StarterConfig, settings: Settings, store: Store, *, deploy_if_none: bool = True
) -> StarterResult:
    """Train, save in HF format, register as a `base` version (deployed when none is)."""
    from agent.registry import ModelRegistry

    start, cpu_start = time.perf_counter(), time.process_time()
    run_id = store.start_run("starter", asdict(config))
    try:
        with _torch_threads(config.num_threads):
            model, tokenizer, metrics = train_starter(config)
            samples = sample_exchanges(
                model,
                tokenizer,
                SAMPLE_PROMPTS,
                system_prompt=config.system_prompt,
                seed=config.seed,
            )
        metrics["perf/wall_s"] = time.perf_counter() - start
        metrics["perf/cpu_s"] = time.process_time() - cpu_start
        registry = ModelRegistry(store, settings)
        with tempfile.TemporaryDirectory(prefix="rlchat-starter-") as tmp:
            save_model(model, tokenizer, Path(tmp))
            version_id = registry.add("base", tmp, name=config.name, metrics=metrics)
        if deploy_if_none and registry.deployed() is None:
            registry.deploy(version_id)
    except BaseException as exc:
        store.update_run(run_id, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    store.update_run(run_id, status="succeeded", metrics=metrics, output_version_id=version_id)
    path = Path(registry.get(version_id).path)
    return StarterResult(version_id=version_id, path=path, metrics=metrics, samples=samples)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run with `n` torch CPU threads (0: leave the setting alone), restoring it afterwards."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
