"""Throughput, reward gain and critic quality: our PPO and RLOO vs TRL 1.9.0's PPOTrainer and
the current TRL's RLOOTrainer, like for like.

    .venv/bin/pip install --no-deps --target .bench/trl190 trl==1.9.0
    .venv/bin/python benchmarks/ppo_throughput.py --steps 30            # CPU: a small random model
    .venv/bin/python benchmarks/ppo_throughput.py --policy FOLDER --steps 8 --threads 2 --clock wall
                                                    # CPU: a real model (SmolLM2's converted folder)
    .venv/bin/python benchmarks/ppo_throughput.py --hidden 1152 --layers 24  # GPU: a larger shape

One invocation prepares one policy (a random model of --hidden/--layers/--vocab, or --policy),
one reward model (a sequence classifier on the policy's weights with a random score head, the
same for all) and one prompt set, then runs the trainers in turn, each in its own
subprocess (TRL 1.9.0 and the current TRL cannot share an interpreter; 1.9.0 is put first on
sys.path for its run). All use LoRA on the policy, 16 replies per iteration, minibatches of 8,
2 epochs (one optimiser step per minibatch: 4 per iteration), a constant learning rate, the
same reply length, sampling (temperature 1, full distribution) and KL coefficient. Both PPOs
train a critic from the first iteration (TRL: a full value model initialised from the reward
model; ours: a second LoRA adapter + value head initialised from the reward head, with our
critic warm-up switched off so the policy steps as often as TRL's); `ours_top` is our PPO
with a critic of the top --critic-layers layers only (`critic_layers`: below them the critic
is the reference's frozen trunk, computed anyway). Reported per trainer:
generated tokens per second of generation ("rollout") and of everything else ("update"),
overall tokens/s, reward gained per minute (mean reward-model score of the last quarter of
iterations minus the first quarter, over the run's time), the critic's explained variance
(mean over the second half of the iterations, of the values predicted at rollout time) and
the first iteration's mean new/old probability ratio (it should be ~1). Time is process CPU
time on CPU by default (`--clock wall` when nothing else runs) and wall time on GPU. Not a
test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRL_190 = ROOT / ".bench" / "trl190"
TRAINERS = ("ours", "ours_top", "ours_rloo", "trl190_ppo", "trl_rloo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="iterations (batches of 16 replies)")
    p.add_argument(
        "--policy", type=Path,
        help="a Hugging Face model folder to train (e.g. the converted SmolLM2-135M-Instruct) "
        "instead of a random model of --hidden/--layers/--vocab",
    )  # fmt: skip
    p.add_argument("--hidden", type=int, default=256, help="model width")
    p.add_argument("--layers", type=int, default=4, help="model depth")
    p.add_argument("--vocab", type=int, default=1024, help="tokenizer vocabulary")
    p.add_argument("--reply-tokens", type=int, default=24, help="max new tokens per reply")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate (LoRA)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    p.add_argument(
        "--critic-layers", type=int, default=4,
        help="ours_top: our PPO with a critic of the top this many layers (ppo.critic_layers)",
    )  # fmt: skip
    p.add_argument(
        "--work", type=Path,
        help="scratch dir (default: .bench/ppo_work/<the policy's path or shape>)",
    )  # fmt: skip
    p.add_argument(
        "--clock", choices=("auto", "cpu", "wall"), default="auto",
        help="time with process CPU time or wall time (auto: cpu without CUDA, else wall)",
    )  # fmt: skip
    p.add_argument("--only", choices=TRAINERS, action="append", help="run only these")
    p.add_argument("--child", choices=TRAINERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.work is None:  # prepared inputs are reused: one folder per policy
        key = (
            str(args.policy.resolve()).strip("/").replace("/", "_")  # the whole path: two
            if args.policy is not None  # data dirs' "models/2" are different models
            else f"h{args.hidden}-l{args.layers}-v{args.vocab}"
        )
        args.work = ROOT / ".bench" / "ppo_work" / key
    return args


# ---- shared inputs ---------------------------------------------------------------------------


def prepare(args: argparse.Namespace) -> None:
    """Policy dir, reward model dir and prompts under args.work (built once, reused)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from agent.tiny import build_peaked_model, build_tiny_model, chitchat_conversations

    work = args.work
    if (work / "prompts.json").is_file():
        return
    work.mkdir(parents=True, exist_ok=True)
    if args.policy is not None:
        policy = args.policy
    else:
        policy = build_tiny_model(
            work / "policy", hidden_size=args.hidden, num_layers=args.layers, vocab_size=args.vocab
        )
        # A random model's logits are nearly uniform and out of a LoRA adapter's reach; scaled
        # (tied) embeddings make it peaked, like a trained model.
        build_peaked_model(policy, policy, scale=4.0)
    torch.manual_seed(1)
    reward = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    reward.save_pretrained(work / "reward")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(policy).save_pretrained(work / "reward")
    (work / "reward" / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0}))
    prompts = [turns[0][:200] for turns in chitchat_conversations(limit=256)]
    (work / "prompts.json").write_text(json.dumps(prompts))


def policy_dir(args: argparse.Namespace) -> Path:
    return args.policy if args.policy is not None else args.work / "policy"


def result(
    name: str,
    tokens: float,
    gen_s: float,
    step_s: float,
    rewards: list[float],
    wall_s: float,
    device: str,
    evs: list[float],
    first_ratio: float | None,
) -> dict[str, Any]:
    """Summary of one run from its totals, its per-iteration mean rewards and (PPO) its
    critic's per-iteration explained variance."""
    q = max(1, len(rewards) // 4)
    late = [e for e in evs[len(evs) // 2 :] if e == e]  # second half, not NaN (empty: no critic)
    first, last = sum(rewards[:q]) / q, sum(rewards[-q:]) / q
    return {
        "trainer": name,
        "device": device,
        "iterations": len(rewards),
        "tokens": tokens,
        "rollout_tokens_per_s": tokens / gen_s,
        "update_tokens_per_s": tokens / max(step_s - gen_s, 1e-9),
        "tokens_per_s": tokens / step_s,
        "reward_first": first,
        "reward_last": last,
        "reward_gain_per_min": (last - first) / (wall_s / 60),
        "clock_s": wall_s,
        "clock": "cpu" if CLOCK["fn"] is time.process_time else "wall",
        "explained_variance": evs,
        "ev_second_half": sum(late) / len(late) if late else None,
        "first_ratio": first_ratio,
    }


# ---- the trainers (each runs in a child process) --------------------------------------------


def run_ours(
    args: argparse.Namespace, algorithm: str = "ppo", critic_layers: int = 0
) -> dict[str, Any]:
    from agent.modeling import Policy
    from rl.env import DialogueVectorEnv, Prompt
    from rl.ppo import PPOConfig, PPOTrainer
    from rl.ppo.job import reward_head
    from rl.reward_model import RewardModel

    work = args.work
    prompts = [
        Prompt([{"role": "user", "content": t}])
        for t in json.loads((work / "prompts.json").read_text())
    ]
    # critic_warmup 0: the policy steps from the first iteration, as TRL's does (ours would
    # otherwise hold it for two iterations while the critic warms up). rloo: 8 contexts x 2.
    config = PPOConfig(
        algorithm=algorithm, batch_size=16, rloo_k=2, mini_batch_size=8, ppo_epochs=2,
        max_new_tokens=args.reply_tokens, learning_rate=args.lr, kl_coef=0.05, critic_warmup=0,
        missing_eos_penalty=0.0, max_prompt_tokens=128, critic_layers=critic_layers,
    )  # fmt: skip
    policy = Policy(policy_dir(args))
    reward = RewardModel.load(work / "reward", device=policy.device)
    trainer = PPOTrainer(config, policy, value_init=reward_head(reward, policy))
    envs = DialogueVectorEnv(config.num_contexts, prompts, reward)
    envs.reset(seed=0)
    gen = {"s": 0.0}
    original = trainer._generate

    def timed_generate(contexts):  # noqa: ANN001, ANN202
        _sync()
        start = now()
        out = original(contexts)
        _sync()
        gen["s"] += now() - start
        return out

    trainer._generate = timed_generate  # type: ignore[method-assign]
    tokens, rewards, evs, ratio, wall = 0.0, [], [], None, now()
    for _ in range(args.steps):
        m = trainer.train_step(envs)
        tokens += m["reply/length"] * 16
        rewards.append(m["reward/mean"])
        if "value/explained_variance" in m:
            evs.append(m["value/explained_variance"])
        if ratio is None and "policy/ratio" in m:
            ratio = m["policy/ratio"]
    _sync()
    wall = now() - wall
    name = "ours_rloo" if algorithm == "rloo" else "ours_top" if critic_layers else "ours"
    return result(name, tokens, gen["s"], wall, rewards, wall, str(policy.device), evs, ratio)


def run_ours_rloo(args: argparse.Namespace) -> dict[str, Any]:
    return run_ours(args, algorithm="rloo")


def run_ours_top(args: argparse.Namespace) -> dict[str, Any]:
    return run_ours(args, critic_layers=args.critic_layers)


CLOCK = {"fn": time.perf_counter}


def now() -> float:
    """The benchmark clock: process CPU time on CPU runs (other jobs sharing the machine do not
    count), wall time on GPU runs (`--clock`)."""
    return CLOCK["fn"]()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepRecorder:
    """A transformers TrainerCallback (built lazily) that times steps and keeps logged rewards."""

    def __init__(self, reward_key: str) -> None:
        from transformers import TrainerCallback

        recorder = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
                recorder.step_start = now()

            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
                _sync()
                t = now()
                recorder.step_times.append(t - recorder.step_start)
                recorder.step_start = t

            def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN201
                if logs and reward_key in logs and logs[reward_key] == logs[reward_key]:  # not NaN
                    recorder.rewards.append(float(logs[reward_key]))
                if logs and "val/ratio" in logs:
                    recorder.ratios.append(float(logs["val/ratio"]))

        self.callback = Callback()
        self.step_start = 0.0
        self.step_times: list[float] = []
        self.rewards: list[float] = []
        self.gen_times: list[float] = []
        self.gen_tokens: list[int] = []
        self.ratios: list[float] = []
        self.evs: list[float] = []

    def timed(self, fn, count_tokens):  # noqa: ANN001, ANN201
        """`fn` wrapped to add its time and generated-token count to the current step."""

        def wrapper(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            _sync()
            start = now()
            out = fn(*a, **kw)
            _sync()
            self.gen_times.append(now() - start)
            self.gen_tokens.append(count_tokens(a, kw, out))
            return out

        return wrapper


def lora_config():  # noqa: ANN201
    from peft import LoraConfig

    return LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def run_trl190_ppo(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(TRL_190))
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification

    from agent.modeling import encode_chat, load_base

    if trl.__version__ != "1.9.0":
        raise RuntimeError(f"expected TRL 1.9.0 from {TRL_190}, got {trl.__version__}")
    from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer

    work = args.work
    model, tok = load_base(policy_dir(args))
    texts = json.loads((work / "prompts.json").read_text())
    dataset = Dataset.from_dict(
        {"input_ids": [encode_chat(tok, [{"role": "user", "content": t}])[-128:] for t in texts]}
    )
    dtype = model.dtype
    reward = AutoModelForSequenceClassification.from_pretrained(
        work / "reward", num_labels=1, dtype=dtype
    )
    value = AutoModelForSequenceClassification.from_pretrained(
        work / "reward", num_labels=1, dtype=dtype
    )
    for m in (reward, value):
        m.config.pad_token_id = tok.pad_token_id
    # TRL 1.9.0: batch = per_device_train_batch_size x gradient_accumulation_steps (16), split
    # into num_mini_batches (2) of 8, each cut into micro-batches of per_device_train_batch_size.
    # The earlier 8 x 2 gave one micro-batch per minibatch with accumulation over 2: half the
    # optimiser steps of ours, and half the stats slots left at 0 (its `val/ratio` read 0.5).
    # 16 x 1: one optimiser step per minibatch of 8, 2 minibatches x 2 epochs, as ours.
    config = PPOConfig(
        output_dir=str(work / "trl190_out"), per_device_train_batch_size=16, gradient_accumulation_steps=1,
        num_mini_batches=2, num_ppo_epochs=2, lr_scheduler_type="constant", total_episodes=16 * args.steps, response_length=args.reply_tokens,
        learning_rate=args.lr, kl_coef=0.05, temperature=1.0, missing_eos_penalty=None, stop_token="eos",
        local_rollout_forward_batch_size=16, num_sample_generations=0, report_to="none", logging_steps=1,
        save_strategy="no", use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(), seed=0,
    )  # fmt: skip
    recorder = StepRecorder("objective/scores")

    def count(a, kw, out):  # noqa: ANN001, ANN202
        query_responses = out[0]
        responses = query_responses[:, a[1].shape[1] :]
        return int((responses != tok.pad_token_id).sum())

    ppo_trainer.batch_generation = recorder.timed(ppo_trainer.batch_generation, count)
    ppo_trainer.masked_whiten = critic_ev_probe(ppo_trainer.masked_whiten, recorder)
    trainer = PPOTrainer(
        args=config, processing_class=tok, model=model, ref_model=None, reward_model=reward,
        train_dataset=dataset, value_model=value, peft_config=lora_config(), callbacks=[recorder.callback],
    )  # fmt: skip
    wall = now()
    trainer.train()
    wall = now() - wall
    return _from_recorder("trl190_ppo", recorder, wall, str(model.device))


def critic_ev_probe(masked_whiten, recorder: StepRecorder):  # noqa: ANN001, ANN201
    """TRL 1.9.0's `masked_whiten`, which also records its critic's explained variance.

    TRL logs no explained variance. Its train loop computes `returns = advantages + values`
    and then whitens the advantages over the reply tokens; at that call the caller's frame
    holds the rollout's values and returns, so the probe takes them from there and applies
    our own `explained_variance` on the same reply mask (values as predicted before the
    update, like ours). Benchmark instrumentation only."""
    from rl.ppo.maths import explained_variance

    def probe(values, mask, shift_mean=True):  # noqa: ANN001, ANN202
        caller = sys._getframe(1).f_locals
        if values is caller.get("advantages") and "returns" in caller:
            recorder.evs.append(
                explained_variance(caller["values"].float(), caller["returns"].float(), mask)
            )
        return masked_whiten(values, mask, shift_mean)

    return probe


def _from_recorder(name: str, rec: StepRecorder, wall: float, device: str) -> dict[str, Any]:
    """Totals over the whole run (step times cover the training loop, not the set-up)."""
    return result(
        name,
        sum(rec.gen_tokens),
        sum(rec.gen_times),
        sum(rec.step_times),
        rec.rewards,
        wall,
        device,
        rec.evs,
        rec.ratios[0] if rec.ratios else None,
    )


def run_trl_rloo(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RLOOConfig, RLOOTrainer

    from agent.modeling import load_base

    work = args.work
    model, tok = load_base(policy_dir(args))
    texts = json.loads((work / "prompts.json").read_text())
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in texts]})
    reward = AutoModelForSequenceClassification.from_pretrained(
        work / "reward", num_labels=1, dtype=model.dtype
    )
    reward.config.pad_token_id = tok.pad_token_id
    # 8 prompts x 2 completions = 16 replies per generation, used for 2 minibatches x 2 epochs.
    config = RLOOConfig(
        output_dir=str(work / "rloo_out"), per_device_train_batch_size=8, num_generations=2,
        steps_per_generation=2, num_iterations=2, max_steps=4 * args.steps, lr_scheduler_type="constant",
        max_completion_length=args.reply_tokens, learning_rate=args.lr, beta=0.05, temperature=1.0,
        top_p=1.0, report_to="none", logging_steps=1, save_strategy="no",
        use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(), seed=0,
    )  # fmt: skip
    recorder = StepRecorder("reward")
    RLOOTrainer._generate_single_turn = recorder.timed(
        RLOOTrainer._generate_single_turn, lambda a, kw, out: sum(len(c) for c in out)
    )
    trainer = RLOOTrainer(
        model=model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tok,
        reward_processing_classes=tok, peft_config=lora_config(), callbacks=[recorder.callback],
    )  # fmt: skip
    wall = now()
    trainer.train()
    wall = now() - wall
    out = _from_recorder(f"trl{trl.__version__}_rloo", recorder, wall, str(model.device))
    return out


# ---- the driver ------------------------------------------------------------------------------

RUNNERS = {
    "ours": run_ours,
    "ours_top": run_ours_top,
    "ours_rloo": run_ours_rloo,
    "trl190_ppo": run_trl190_ppo,
    "trl_rloo": run_trl_rloo,
}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cpu_clock = args.clock == "cpu" or (args.clock == "auto" and not torch.cuda.is_available())
    CLOCK["fn"] = time.process_time if cpu_clock else time.perf_counter
    out = RUNNERS[args.child](args)
    (args.work / f"result-{args.child}.json").write_text(json.dumps(out, indent=2))


def table(results: list[dict[str, Any]]) -> str:
    by_name = {r["trainer"]: r for r in results}
    ours, top = by_name.get("ours"), by_name.get("ours_top")
    lines = [
        "| trainer | device | clock | iters | rollout tok/s | update tok/s | overall tok/s | reward first→last | reward gain/min | critic EV (2nd half) | first ratio | ours' overall tok/s ÷ this | ours_top's ÷ this |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def speedup(mine: dict[str, Any] | None, r: dict[str, Any]) -> str:
        return f"{mine['tokens_per_s'] / r['tokens_per_s']:.2f}x" if mine and r is not mine else "—"

    for r in results:
        lines.append(
            f"| {r['trainer']} | {r['device']} | {r['clock']} | {r['iterations']} | {r['rollout_tokens_per_s']:.1f} | "
            f"{r['update_tokens_per_s']:.1f} | {r['tokens_per_s']:.2f} | "
            f"{r['reward_first']:.3f}→{r['reward_last']:.3f} | {r['reward_gain_per_min']:.3f} | "
            f"{_num(r.get('ev_second_half'))} | {_num(r.get('first_ratio'))} | {speedup(ours, r)} | "
            f"{speedup(top, r)} |"
        )
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.child:
        child(args)
        return 0
    prepare(args)
    results = []
    for name in args.only or TRAINERS:
        if name == "trl190_ppo" and not (TRL_190 / "trl").is_dir():
            print(
                f"skipping {name}: install it with pip install --no-deps --target {TRL_190} trl==1.9.0"
            )
            continue
        command = [
            sys.executable,
            __file__,
            "--child",
            name,
            *(argv if argv is not None else sys.argv[1:]),
        ]
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(args.threads),
            "TOKENIZERS_PARALLELISM": "false",
        }
        print(f"== {name}", flush=True)
        (args.work / f"result-{name}.json").unlink(missing_ok=True)
        done = subprocess.run(command, env=env, cwd=ROOT)
        path = args.work / f"result-{name}.json"
        if done.returncode != 0 or not path.is_file():
            print(f"{name} failed (exit {done.returncode})")
            continue
        results.append(json.loads(path.read_text()))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
