"""PPO: the maths against hand-computed values, the trainer on a tiny model, and learning."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from agent.errors import ConfigError
from agent.modeling import Policy
from agent.tiny import build_peaked_model
from rl.env import DialogueVectorEnv, Prompt
from rl.ppo import PPOConfig, PPOTrainer
from rl.ppo.maths import (
    KLController,
    PPODivergedError,
    RunningMoments,
    affine_fit,
    affine_stats,
    explained_variance,
    gae,
    kl_estimate,
    masked_mean,
    masked_whiten,
    policy_loss,
    rloo_advantages,
    token_rewards,
    value_loss,
)
from rl.ppo.modules import reply_mask

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/rl/conftest.py


PROMPTS = [
    Prompt([{"role": "user", "content": f"hello there, friend number {i}"}]) for i in range(12)
]
CONTEXTS = [p.messages for p in PROMPTS]


# ---- maths ---------------------------------------------------------------------------------


def test_gae_matches_hand_computation() -> None:
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 9.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [1.0, 2.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # second reply is 2 tokens long
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    # row 0: deltas d2 = 2 - 1.5, d1 = 0 + .9*1.5 - 1, d0 = 1 + .9*1 - .5
    d2, d1, d0 = 0.5, 0.35, 1.4
    a2, a1 = d2, d1 + 0.72 * d2
    a0 = d0 + 0.72 * a1
    # row 1 ends after token 1: d1 = 1 - 2 (no bootstrap), d0 = .5 + .9*2 - 1
    b1 = -1.0
    b0 = 1.3 + 0.72 * b1
    expected = torch.tensor([[a0, a1, a2], [b0, b1, 0.0]])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.allclose(ret, expected + values * mask, atol=1e-6)


def test_gamma_one_lambda_one_gives_reward_to_go_minus_value() -> None:
    rewards = torch.tensor([[0.0, -0.1, 1.0]])
    values = torch.tensor([[0.2, 0.3, 0.4]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    assert torch.allclose(ret, torch.tensor([[0.9, 0.9, 1.0]]), atol=1e-6)
    assert torch.allclose(adv, ret - values, atol=1e-6)


def test_masked_whiten_ignores_padding() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # masked values 1, 2, 3, 4: mean 2.5, unbiased variance 5/3
    expected = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / math.sqrt(5 / 3)
    out = masked_whiten(x, mask)
    assert torch.allclose(out[mask.bool()], expected, atol=1e-4)
    assert torch.all(out[~mask.bool()] == 0)
    kept = masked_whiten(x, mask, shift_mean=False)
    assert torch.allclose(kept[mask.bool()], expected + 2.5, atol=1e-4)


def test_kl_estimators_on_known_distributions() -> None:
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    true_kl = float((p * (p / q).log()).sum())  # KL(p || q) = 0.275
    gen = torch.Generator().manual_seed(0)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    logp, logq = p.log()[samples], q.log()[samples]
    k1, k3 = kl_estimate(logp, logq, "k1"), kl_estimate(logp, logq, "k3")
    assert k1.mean().item() == pytest.approx(true_kl, abs=0.01)
    assert k3.mean().item() == pytest.approx(true_kl, abs=0.01)
    assert (k3 >= 0).all() and (k1 < 0).any()
    assert k3.var() < k1.var()
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_estimate(logp, logq, "k2")


def test_token_rewards_put_the_score_on_the_last_reply_token() -> None:
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    r = token_rewards(torch.tensor([1.0, -2.0]), kl, mask, kl_coef=0.5)
    expected = torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.2, -0.25 - 2.0, 0.0]])
    assert torch.allclose(r, expected)


def test_rloo_baseline_leaves_each_reply_out() -> None:
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0, 2.0])  # two contexts, k = 3
    kl = torch.tensor([[0.5, 0.5]] * 6)
    mask = torch.tensor([[1.0, 1.0]] * 5 + [[1.0, 0.0]])
    advantages, returns = rloo_advantages(scores, kl, mask, kl_coef=0.2, k=3)
    # returns: score - 0.2 * summed KL (0.2 for full replies, 0.1 for the last)
    expected_returns = torch.tensor([0.8, 1.8, 5.8, -0.2, 3.8, 1.9])
    assert torch.allclose(returns, expected_returns)
    # baseline of reply 0 = mean of replies 1 and 2 = 3.8; of reply 3 = (3.8 + 1.9) / 2
    assert advantages[0].item() == pytest.approx(0.8 - 3.8)
    assert advantages[3].item() == pytest.approx(-0.2 - 2.85)
    assert advantages.view(2, 3).sum(1).abs().max() < 1e-5  # centred per context


def test_affine_fit_recovers_scale_and_offset_over_the_mask() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert affine_fit(affine_stats(x, 3 * x - 2, mask)) == pytest.approx((3.0, -2.0))
    constant = affine_fit(affine_stats(torch.ones_like(x), x, mask))
    assert constant == pytest.approx((0.0, 3.0))  # no slope to fit: the mean


def test_policy_loss_clips_the_ratio() -> None:
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, -1.0]])
    loss, stats = policy_loss(new, old, adv, torch.ones(1, 2), cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert stats["clipfrac"].item() == pytest.approx(1.0)
    loss, stats = policy_loss(old, old, adv, torch.ones(1, 2), cliprange=0.2)
    assert loss.item() == pytest.approx(0.0) and stats["clipfrac"].item() == 0
    assert stats["approx_kl"].item() == 0


def test_value_loss_clips_the_update() -> None:
    values, old, returns = torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]])
    loss, clipfrac = value_loss(values, old, returns, torch.ones(1, 1), cliprange_value=0.5)
    # unclipped (2 - 1)^2 = 1, clipped (0.5 - 1)^2 = .25: the max, halved
    assert loss.item() == pytest.approx(0.5) and clipfrac.item() == 0.0


def test_adaptive_kl_controller_moves_towards_target() -> None:
    ctl = KLController(0.1, target=6.0, horizon=100)
    ctl.update(current_kl=12.0, n_steps=10)
    assert ctl.value == pytest.approx(0.1 * 1.02)
    ctl.update(current_kl=1.0, n_steps=10)
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.98)
    fixed = KLController(0.1)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1


def test_running_moments_match_the_whole_sample() -> None:
    data = torch.randn(100, generator=torch.Generator().manual_seed(1)) * 3 + 2
    moments = RunningMoments()
    for chunk in data.split(7):
        moments.update(chunk)
    assert moments.mean == pytest.approx(data.mean().item(), abs=1e-6)
    assert moments.std == pytest.approx(data.std(unbiased=False).item(), abs=1e-6)


def test_reply_mask_stops_after_the_first_end_token() -> None:
    responses = torch.tensor([[5, 6, 1, 0, 0], [5, 1, 7, 1, 0], [5, 6, 7, 8, 9]])
    mask, ended = reply_mask(responses, end_ids=[1])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert ended.tolist() == [True, True, False]
    assert masked_mean(torch.ones(3, 5), mask).item() == 1.0


# ---- the trainer on a tiny model -------------------------------------------------------------


def small_config(**overrides) -> PPOConfig:
    values = dict(
        batch_size=4,
        mini_batch_size=2,
        ppo_epochs=1,
        max_new_tokens=8,
        learning_rate=1e-2,
        critic_warmup=0,
    )
    return PPOConfig(**{**values, **overrides})


def make_trainer(model_dir: Path, adapters: list[str] | None = None, **overrides) -> PPOTrainer:
    policy = Policy(model_dir, device="cpu")
    policy.set_adapters(adapters or [])
    return PPOTrainer(small_config(**overrides), policy)


def trainable(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.module.named_parameters() if p.requires_grad}


def frozen(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone() for n, p in trainer.module.named_parameters() if not p.requires_grad
    }


def test_rollout_logprobs_match_an_unpadded_forward(tiny_model_dir: Path) -> None:
    trainer = make_trainer(tiny_model_dir)
    contexts = [
        [{"role": "user", "content": "hi"}],
        [{"role": "user", "content": "a much longer hello, friend"}],
    ]
    batch = trainer.rollout(contexts)
    lm = trainer.model.get_base_model()
    for i in range(2):
        n_prompt = batch.sequences.shape[1] - batch.responses.shape[1]
        prompt = batch.sequences[i, :n_prompt][batch.attention_mask[i, :n_prompt].bool()]
        n = int(batch.mask[i].sum())
        ids = torch.cat([prompt, batch.responses[i, :n]]).unsqueeze(0)
        with torch.no_grad():
            logits = lm(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits.float(), -1).gather(-1, batch.responses[i, :n, None])[
            :, 0
        ]
        assert torch.allclose(batch.logprobs[i, :n], expected, atol=1e-4)
        # A fresh critic adapter is the identity too: the values are the head on the base's
        # last hidden state before each reply token.
        with torch.no_grad():
            hidden = lm(input_ids=ids, output_hidden_states=True).hidden_states[-1]
            values = trainer.value_head(hidden[:, len(prompt) - 1 : -1])[0]
        assert torch.allclose(batch.values[i, :n], values, atol=1e-5) and values.abs().max() > 0
    # A fresh PPO adapter is the identity (LoRA B = 0).
    assert torch.allclose(batch.logprobs, batch.ref_logprobs)
    assert len(batch.replies) == 2 and all(isinstance(r, str) for r in batch.replies)


def test_update_trains_only_the_ppo_adapter_and_value_head(tiny_model_dir: Path) -> None:
    trainer = make_trainer(tiny_model_dir)
    before, base = trainable(trainer), frozen(trainer)
    envs = DialogueVectorEnv(4, PROMPTS, lambda c, r: float(len(r) % 3))
    envs.reset(seed=0)
    metrics = trainer.train_step(envs)
    after = trainable(trainer)
    assert any(not torch.equal(before[n], after[n]) for n in before if ".ppo." in n)
    assert any(not torch.equal(before[n], after[n]) for n in before if "value_head" in n)
    assert all(torch.equal(base[n], p) for n, p in frozen(trainer).items())
    for key in ("reward/mean", "kl/mean", "policy/entropy", "policy/clipfrac", "policy/approx_kl",
                "loss/value", "value/explained_variance", "reply/length", "perf/tokens_per_s"):  # fmt: skip
        assert key in metrics
    assert math.isfinite(metrics["loss/policy"]) and metrics["perf/tokens_per_s"] > 0


def make_sft_adapter(model_dir: Path, out: Path) -> Path:
    """A LoRA adapter with random (non-zero) weights, standing in for a trained SFT adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(out)
    return out


def test_a_value_head_copied_from_the_reward_model_is_calibrated_on_the_first_batch(
    tiny_model_dir: Path,
) -> None:
    # A head far off in scale and offset (as the reward model's is on the critic's hidden
    # states): its values miss the returns by ~30, so the first update's advantages are noise.
    policy = Policy(tiny_model_dir, device="cpu")
    hidden = policy.model.config.hidden_size
    head = (
        torch.randn(1, hidden, generator=torch.Generator().manual_seed(0)) * 5,
        torch.tensor([30.0]),
    )
    trainer = PPOTrainer(small_config(critic_learning_rate=1e-12), policy, value_init=head)
    batch = trainer.rollout(CONTEXTS[:4])
    rewards = torch.tensor([1.0, -1.0, 0.5, 0.0])
    first = trainer.update(batch, rewards)

    weight = trainer.value_head.summary.weight.detach()
    cosine = torch.nn.functional.cosine_similarity(weight.flatten(), head[0].flatten(), dim=0)
    assert abs(float(cosine)) == pytest.approx(1.0, abs=1e-4)  # the direction is kept
    assert float(weight.norm()) < 0.5 * float(head[0].norm())  # the scale is not
    # On the same batch, the calibrated head explains the rewards-to-go at least as well as
    # their mean does (least squares); before, it was far worse.
    values = trainer._values(batch.sequences, batch.attention_mask, batch.responses.shape[1])
    kl = kl_estimate(batch.logprobs, batch.ref_logprobs, trainer.config.kl_estimator)
    scores = trainer._scores(rewards, batch.ended)
    token_r = token_rewards(scores, kl, batch.mask, trainer.kl_ctl.value)
    to_go = gae(token_r, torch.zeros_like(token_r), batch.mask, 1.0, 1.0)[1]
    assert explained_variance(values, to_go, batch.mask) > -1e-3
    assert explained_variance(batch.values, to_go, batch.mask) < -10
    # The metric reports the values as predicted, before the calibration.
    assert first["value/explained_variance"] < -10
    # Only once: a later batch (or a resumed run) keeps the head as it is.
    before = weight.clone()
    trainer.update(trainer.rollout(CONTEXTS[:4]), rewards)
    assert torch.allclose(trainer.value_head.summary.weight, before, atol=1e-6)


def test_ptx_pulls_the_policy_towards_human_replies(peaked_model_dir: Path) -> None:
    from rl.ppo.job import Config, human_rows

    tokenizer = Policy(peaked_model_dir, device="cpu").tokenizer
    rows = human_rows(tokenizer, Config(max_prompt_tokens=48, ptx_conversations=8))
    assert rows and all(len(ids) == len(mask) and any(mask) for ids, mask in rows)
    losses = {}
    for coef in (0.0, 1.0):
        config = small_config(ptx_coef=coef, ptx_batch_size=8, learning_rate=3e-2, ppo_epochs=4)
        trainer = PPOTrainer(config, Policy(peaked_model_dir, device="cpu"), ptx_rows=rows)
        before = human_loss(trainer, rows)
        for _ in range(4):  # equal rewards: the policy loss has nothing to say, ptx does
            metrics = trainer.update(trainer.rollout(CONTEXTS[:4]), torch.zeros(4))
        assert ("loss/ptx" in metrics) == (coef > 0)
        losses[coef] = human_loss(trainer, rows)
    assert losses[1.0] < before - 0.1 and losses[1.0] < losses[0.0] - 0.1, (before, losses)


def human_loss(trainer: PPOTrainer, rows: list[tuple[list[int], list[int]]]) -> float:
    """Mean next-token loss of the rows' reply tokens under the policy (its adapter active)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in rows:
            x = torch.tensor([ids])
            logits = trainer.model(input_ids=x).logits[0, :-1]
            nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
            keep = torch.tensor(mask[1:], dtype=torch.bool)
            total, count = total + float(nll[keep].sum()), count + int(keep.sum())
    return total / count


def test_ptx_never_sees_the_gates_held_out_replies() -> None:
    from agent.heldout import held_out_conversations
    from rl.evaluate import human_replies
    from rl.ppo.job import ptx_conversations

    def texts(messages: list[dict[str, str]]) -> tuple[str, ...]:
        return tuple(m["content"] for m in messages if m["role"] != "system")

    held = [texts(c) for c in held_out_conversations(64)]
    contexts, replies = human_replies(64)  # what the guard scores: openings of those
    for conversation, context, reply in zip(held, contexts, replies, strict=True):
        assert conversation[: len(texts(context)) + 1] == (*texts(context), reply)
    ptx = {texts(c) for c in ptx_conversations(10_000)}
    assert len(ptx) > 3000 and not ptx & set(held)


def test_ptx_needs_human_replies(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="ptx_coef"):
        PPOTrainer(small_config(ptx_coef=0.5), Policy(tiny_model_dir, device="cpu"))
    with pytest.raises(ConfigError, match="ptx_coef"):
        small_config(ptx_coef=-1.0)


def test_reference_keeps_the_sft_adapter_on(tiny_model_dir: Path, tmp_path: Path) -> None:
    sft = make_sft_adapter(tiny_model_dir, tmp_path / "sft")
    trainer = make_trainer(tiny_model_dir, adapters=[str(sft)])
    sft_weights = {
        n: p.clone()
        for n, p in trainer.module.named_parameters()
        if "lora" in n and ".ppo." not in n and ".critic." not in n
    }
    assert sft_weights and not any(
        p.requires_grad for n, p in trainer.module.named_parameters() if n in sft_weights
    )
    batch = trainer.rollout(CONTEXTS[:4])
    assert torch.allclose(batch.logprobs, batch.ref_logprobs, atol=1e-5)  # ref = base + sft
    with torch.no_grad(), trainer.model.disable_adapter():  # the bare base differs
        bare = trainer._logprobs(batch.sequences, batch.attention_mask, batch.responses)
    assert not torch.allclose(bare, batch.ref_logprobs, atol=1e-3)
    trainer.update(batch, torch.tensor([1.0, 0.0, 0.0, 1.0]))
    after = trainer.rollout(CONTEXTS[:4])
    with trainer.reference(), torch.no_grad():
        ref_again = trainer._logprobs(batch.sequences, batch.attention_mask, batch.responses)
    assert torch.allclose(ref_again, batch.ref_logprobs, atol=1e-5)  # the reference did not move
    assert not torch.allclose(after.logprobs, after.ref_logprobs, atol=1e-5)  # the policy did
    for n, p in trainer.module.named_parameters():
        if n in sft_weights:
            assert torch.equal(p, sft_weights[n])


@pytest.mark.parametrize("with_sft", [False, True])
def test_a_critic_of_the_top_layers_gives_the_values_of_its_whole_forward(
    tiny_model_dir: Path, tmp_path: Path, with_sft: bool
) -> None:
    sft = [str(make_sft_adapter(tiny_model_dir, tmp_path / "sft"))] if with_sft else []
    trainer = make_trainer(tiny_model_dir, adapters=sft, critic_layers=1)  # the top one of two
    critic = [n for n, _ in trainer.module.named_parameters() if ".critic." in n]
    assert critic and all(".layers.1." in n for n in critic), critic
    envs = DialogueVectorEnv(4, PROMPTS, lambda c, r: float(len(r) % 3))
    envs.reset(seed=0)
    for _ in range(2):  # the head moves first (it starts at 0), then the critic's LoRA B
        trainer.train_step(envs)
    assert any(p.abs().sum() > 0 for n, p in trainer.module.named_parameters()
               if ".critic." in n and "lora_B" in n)  # fmt: skip
    batch = trainer.rollout(CONTEXTS[:4])
    assert batch.critic_inputs is not None
    n_reply = batch.responses.shape[1]
    trainer.module.critic_first_layer = 0  # the same adapters, every layer run
    with torch.no_grad():
        whole = trainer._values(batch.sequences, batch.attention_mask, n_reply)
    assert torch.allclose(batch.values * batch.mask, whole * batch.mask, atol=1e-5)
    assert not torch.allclose(whole, torch.zeros_like(whole))


@pytest.mark.parametrize("kind", ["granite", "gemma2", "gpt2"])
def test_a_critic_of_the_top_layers_is_refused_where_they_cannot_run_alone(
    tiny_model_dir: Path, tmp_path: Path, kind: str
) -> None:
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Gemma2Config,
        GPT2Config,
        GraniteConfig,
    )

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    shape = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    ids = {k: shape[k] for k in ("vocab_size", "pad_token_id", "eos_token_id")}
    config, why = {
        # Granite scales whatever enters its first layer, input embeddings included
        "granite": (GraniteConfig(**shape, embedding_multiplier=12.0), "differ by up to"),
        # Gemma-2 picks sliding or full attention by the layer's index in the decoder's loop
        "gemma2": (Gemma2Config(**shape, sliding_window=4), "different kinds"),
        # GPT-2 keeps its blocks under `h`
        "gpt2": (
            GPT2Config(n_embd=32, n_layer=2, n_head=2, bos_token_id=None, **ids),
            "another name",
        ),
    }[kind]
    out = tmp_path / kind
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    with pytest.raises(ConfigError, match=f"critic_layers: 1: .*{why}"):
        make_trainer(out, critic_layers=1)
    make_trainer(out)  # the whole-model critic is fine


def test_save_and_load_round_trip(tiny_model_dir: Path, tmp_path: Path) -> None:
    trainer = make_trainer(tiny_model_dir)
    envs = DialogueVectorEnv(4, PROMPTS, lambda c, r: float("e" in r))
    envs.reset(seed=0)
    trainer.train_step(envs)
    out = trainer.save(tmp_path / "ppo")
    assert (out / "adapter_config.json").is_file() and (out / "critic.safetensors").is_file()
    # The adapter directory serves as is: a fresh Policy with it gives the trained logits.
    served = Policy(tiny_model_dir, device="cpu")
    served.set_adapters([out])
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
        assert torch.allclose(served.model(input_ids=ids).logits, expected, atol=1e-5)
    fresh = make_trainer(tiny_model_dir, seed=7)
    assert fresh.weights_digest() != trainer.weights_digest()
    fresh.load(out)
    assert fresh.weights_digest() == trainer.weights_digest()
    assert torch.equal(fresh.value_head.summary.weight, trainer.value_head.summary.weight)


def test_a_nan_reward_stops_before_the_update(tiny_model_dir: Path) -> None:
    trainer = make_trainer(tiny_model_dir, normalize_scores=False, score_clip=0.0)
    before = trainable(trainer)
    batch = trainer.rollout(CONTEXTS[:4])
    with pytest.raises(PPODivergedError, match="not finite"):
        trainer.update(batch, torch.tensor([1.0, float("nan"), 0.0, 0.0]))
    assert all(torch.equal(before[n], p) for n, p in trainable(trainer).items())


def test_exploding_kl_stops_the_run(peaked_model_dir: Path) -> None:
    trainer = make_trainer(peaked_model_dir, max_kl=1.0)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if ".ppo." in name:
                param.normal_(std=2.0)
    batch = trainer.rollout(CONTEXTS[:4])
    with pytest.raises(PPODivergedError, match="max_kl"):
        trainer.update(batch, torch.zeros(4))


# ---- learning ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peaked_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its (tied) embeddings scaled up 6x (see `build_peaked_model`)."""
    return build_peaked_model(tiny_model_dir, tmp_path_factory.mktemp("peaked") / "model")


def share_of_e(context: list[dict[str, str]], reply: str) -> float:
    """A rule reward: the share of the reply's characters that are the letter e."""
    return reply.count("e") / max(1, len(reply))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("algorithm", "batch_size", "mini_batch_size"),
    # PPO's critic learns its features from the replies it sees: it needs a few thousand before
    # it explains half the return variance (3,300 by the end of the first third at 256 a batch;
    # at 64 a batch 3 of 6 seeds fell short there; benchmarks/RESULTS.md). RLOO has no critic.
    [("ppo", 256, 64), ("rloo", 64, 16)],
)
def test_mean_reward_rises_while_kl_stays_bounded(
    peaked_model_dir: Path, algorithm: str, batch_size: int, mini_batch_size: int
) -> None:
    config = PPOConfig(
        algorithm=algorithm,
        rloo_k=4,
        batch_size=batch_size,
        mini_batch_size=mini_batch_size,
        max_new_tokens=16,
        learning_rate=1e-3,
        critic_learning_rate=3e-3,  # the critic learns faster than the policy moves
        kl_coef=0.05,
        normalize_scores=True,  # a raw reward function: the only normalisation
    )
    trainer = PPOTrainer(config, Policy(peaked_model_dir, device="cpu"))
    envs = DialogueVectorEnv(config.num_contexts, PROMPTS, share_of_e)
    envs.reset(seed=0)
    history = [trainer.train_step(envs) for _ in range(40)]
    first = sum(m["reward/mean"] for m in history[:5]) / 5
    last = sum(m["reward/mean"] for m in history[-5:]) / 5
    assert last > first + 0.2, (first, last)
    assert max(m["kl/mean"] for m in history) < 40.0
    if algorithm == "ppo":  # the critic learns: the explained variance of the returns
        ev = [m["value/explained_variance"] for m in history]
        end_of_first_third, middle, late = ev[9:13], ev[13:26], ev[-10:]
        # Over seeds 0-9 (benchmarks/critic_ev.py --seeds 0 1 ... 9; RESULTS.md): iterations
        # 9-12 0.51-0.64 (seed 0: 0.61), the middle third 0.59-0.68; the old value probe with
        # these settings: -0.15 and 0.21 (seed 0).
        assert sum(end_of_first_third) / 4 >= 0.5, end_of_first_third
        assert sum(middle) / len(middle) >= 0.5, middle
        assert sum(late) / len(late) > 0.2, late
