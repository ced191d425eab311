"""`rlchat train sft`: a LoRA adapter fine-tuned on the replies users rated well.

config → snapshot → dataset (rated-well replies, split by conversation) → TRL `SFTTrainer`
with a peft LoRA on the deployed policy's base (or `base_model`) → held-out loss before and
after → an `sft` candidate model version with its metrics. The loss falls on the rated reply
only (prompt-completion rows, TRL's `completion_only_loss`). Checkpoints live in the run
directory; `--resume` continues the newest unfinished run from its last checkpoint.

`JobConfig`, `starting_point`, `lora_config`, `training_args` and `RunLogger` are shared with
`rl.reward`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, set_seed
from transformers.trainer_utils import get_last_checkpoint

from agent.config import Settings
from agent.errors import ConfigError, ValidationError
from agent.modeling import encode_chat, load_base, pick_device
from agent.registry import ModelRegistry
from agent.store.api import Store
from rl.datasets import SFTDataOptions, build_sft_data
from rl.runs import Run, training_run

log = logging.getLogger(__name__)

LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}
"""Default LoRA target modules per `config.model_type` (attention and MLP); else all-linear."""


@dataclass
class JobConfig:
    """Fields every training job shares: where to start, LoRA, the optimiser loop, checkpoints."""

    base_model: str = ""
    """HF model directory or hub id to train on; empty: the deployed policy's base (registry)."""
    policy_version_id: int | None = None
    """Start from this policy version instead of the deployed one (ignored with base_model)."""
    name: str = ""
    """Name of the model version to register (default: <kind>-run<id>)."""
    sources: list[str] = field(default_factory=list)
    """Conversation sources to learn from (chat, arena, simulated, import); empty: all, allowed
    only when the database does not mix real and simulated feedback. Recorded on the run."""
    lora: bool = True
    """Train a LoRA adapter (True) or every weight (False; reward model only)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_target_modules: list[str] = field(default_factory=list)
    """Module names to adapt; empty: a default per architecture (see LORA_TARGETS)."""
    learning_rate: float = 2e-4
    """Peak AdamW learning rate."""
    num_epochs: float = 3.0
    """Passes over the training rows (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Stop after this many optimiser steps (-1: run num_epochs)."""
    batch_size: int = 8
    """Rows per device per step (a preference row holds a chosen and a rejected reply)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimiser step."""
    warmup_ratio: float = 0.0
    """Share of the steps spent warming the learning rate up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_length: int = 1024
    """Longest tokenized row; longer SFT rows are truncated, longer preference rows dropped."""
    gradient_checkpointing: bool = True
    """Trade compute for memory on GPU (never used on CPU)."""
    eval_steps: int = 50
    """Evaluate on the held-out rows every this many steps."""
    save_steps: int = 50
    """Checkpoint every this many steps (a multiple of eval_steps)."""
    logging_steps: int = 10
    """Log training metrics every this many steps."""
    device: str = "auto"
    """auto (CUDA when available, bf16), cpu or cuda[:N]."""
    seed: int = 0
    """Seed of the initialisation and data order (the data split is stored per conversation)."""

    def __post_init__(self) -> None:
        positive = ("lora_r", "lora_alpha", "batch_size", "gradient_accumulation_steps")
        positive += ("max_length", "eval_steps", "save_steps", "logging_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout: must be in [0, 1), got {self.lora_dropout}")
        if self.save_steps % self.eval_steps:
            raise ConfigError(
                f"save_steps: must be a multiple of eval_steps ({self.eval_steps}), got {self.save_steps}"
            )
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate: must be > 0, got {self.learning_rate}")


@dataclass
class Config(JobConfig):
    """`rlchat train sft`: which replies to imitate and how to train the adapter."""

    signals: list[str] = field(default_factory=lambda: ["thumb", "likert", "comparison"])
    """Feedback that selects a reply: thumb, likert (normalised score >= min_score), comparison (net wins)."""
    min_score: float = 0.5
    """Mean rater-normalised rating (z units, as the reward model's pairs) a reply needs to be
    imitated (rl.datasets.SFTDataOptions.min_score)."""
    extra_jsonl: str = ""
    """Optional JSONL of extra training rows ({"messages": [...]} or {"prompt", "completion"})."""
    min_examples: int = 8
    """Fewest training rows worth a run; fewer is an error that says how many there are."""


@dataclass
class StartingPoint:
    """The policy a job starts from, as files and as model versions."""

    base: str
    """Base model directory (or hub id)."""
    adapters: list[str]
    """The policy's LoRA adapters, bottom-up."""
    version_id: int
    """The policy version (the base version when starting from an explicit base_model)."""
    base_version_id: int
    """The `base` model version under it."""


def starting_point(store: Store, settings: Settings, config: JobConfig) -> StartingPoint:
    """The deployed policy (or `policy_version_id`), or `base_model` registered as a base version."""
    registry = ModelRegistry(store, settings)
    if config.base_model:
        source = Path(config.base_model)
        name = str(source.resolve()) if source.is_dir() else config.base_model
        known = [mv.id for mv in registry.versions("base") if mv.name == name]
        version_id = known[-1] if known else registry.add("base", config.base_model, name=name)
    elif config.policy_version_id is not None:
        version_id = config.policy_version_id
    else:
        deployed = store.deployed_version()
        if deployed is None:
            raise ConfigError(
                "base_model: nothing is deployed and no base_model is set; pass "
                "--set base_model=DIR_OR_HUB_ID, or deploy a policy (`rlchat models deploy ID`)"
            )
        version_id = deployed.id
    spec = registry.resolve(version_id)
    base_id = version_id
    while (mv := store.get_model_version(base_id)).kind != "base":
        base_id = mv.parent_id  # resolve() checked that the chain ends at a base
    return StartingPoint(spec.base, spec.adapters, version_id, base_id)


def lora_config(config: JobConfig, model: torch.nn.Module, task_type: str) -> Any:
    """A peft LoraConfig: the configured targets or the architecture's default."""
    from peft import LoraConfig

    targets: list[str] | str = config.lora_target_modules or LORA_TARGETS.get(
        model.config.model_type, "all-linear"
    )
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type=task_type,
        modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
    )


def training_args(config: JobConfig, run: Run, device: torch.device) -> dict[str, Any]:
    """TrainingArguments fields shared by the SFT and reward jobs (bf16 + checkpointing on GPU)."""
    on_gpu = device.type == "cuda"
    return dict(
        output_dir=str(run.checkpoint_dir),
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        max_length=config.max_length,
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,
        logging_steps=config.logging_steps,
        bf16=on_gpu,
        gradient_checkpointing=on_gpu and config.gradient_checkpointing,
        use_cpu=device.type == "cpu",
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
    )


class RunLogger(TrainerCallback):
    """Trainer logs → the training run (TensorBoard + the row's metrics), namespaced."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any
    ) -> None:
        metrics = {}
        for key, value in (logs or {}).items():
            if isinstance(value, int | float):
                prefix, name = ("eval", key[5:]) if key.startswith("eval_") else ("train", key)
                metrics[f"{prefix}/{name}"] = value
        self.run.log(state.global_step, metrics)


def last_checkpoint(run: Run, resume: bool) -> str | None:
    """The newest checkpoint of a resumed run, if it got as far as one."""
    if not resume or not run.checkpoint_dir.is_dir():
        return None
    found = get_last_checkpoint(str(run.checkpoint_dir))
    if found:
        log.info("resuming from checkpoint %s", found)
    return found


def main(
    config: Config,
    settings: Settings,
    resume: bool = False,
    *,
    callbacks: list[TrainerCallback] | None = None,
) -> int:
    """Train an SFT adapter and register it as a candidate; returns the new model version id."""
    store = Store.open(settings)
    try:
        with training_run(store, settings, "sft", config, resume=resume) as run:
            return _train(store, settings, config, run, resume, callbacks or [])
    finally:
        store.close()


def _train(
    store: Store,
    settings: Settings,
    config: Config,
    run: Run,
    resume: bool,
    callbacks: list[TrainerCallback],
) -> int:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    options = SFTDataOptions(
        signals=config.signals,
        min_score=config.min_score,
        extra_jsonl=config.extra_jsonl,
    )
    data = build_sft_data(run.snapshot(config.sources), options)
    log.info("%s", data.summary.format())
    run.record_data({**data.data_ids(), "summary": data.summary.as_dict()})
    check_enough(
        data.train, data.heldout, config.min_examples, "rated-well replies", "train an SFT adapter"
    )
    start = starting_point(store, settings, config)
    if start.adapters:
        log.info(
            "SFT trains a fresh adapter on the base %s (not on top of %s)",
            start.base,
            start.adapters,
        )
    device = pick_device(config.device)
    set_seed(config.seed)
    model, tokenizer = load_base(start.base, device=device)
    max_length = fit_max_length(config.max_length, model)
    args = SFTConfig(
        **{**training_args(config, run, device), "max_length": max_length},
        completion_only_loss=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(tokenize_rows(tokenizer, data.train)),
        eval_dataset=Dataset.from_list(tokenize_rows(tokenizer, data.heldout)),
        processing_class=tokenizer,
        peft_config=lora_config(config, model, "CAUSAL_LM"),
        callbacks=[RunLogger(run), *callbacks],
    )
    before = trainer.evaluate()["eval_loss"]
    result = trainer.train(resume_from_checkpoint=last_checkpoint(run, resume))
    after = trainer.evaluate()["eval_loss"]
    metrics = {
        "eval/loss_before": before,
        "eval/loss": after,
        "train/loss": result.training_loss,
        "train/examples": len(data.train),
        "eval/examples": len(data.heldout),
        "perf/examples_per_s": result.metrics.get("train_samples_per_second", 0.0),
        "perf/train_s": result.metrics.get("train_runtime", 0.0),
    }
    log.info("held-out loss %.4f -> %.4f", before, after)
    adapter_dir = run.dir / "adapter"
    trainer.model.save_pretrained(str(adapter_dir))
    version_id = ModelRegistry(store, settings).add(
        "sft",
        adapter_dir,
        name=config.name or f"sft-run{run.id}",
        parent_id=start.base_version_id,
        metrics={**metrics, "run_id": run.id},
    )
    run.finish(output_version_id=version_id, metrics=metrics)
    return version_id


def fit_max_length(max_length: int, model: torch.nn.Module) -> int:
    """`max_length`, cut to the model's context window (a row longer than it cannot be trained)."""
    window = model.config.max_position_embeddings
    if max_length > window:
        log.info("max_length %d is longer than the model's window: using %d", max_length, window)
    return min(max_length, window)


def tokenize_rows(tokenizer: Any, rows: list[dict[str, Any]]) -> list[dict[str, list[int]]]:
    """Prompt-completion rows as `input_ids` and `completion_mask`, tokenised by `encode_chat`.

    Tokenised here rather than by TRL so that message contents stay text: a reply or prompt
    holding `<|im_end|>` or `<|system|>` trains on those characters, never on the special ids.
    """
    out = []
    for row in rows:
        prompt_ids = encode_chat(tokenizer, row["prompt"], add_generation_prompt=True)
        ids = encode_chat(tokenizer, row["prompt"] + row["completion"], add_generation_prompt=False)
        if ids[: len(prompt_ids)] != prompt_ids:
            raise ValidationError(
                "the chat template renders a conversation differently from its prompt with the "
                "assistant prompt added, so the reply tokens cannot be found; give the model a "
                "chat template whose generation prompt is a prefix of the assistant turn"
            )
        completion_mask = [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))
        out.append({"input_ids": ids, "completion_mask": completion_mask})
    return out


def check_enough(train: list, heldout: list, needed: int, what: str, purpose: str) -> None:
    """Fail before any training when the snapshot holds too little data."""
    if len(train) < needed:
        raise ValidationError(
            f"need at least {needed} {what} to {purpose}, found {len(train)} for training "
            f"({len(heldout)} held out); collect more feedback (rate or compare more replies) "
            "or lower the minimum in the job config"
        )
    if not heldout:
        raise ValidationError(
            f"need at least 1 validation row of {what} to evaluate, found none ({len(train)} "
            "for training); add conversations (each one's split is stored in the `splits` table)"
        )
