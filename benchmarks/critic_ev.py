"""How much of the return variance can a critic explain on PPO's learning test, and ours?

    .venv/bin/python benchmarks/critic_ev.py                 # 40 iterations, one thread
    .venv/bin/python benchmarks/critic_ev.py --set critic_learning_rate=1e-3 --set lam=1.0
    .venv/bin/python benchmarks/critic_ev.py --seeds 0 1 2 3 4 5   # a summary line per seed

Runs the learning test of tests/rl/test_ppo.py (the tiny random Llama with peaked embeddings,
reward = the share of "e" in a 16-token reply, 256 replies per iteration) and, beside the
critic's explained variance (EV, of the values computed at rollout against the GAE returns),
prints what a least-squares fit of the same returns on hand-made prefix features reaches: the
e's and characters decoded so far, their ratio and the position. Two such fits: in-sample (on
the batch itself: optimistic) and out-of-sample (fitted on the previous batch, scored on this
one: what a critic that knew the right feature would show). The reward is unknown until the
reply is sampled, so early positions cannot be predicted: the fits say where the ceiling is.
A third column asks what the model's own features offer a critic: a ridge regression of the
returns on the frozen model's last hidden states at the same positions, fitted on the previous
four batches and scored on this one (a value head that did not have to learn its features).
Not a test: a measurement for the notes of issue #11.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.modeling import Policy  # noqa: E402
from rl.env import DialogueVectorEnv, Prompt  # noqa: E402
from rl.ppo import PPOConfig, PPOTrainer  # noqa: E402
from rl.ppo import trainer as trainer_module  # noqa: E402

PROMPTS = [
    Prompt([{"role": "user", "content": f"hello there, friend number {i}"}]) for i in range(12)
]
LEARNING_TEST = {  # tests/rl/test_ppo.py::test_mean_reward_rises_while_kl_stays_bounded
    "batch_size": 256,
    "mini_batch_size": 64,
    "max_new_tokens": 16,
    "learning_rate": 1e-3,
    "critic_learning_rate": 3e-3,
    "kl_coef": 0.05,
    "normalize_scores": True,
}


def share_of_e(context: list[dict[str, str]], reply: str) -> float:
    return reply.count("e") / max(1, len(reply))


def peaked_model(work: Path) -> Path:
    """The test's model: the tiny random Llama with its embeddings scaled 6x."""
    from agent.tiny import build_peaked_model, build_tiny_model

    out = work / "peaked"
    if not (out / "config.json").exists():
        build_peaked_model(build_tiny_model(work / "tiny"), out)
    return out


def prefix_features(tokenizer, responses: torch.Tensor, mask: np.ndarray) -> np.ndarray:
    """(n_masked, 5): [1, e's so far, characters so far, their ratio, position] per reply token."""
    rows = []
    for ids, keep in zip(responses.tolist(), mask, strict=True):
        e = chars = 0
        for t, token in enumerate(ids):
            if not keep[t]:
                break
            rows.append([1.0, e, chars, e / (chars + 1), t])
            piece = tokenizer.decode([token], skip_special_tokens=True)
            e, chars = e + piece.count("e"), chars + len(piece)
    return np.asarray(rows)


@torch.no_grad()
def frozen_hidden(trainer, batch, mask: np.ndarray) -> np.ndarray:
    """(n_masked, H + 1): the reference's last hidden state before each reply token, and 1."""
    from rl.ppo.modules import decoder_states

    decoder = trainer.model.get_base_model().get_decoder()
    with trainer.reference():
        hidden = decoder_states(decoder, batch.sequences, batch.attention_mask)
    x = hidden[:, -batch.responses.shape[1] - 1 : -1].numpy()[mask]
    return np.concatenate([x, np.ones((len(x), 1))], axis=1)


def ridge(xs: list[np.ndarray], ys: list[np.ndarray], alpha: float = 1.0) -> np.ndarray:
    x, y = np.concatenate(xs), np.concatenate(ys)
    return np.linalg.solve(x.T @ x + alpha * np.eye(x.shape[1]), x.T @ y)


def explained(y: np.ndarray, prediction: np.ndarray) -> float:
    return float(1 - np.var(y - prediction) / max(np.var(y), 1e-12))


def parse_value(text: str) -> object:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def run(fields: dict[str, object], work: Path, iterations: int, verbose: bool) -> np.ndarray:
    """One learning-test run: (iterations, 5) rows of reward, critic EV, the in-sample and
    out-of-sample prefix fits and the frozen probe; each iteration printed when `verbose`."""
    trainer = PPOTrainer(PPOConfig(**fields), Policy(peaked_model(work), device="cpu"))
    seen: dict[str, object] = {}
    measure = trainer_module.explained_variance

    def keep_returns(values, returns, mask):  # what the trainer's EV is computed on
        seen["returns"], seen["mask"] = returns, mask
        return measure(values, returns, mask)

    trainer_module.explained_variance = keep_returns
    update = trainer.update

    def keep_batch(batch, rewards):
        seen["batch"] = batch
        return update(batch, rewards)

    trainer.update = keep_batch  # type: ignore[method-assign]
    envs = DialogueVectorEnv(trainer.config.num_contexts, PROMPTS, share_of_e)
    envs.reset(seed=0)
    rows, previous, probe_data = [], None, []
    if verbose:
        print(f"{'iter':>4} {'reward':>7} {'critic EV':>10} {'fit in-sample':>14} "
              f"{'fit out-of-sample':>18} {'frozen probe':>13}")  # fmt: skip
    try:
        for it in range(iterations):
            metrics = trainer.train_step(envs)
            mask = seen["mask"].numpy().astype(bool)
            x = prefix_features(trainer.tokenizer, seen["batch"].responses, mask)
            y = seen["returns"].numpy()[mask]
            coef = np.linalg.lstsq(x, y, rcond=None)[0]
            inside = explained(y, x @ coef)
            outside = explained(y, x @ previous) if previous is not None else float("nan")
            previous = coef
            h = frozen_hidden(trainer, seen["batch"], mask)
            probe = float("nan")
            if probe_data:
                recent = probe_data[-4:]
                probe = explained(y, h @ ridge([a for a, _ in recent], [b for _, b in recent]))
            probe_data.append((h, y))
            rows.append((metrics["reward/mean"], metrics["value/explained_variance"], inside,
                         outside, probe))  # fmt: skip
            if verbose:
                print(f"{it:>4} {rows[-1][0]:>7.3f} {rows[-1][1]:>+10.3f} {inside:>14.3f} "
                      f"{outside:>+18.3f} {probe:>+13.3f}", flush=True)  # fmt: skip
    finally:
        trainer_module.explained_variance = measure
    return np.asarray(rows)


def thirds(iterations: int) -> list[tuple[int, int]]:
    third = max(1, iterations // 3)
    return [(0, third), (third, 2 * third), (2 * third, iterations)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="PPOConfig seeds to run; with several, one summary line per seed")  # fmt: skip
    p.add_argument("--work", type=Path, help="where the tiny model is built (default: a temp dir)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a PPOConfig field over the learning test's")  # fmt: skip
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    fields = dict(LEARNING_TEST)
    for item in args.set:
        name, _, value = item.partition("=")
        fields[name] = parse_value(value)
    work = args.work or Path(tempfile.mkdtemp(prefix="critic-ev-"))
    spans = thirds(args.iterations)
    if len(args.seeds) == 1:
        table = run({**fields, "seed": args.seeds[0]}, work, args.iterations, verbose=True)
        print("\nmeans over thirds of the run")
        for lo, hi in spans:
            _, critic, inside, outside, probe = np.nanmean(table[lo:hi], axis=0)
            print(f"iterations {lo}-{hi - 1}: critic EV {critic:+.3f}, prefix fit in-sample "
                  f"{inside:.3f}, out-of-sample {outside:+.3f}, frozen probe {probe:+.3f}")  # fmt: skip
        return
    lo, hi = spans[0]
    late = f"{max(lo, hi - 4)}-{hi - 1}"
    print(
        f"critic EV by thirds, over iterations {late} (the first third's last four), and the "
        "out-of-sample prefix fit in the first third"
    )
    print(f"{'seed':>4} {'reward first5 -> last5':>23} {'EV thirds':>22} {'EV ' + late:>9} "
          f"{'fit 1st third':>14}")  # fmt: skip
    for seed in args.seeds:
        table = run({**fields, "seed": seed}, work, args.iterations, verbose=False)
        ev = [np.nanmean(table[a:b, 1]) for a, b in spans]
        print(f"{seed:>4} {table[:5, 0].mean():>11.3f} -> {table[-5:, 0].mean():<8.3f} "
              f"{' / '.join(f'{e:+.2f}' for e in ev):>22} {table[max(lo, hi - 4):hi, 1].mean():>+9.3f} "
              f"{np.nanmean(table[lo:hi, 3]):>+14.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
