"""PPO optimises exactly what it samples: sampling, log-probs, dropout, scores, memory options."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from agent.modeling import Policy
from rl.ppo import PPOConfig, PPOTrainer

CONTEXTS = [[{"role": "user", "content": f"hello there, friend number {i}"}] for i in range(4)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/rl/conftest.py


def make_trainer(model_dir: Path, adapters: list[str] | None = None, **overrides) -> PPOTrainer:
    values = dict(
        batch_size=4,
        mini_batch_size=2,
        ppo_epochs=1,
        max_new_tokens=8,
        learning_rate=1e-2,
        critic_warmup=0,
    )
    policy = Policy(model_dir, device="cpu")
    policy.set_adapters(adapters or [])
    return PPOTrainer(PPOConfig(**{**values, **overrides}), policy)


def save_with_tokenizer(model: torch.nn.Module, tiny_model_dir: Path, out: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


# ---- 1. sampling inherits nothing from the model's generation_config.json -------------------


def test_rollouts_ignore_the_models_generation_config(tiny_model_dir: Path, tmp_path: Path) -> None:
    shipped = tmp_path / "shipped"
    shutil.copytree(tiny_model_dir, shipped)
    config = json.loads((shipped / "generation_config.json").read_text())
    config.update(repetition_penalty=5.0, no_repeat_ngram_size=1, min_new_tokens=8)
    (shipped / "generation_config.json").write_text(json.dumps(config))
    plain = make_trainer(tiny_model_dir).rollout(CONTEXTS)
    with_file = make_trainer(shipped).rollout(CONTEXTS)
    assert torch.equal(plain.sequences, with_file.sequences)
    assert torch.allclose(plain.logprobs, with_file.logprobs)


# ---- 2. log-probs come from the model's own forward (soft-capping, logit scaling) -------------


def tiny_causal_lm(kind: str, vocab_size: int, pad_id: int, eos_id: int) -> torch.nn.Module:
    """A tiny random model of `kind` whose logit post-processing changes the distribution."""
    from transformers import (
        AutoModelForCausalLM,
        CohereConfig,
        Gemma2Config,
        GraniteConfig,
        LlamaConfig,
    )

    shape = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
    )
    configs = {
        "llama": lambda: LlamaConfig(**shape),
        "cohere": lambda: CohereConfig(**shape, logit_scale=0.25),
        "granite": lambda: GraniteConfig(**shape, logits_scaling=8.0),
        "gemma2": lambda: Gemma2Config(
            **shape, head_dim=16, final_logit_softcapping=0.5, sliding_window=64
        ),
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs[kind]())
    with torch.no_grad():  # peaked logits, so that the processing matters
        model.get_output_embeddings().weight.normal_(std=1.0)
    return model


@pytest.mark.parametrize("kind", ["llama", "cohere", "granite", "gemma2"])
def test_rollout_logprobs_equal_the_models_own_forward(
    kind: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = tiny_causal_lm(kind, len(tok), tok.pad_token_id, tok.eos_token_id)
    trainer = make_trainer(save_with_tokenizer(model, tiny_model_dir, tmp_path / kind))
    contexts = [[{"role": "user", "content": "hi"}], CONTEXTS[1]]  # different lengths: padding
    batch = trainer.rollout(contexts)
    lm = trainer.model.get_base_model()
    n_prompt = batch.sequences.shape[1] - batch.responses.shape[1]
    for i in range(2):
        prompt = batch.sequences[i, :n_prompt][batch.attention_mask[i, :n_prompt].bool()]
        n = int(batch.mask[i].sum())
        ids = torch.cat([prompt, batch.responses[i, :n]]).unsqueeze(0)
        with torch.no_grad(), trainer.reference():
            logits = lm(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits.float(), -1).gather(-1, batch.responses[i, :n, None])
        assert torch.allclose(batch.logprobs[i, :n], expected[:, 0], atol=1e-4), kind


# ---- 3. dropout is off in every module for the whole run --------------------------------------


def test_first_minibatch_ratio_is_one_with_dropout_everywhere(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = GPT2Config(
        vocab_size=len(tok), n_positions=256, n_embd=64, n_layer=2, n_head=4,
        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    model_dir = save_with_tokenizer(GPT2LMHeadModel(config), tiny_model_dir, tmp_path / "gpt2")
    sft = LoraConfig(r=4, lora_dropout=0.1, target_modules=["c_attn"], init_lora_weights=False)
    get_peft_model(GPT2LMHeadModel(config), sft).save_pretrained(tmp_path / "sft")
    trainer = make_trainer(model_dir, [str(tmp_path / "sft")], learning_rate=1e-12)
    batch = trainer.rollout(CONTEXTS)
    metrics = trainer.update(batch, torch.tensor([1.0, 0.0, 0.5, 0.2]))
    assert metrics["policy/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["policy/clipfrac"] == 0.0
    assert metrics["policy/approx_kl"] < 1e-10


# ---- 5. logits only at reply positions, entropy measured once on a few rows ------------------


def test_update_projects_reply_positions_and_measures_entropy_once(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rl.ppo.trainer as trainer_module

    widths, entropy_calls = [], []
    real_logprobs, real_entropy = trainer_module.logprobs_of, trainer_module.entropy_of

    def logprobs_of(logits, tokens, temperature):  # noqa: ANN001, ANN202
        widths.append((logits.shape[1], tokens.shape[1]))
        return real_logprobs(logits, tokens, temperature)

    def entropy_of(logits, temperature):  # noqa: ANN001, ANN202
        entropy_calls.append((logits.shape[0], torch.is_grad_enabled()))
        return real_entropy(logits, temperature)

    monkeypatch.setattr(trainer_module, "logprobs_of", logprobs_of)
    monkeypatch.setattr(trainer_module, "entropy_of", entropy_of)
    trainer = make_trainer(tiny_model_dir, ppo_epochs=2, entropy_rows=1)
    batch = trainer.rollout(CONTEXTS)
    metrics = trainer.update(batch, torch.tensor([1.0, 0.0, 0.5, 0.2]))
    assert widths and all(w == (batch.responses.shape[1],) * 2 for w in widths)
    assert entropy_calls == [(1, False)] and metrics["policy/entropy"] > 0


@pytest.mark.parametrize("critic_layers", [0, 1])
@pytest.mark.parametrize(
    "option", [{"gradient_accumulation_steps": 2}, {"gradient_checkpointing": True}]
)
def test_memory_options_give_the_same_update(
    tiny_model_dir: Path, option: dict, critic_layers: int
) -> None:
    plain = make_trainer(tiny_model_dir, critic_layers=critic_layers)
    other = make_trainer(tiny_model_dir, critic_layers=critic_layers, **option)
    batch = plain.rollout(CONTEXTS)
    batch.mask[:] = 1  # equal token counts per micro-batch, so the means agree exactly
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.2])
    for trainer in (plain, other):
        torch.manual_seed(5)
        trainer.update(batch, rewards)
    for (name, a), (_, b) in zip(
        plain.module.named_parameters(), other.module.named_parameters(), strict=True
    ):  # equal up to the summation order's rounding, which Adam's first step scales up where a
        # gradient is ~0 (1.6e-6 seen): 1e-5 is a thousandth of one step at lr 1e-2
        assert torch.allclose(a, b, atol=1e-5), name
    fresh = make_trainer(tiny_model_dir, critic_layers=critic_layers)
    assert plain.weights_digest() != fresh.weights_digest()


# ---- 6. scores are normalised once (by the reward model), not again by running moments --------


def test_the_same_reward_gives_the_same_score_all_run(tiny_model_dir: Path) -> None:
    trainer = make_trainer(tiny_model_dir)
    ended = torch.ones(4, dtype=torch.bool)
    rewards = torch.tensor([0.5, -0.5, 1.0, 0.0])
    first = trainer._scores(rewards, ended)
    trainer._scores(torch.tensor([10.0, 20.0, 30.0, 40.0]), ended)  # a batch on another scale
    assert torch.equal(trainer._scores(rewards, ended), first)
    assert torch.equal(first, rewards)
