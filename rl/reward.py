"""`rlchat train reward`: a Bradley–Terry reward model from comparisons and sibling ratings.

config → snapshot → preference pairs (split by conversation) → `AutoModelForSequenceClassification`
with one label, initialised from the policy (base + its adapters merged) or the bare base →
TRL `RewardTrainer` (Bradley–Terry loss -log σ(r_chosen - r_rejected - margin), plus reward
centring, https://huggingface.co/papers/2312.09244 Eq. 2) with LoRA or full fine-tuning →
pairwise accuracy, mean margin and calibration on the validation split during training (early
stopping and checkpoint choice), and after training on the test split, which nothing selects
on (`test/pairwise_accuracy` is the accuracy the gate and the dashboard show) → a
self-contained `reward` model version (LoRA merged, tokenizer, `reward_stats.json` with the
mean and std of its scores on a reference set).

`train_split: judge` trains the gate's judge instead: the same model, learned from the judge
split's pairs, which neither SFT, the PPO reward model nor PPO ever see.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    AutoModelForSequenceClassification,
    EarlyStoppingCallback,
    PreTrainedModel,
    TrainerCallback,
    set_seed,
)

from agent.config import Settings
from agent.errors import ConfigError, ValidationError
from agent.modeling import default_dtype, load_tokenizer, pick_device
from agent.registry import ModelRegistry
from agent.store.api import Store
from rl.datasets import PreferenceData, PreferenceOptions, build_preference_data
from rl.reward_model import RewardModel, check_pooling, set_pooling, tokenize_pairs
from rl.runs import Run, training_run
from rl.sft import (
    JobConfig,
    RunLogger,
    StartingPoint,
    check_enough,
    last_checkpoint,
    lora_config,
    starting_point,
    training_args,
)

log = logging.getLogger(__name__)

INIT_FROM = ("policy", "base")


@dataclass
class Config(JobConfig):
    """`rlchat train reward`: which pairs to learn from and how to train the scorer."""

    init_from: str = "policy"
    """policy: the base with the policy's adapters (e.g. SFT) merged in; base: the bare base."""
    train_split: str = "train"
    """Stored split whose pairs are learned from: train (PPO's reward model) or judge (the
    gate's judge)."""
    use_comparisons: bool = True
    """Learn from explicit A/B comparisons."""
    use_ratings: bool = True
    """Learn from pairs derived from ratings of sibling replies."""
    ties: str = "drop"
    """Ties: drop, or equal (train both orders with no margin)."""
    both_bad: str = "drop"
    """Both-bad verdicts: drop, or equal."""
    normalize_raters: bool = True
    """Z-score each rater's scores before comparing siblings."""
    min_rating_gap: float = 0.5
    """Smallest difference of mean sibling scores that makes a pair."""
    max_rater_spread: float | None = None
    """Leave out of rating-derived pairs a reply whose ratings span more than this on [-1, 1]
    (its raters disagree; 1.0: a thumbs up beside a thumbs down, Likert 3+ points apart);
    None keeps every reply."""
    margin_scale: float = 1.0
    """Margin of a rating-derived pair = margin_scale * score difference."""
    comparison_margin: float = 0.0
    """Margin of an explicit comparison (times the net share of raters agreeing)."""
    center_rewards_coefficient: float = 0.01
    """Weight of the mean-zero penalty on rewards (0: off)."""
    early_stopping_patience: int = 3
    """Stop after this many evaluations without a better held-out accuracy (0: off)."""
    reference_size: int = 256
    """Replies scored after training for the mean/std used to normalise rewards."""
    min_pairs: int = 16
    """Fewest training pairs worth a run; fewer is an error that says how many there are."""
    learning_rate: float = 1e-4
    """Peak AdamW learning rate."""
    num_epochs: float = 1.0
    """Passes over the training pairs (ignored when max_steps > 0)."""
    max_length: int = 512
    """Longest tokenized (context + reply); longer pairs are dropped."""
    pooling: str = "last"
    """Where the score is read: last (the last token, Hugging Face's classifiers) or mean (the
    mean of the last hidden states over every token; rl.reward_model.set_pooling)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_from not in INIT_FROM:
            raise ConfigError(f"init_from: {self.init_from!r} is not one of {', '.join(INIT_FROM)}")
        check_pooling(self.pooling)
        try:
            self.data_options()  # train_split, ties, max_rater_spread...: fail now, not at read time
        except ValidationError as exc:
            raise ConfigError(str(exc)) from exc
        if self.reference_size < 2:
            raise ConfigError(f"reference_size: must be >= 2, got {self.reference_size}")

    def data_options(self) -> PreferenceOptions:
        return PreferenceOptions(
            use_comparisons=self.use_comparisons,
            use_ratings=self.use_ratings,
            ties=self.ties,
            both_bad=self.both_bad,
            normalize_raters=self.normalize_raters,
            min_rating_gap=self.min_rating_gap,
            max_rater_spread=self.max_rater_spread,
            margin_scale=self.margin_scale,
            comparison_margin=self.comparison_margin,
            train_split=self.train_split,
        )


def pairwise_metrics(diffs: torch.Tensor, bins: int = 10) -> dict[str, float]:
    """Accuracy, mean margin and expected calibration error of r_chosen - r_rejected, (N,).

    Calibration: the model's confidence in its pick, σ(|d|), against how often that pick is
    right, averaged over confidence bins (ECE; both orders of a pair are the same bin).
    """
    diffs = diffs.float()
    correct = (diffs > 0).float()
    confidence = torch.sigmoid(diffs.abs())
    which = ((confidence - 0.5) * 2 * bins).long().clamp(max=bins - 1)
    ece = torch.zeros(())
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            gap = (confidence[in_bin].mean() - correct[in_bin].mean()).abs()
            ece += gap * in_bin.float().mean()
    return {
        "pairwise_accuracy": correct.mean().item(),
        "mean_margin": diffs.mean().item(),
        "ece": ece.item(),
    }


def _trainer_class() -> type:
    from trl import RewardTrainer

    class PairwiseRewardTrainer(RewardTrainer):
        """TRL's RewardTrainer plus held-out accuracy / margin / calibration over all pairs."""

        _eval_diffs: list[torch.Tensor]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
            if not model.training:
                chosen, rejected = torch.chunk(outputs.logits.squeeze(-1).float(), chunks=2)
                self._eval_diffs.append((chosen - rejected).detach().cpu())
            return (loss, outputs) if return_outputs else loss

        def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):  # type: ignore[no-untyped-def]
            self._eval_diffs = []
            output = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
            if self._eval_diffs:
                metrics = pairwise_metrics(torch.cat(self._eval_diffs))
                output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in metrics.items()})
            return output

    return PairwiseRewardTrainer


def build_model(
    start: StartingPoint, config: Config, device: torch.device
) -> tuple[PreTrainedModel, Any]:
    """A one-label classifier on the base, with the policy's adapters merged in when asked."""
    from peft import PeftConfig, PeftModel
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    tokenizer = load_tokenizer(start.base)
    set_seed(config.seed)  # the new score head is random
    with suppress_seqcls_warning():
        model = AutoModelForSequenceClassification.from_pretrained(
            start.base, num_labels=1, dtype=default_dtype(device)
        )
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    if config.init_from == "policy":
        for adapter in start.adapters:
            log.info("merging policy adapter %s into the reward model", adapter)
            # A causal-LM adapter on the classifier's shared trunk: drop its task type, or
            # peft wraps the classifier as a generation model.
            adapter_config = PeftConfig.from_pretrained(adapter)
            adapter_config.task_type = None
            model = PeftModel.from_pretrained(model, adapter, config=adapter_config)
            model = model.merge_and_unload()
        model.requires_grad_(True)  # peft froze the trunk while merging; full training needs it
    return set_pooling(model, config.pooling).to(device), tokenizer


def main(
    config: Config,
    settings: Settings,
    resume: bool = False,
    *,
    callbacks: list[TrainerCallback] | None = None,
) -> int:
    """Train a reward model and register it as a candidate; returns the new model version id."""
    store = Store.open(settings)
    try:
        with training_run(store, settings, "reward", config, resume=resume) as run:
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
    from trl import RewardConfig

    data = build_preference_data(run.snapshot(config.sources), config.data_options())
    log.info("%s", data.summary.format())
    run.record_data({**data.data_ids(), "summary": data.summary.as_dict()})
    check_enough(
        data.train, data.heldout, config.min_pairs, "preference pairs", "train a reward model"
    )
    start = starting_point(store, settings, config)
    device = pick_device(config.device)
    model, tokenizer = build_model(start, config, device)
    stopping = config.early_stopping_patience > 0
    args = RewardConfig(
        **training_args(config, run, device),
        center_rewards_coefficient=config.center_rewards_coefficient or None,
        metric_for_best_model="eval_pairwise_accuracy",
        greater_is_better=True,
        load_best_model_at_end=stopping,
    )
    extra = [EarlyStoppingCallback(config.early_stopping_patience)] if stopping else []
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(tokenize_pairs(tokenizer, data.train)),
        eval_dataset=Dataset.from_list(tokenize_pairs(tokenizer, data.heldout)),
        processing_class=tokenizer,
        peft_config=lora_config(config, model, "SEQ_CLS") if config.lora else None,
        callbacks=[RunLogger(run), *extra, *callbacks],
    )
    result = trainer.train(resume_from_checkpoint=last_checkpoint(run, resume))
    merged = trainer.model.merge_and_unload() if config.lora else trainer.model
    scorer = RewardModel(merged.eval(), tokenizer, max_length=config.max_length)
    metrics = _final_metrics(scorer, data, config)
    metrics["perf/pairs_per_s"] = result.metrics.get("train_samples_per_second", 0.0)
    metrics["perf/train_s"] = result.metrics.get("train_runtime", 0.0)
    metrics["train/loss"] = result.training_loss
    log.info(
        "reward model: %s",
        ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
        ),
    )
    out_dir = scorer.save(run.dir / "reward_model", {"reference_size": metrics["reference/size"]})
    version_id = ModelRegistry(store, settings).add(
        "reward",
        out_dir,
        name=config.name or f"{'judge' if config.train_split == 'judge' else 'reward'}-run{run.id}",
        parent_id=start.version_id,
        metrics={**metrics, "run_id": run.id},
    )
    run.finish(output_version_id=version_id, metrics=metrics)
    return version_id


def _pair_metrics(scorer: RewardModel, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Accuracy, margin and calibration of `scorer` on preference rows (none when no rows)."""
    if not rows:
        return {}
    contexts = [r["prompt"] for r in rows]
    chosen = scorer.score(contexts, [r["chosen"][0]["content"] for r in rows], normalize=False)
    rejected = scorer.score(contexts, [r["rejected"][0]["content"] for r in rows], normalize=False)
    return pairwise_metrics(chosen - rejected)


def _final_metrics(scorer: RewardModel, data: PreferenceData, config: Config) -> dict[str, Any]:
    """Validation and test metrics of the final (merged) model, and its score statistics on a
    reference set. Only validation chose the checkpoint; the test split is reported."""
    rows = data.heldout
    metrics: dict[str, Any] = {f"eval/{k}": v for k, v in _pair_metrics(scorer, rows).items()}
    metrics.update({f"test/{k}": v for k, v in _pair_metrics(scorer, data.test).items()})
    metrics["test/pairs"] = len(data.test)
    metrics["data/train_split"] = config.train_split
    metrics["eval/pairs"] = len(rows)
    metrics["train/pairs"] = len(data.train)
    reference = {
        (str(r["prompt"]), reply[0]["content"]): (r["prompt"], reply[0]["content"])
        for r in data.train + data.heldout
        for reply in (r["chosen"], r["rejected"])
    }
    sample = list(reference.values())
    random.Random(config.seed).shuffle(sample)
    sample = sample[: config.reference_size]
    scores = scorer.score([c for c, _ in sample], [r for _, r in sample], normalize=False)
    scorer.mean, scorer.std = scores.mean().item(), max(scores.std().item(), 1e-6)
    metrics.update(
        {"reference/mean": scorer.mean, "reference/std": scorer.std, "reference/size": len(sample)}
    )
    return metrics
