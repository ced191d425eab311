"""Sampling inherits nothing from the model's generation config; log-probs match the forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import CohereConfig, CohereForCausalLM

from agent.modeling import encode_chat, end_of_turn_ids, load_base
from agent.sampling import Sampling, generation_config, sample, token_logprobs

PROMPTS = [
    [{"role": "user", "content": "hi how are you"}],
    [{"role": "user", "content": "what do you like to do on weekends?"}],
]


def _batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [encode_chat(tokenizer, p) for p in PROMPTS]
    width = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _samples(model, tokenizer, seed: int = 0) -> torch.Tensor:
    ids, mask = _batch(tokenizer)
    config = generation_config(
        Sampling(max_new_tokens=12), end_of_turn_ids(tokenizer), tokenizer.pad_token_id
    )
    torch.manual_seed(seed)
    return sample(model, ids, mask, config)


def test_model_generation_config_does_not_leak(tiny_model_dir: Path) -> None:
    model, tokenizer = load_base(tiny_model_dir, device="cpu")
    plain = _samples(model, tokenizer)
    # What Qwen, Llama and SmolLM2 folders ship in generation_config.json.
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.min_new_tokens = 12
    model.generation_config.top_k = 1
    model.generation_config.min_p = 0.5  # no neutral global default: only blanking stops it
    model.generation_config.sequence_bias = {(5,): 20.0}
    assert torch.equal(_samples(model, tokenizer), plain)
    assert model.generation_config.repetition_penalty == 50.0  # restored afterwards


def test_sampling_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=1.5)


def test_token_logprobs_use_the_models_own_logit_processing() -> None:
    # Cohere scales its logits inside forward (logit_scale): a decoder + lm_head shortcut misses it.
    torch.manual_seed(0)
    config = CohereConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, logit_scale=0.25, pad_token_id=0,
    )  # fmt: skip
    model = CohereForCausalLM(config).eval()
    seq = torch.randint(1, 64, (3, 10))
    mask = torch.ones_like(seq)
    got = token_logprobs(model, seq, mask, n_reply=4, temperature=0.7, batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=seq, attention_mask=mask).logits[:, -5:-1]
    want = torch.log_softmax(logits / 0.7, -1).gather(-1, seq[:, -4:, None])[..., 0]
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
