"""How well could a reward model separate a data directory's test pairs, and how well do they?

    .venv/bin/python benchmarks/reward_readout.py --data-dir .rlchat-loop/flywheel-rm3
    .venv/bin/python benchmarks/reward_readout.py --data-dir D --versions 5 4   # two reward models
    .venv/bin/python benchmarks/reward_readout.py --data-dir D --oracle feelings --versions 3 \
        --max-rater-spread 1.0 --no-probes        # pairs as reward.max_rater_spread builds them

On the preference pairs `rlchat train reward` builds from the data directory (its stored
splits, the default preference options, simulated feedback), one row each:

- the hidden oracle's agreement with the test labels, and the share of test pairs it ties on
  (pairs that label noise alone made: a flipped rating beside an unflipped one): the ceiling
  is agreement + ties / 2;
- a bag-of-words logistic regression (words seen at least twice in train) fitted on the train
  pairs: what a scorer that found the right words reaches;
- linear probes of a frozen model's last hidden states (the base version unless --probe-model
  says otherwise), fitted on train: at the last token (what a classifier reads by default,
  `pooling: last`), the mean over every token (what `pooling: mean` reads) and the mean over
  the reply's tokens alone;
- each reward model version given, scored on the same test pairs, and between the first two an
  exact two-sided McNemar test on the pairs one gets right and the other wrong.

Every fit has no test-set choice in it (each l2 is printed). Not a test: a measurement for the
notes of issue #13.
"""

from __future__ import annotations

import argparse
import datetime
import math
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.config import Settings  # noqa: E402
from agent.modeling import encode_chat, load_tokenizer  # noqa: E402
from agent.store.api import Store  # noqa: E402
from rl.datasets import PreferenceOptions, build_preference_data, load_snapshot  # noqa: E402
from rl.oracles import load_oracle  # noqa: E402
from rl.reward_model import RewardModel, encode_pair, pooling_of  # noqa: E402

WORD = re.compile(r"[a-z']+")
L2 = (0.1, 1.0)


def fit_logistic(diffs: np.ndarray, l2: float, steps: int = 2000, lr: float = 0.05) -> np.ndarray:
    """Weights w of P(chosen beats rejected) = sigmoid(w . (x_chosen - x_rejected)), features
    standardised, full-batch gradient descent on the L2-penalised log loss."""
    scale = diffs.std(0) + 1e-6
    x = diffs / scale
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-x @ w))
        w -= lr * (x.T @ (p - 1) / len(x) + l2 * w)
    return w / scale


def accuracy(diffs: np.ndarray, w: np.ndarray) -> float:
    return float(((diffs @ w) > 0).mean())


def bag_of_words(train: list[dict], test: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    counts = Counter(
        w for r in train for k in ("chosen", "rejected") for w in WORD.findall(reply(r, k).lower())
    )
    index = {w: i for i, w in enumerate(w for w, c in counts.items() if c >= 2)}

    def features(text: str) -> np.ndarray:
        v = np.zeros(len(index))
        for w in WORD.findall(text.lower()):
            if w in index:
                v[index[w]] += 1
        return v

    def diffs(rows: list[dict]) -> np.ndarray:
        return np.array(
            [features(reply(r, "chosen")) - features(reply(r, "rejected")) for r in rows]
        )

    return diffs(train), diffs(test)


def reply(row: dict, key: str) -> str:
    return row[key][-1]["content"]


@torch.no_grad()
def probe_features(model_dir: str, rows: list[dict]) -> dict[str, np.ndarray]:
    """(chosen - rejected) frozen last-hidden-state features per read-out, one row per pair."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    cache: dict[tuple[str, str], dict[str, np.ndarray]] = {}

    def features(context: list[dict[str, str]], text: str) -> dict[str, np.ndarray]:
        key = (repr(context), text)
        if key not in cache:
            prompt = encode_chat(tokenizer, context, add_generation_prompt=True)
            ids = encode_pair(tokenizer, context, text)  # as the reward model encodes it
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
            cache[key] = {  # (H,) each
                "last token": hidden[-1].numpy(),
                "mean, every token": hidden.mean(0).numpy(),
                "mean, reply tokens": hidden[len(prompt) :].mean(0).numpy(),
            }
        return cache[key]

    out: dict[str, list[np.ndarray]] = {}
    for r in rows:
        chosen, rejected = (
            features(r["prompt"], reply(r, "chosen")),
            features(r["prompt"], reply(r, "rejected")),
        )
        for name in chosen:
            out.setdefault(name, []).append(chosen[name] - rejected[name])
    return {name: np.array(v) for name, v in out.items()}


def mcnemar(right_a: list[bool], right_b: list[bool]) -> tuple[int, int, float]:
    only_a = sum(a and not b for a, b in zip(right_a, right_b, strict=True))
    only_b = sum(b and not a for a, b in zip(right_a, right_b, strict=True))
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return only_a, only_b, p


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--oracle", default="positive", help="the oracle the annotators followed")
    p.add_argument("--probe-model", type=int, default=1, help="model version id of a full model")
    p.add_argument("--versions", type=int, nargs="*", default=[], help="reward model version ids")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--max-rater-spread",
        type=float,
        default=None,
        help="build the pairs as `reward.max_rater_spread` does (default: every reply)",
    )
    p.add_argument("--no-probes", action="store_true", help="skip the frozen-model probes")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    store = Store.open(Settings(data_dir=args.data_dir))
    snap = load_snapshot(store, datetime.datetime(9999, 1, 1), sources=["simulated"])
    data = build_preference_data(snap, PreferenceOptions(max_rater_spread=args.max_rater_spread))
    train, test = data.train, data.test
    print(
        f"{args.data_dir}: {len(train)} train pairs, {len(test)} test pairs "
        f"(max_rater_spread {args.max_rater_spread})\n"
    )
    print("| scorer | fitted on | test accuracy |\n|---|---|---|")
    _, oracle = load_oracle(args.oracle)
    verdicts = [
        np.sign(oracle(r["prompt"], reply(r, "chosen")) - oracle(r["prompt"], reply(r, "rejected")))
        for r in test
    ]
    agree, ties = np.mean([v > 0 for v in verdicts]), np.mean([v == 0 for v in verdicts])
    print(f"| the oracle `{args.oracle}` (strictly prefers the label's choice) | - | {agree:.3f} |")
    print(
        f"| the oracle ties on {ties:.3f} of the pairs: the most a scorer can expect is "
        f"agree + ties / 2 | - | {agree + ties / 2:.3f} |"
    )
    words_train, words_test = bag_of_words(train, test)
    for l2 in L2:
        w = fit_logistic(words_train, l2)
        print(
            f"| bag of words ({words_train.shape[1]} words), l2 {l2} | train | {accuracy(words_test, w):.3f} |"
        )
    probe_dir = store.get_model_version(args.probe_model).path
    probes = not args.no_probes
    probe_train = probe_features(probe_dir, train) if probes else {}
    probe_test = probe_features(probe_dir, test) if probes else {}
    for name in probe_train:
        for l2 in L2:
            w = fit_logistic(probe_train[name], l2)
            print(
                f"| frozen version {args.probe_model}, {name}, l2 {l2} | train | {accuracy(probe_test[name], w):.3f} |"
            )
    right: dict[int, list[bool]] = {}
    for version in args.versions:
        rm = RewardModel.load(store.get_model_version(version).path, device="cpu")
        contexts = [r["prompt"] for r in test]
        diffs = rm.score(contexts, [reply(r, "chosen") for r in test], normalize=False) - rm.score(
            contexts, [reply(r, "rejected") for r in test], normalize=False
        )
        right[version] = (diffs > 0).tolist()
        pooling = pooling_of(rm.model)
        print(
            f"| reward model version {version} (pooling {pooling}) | its train split | {np.mean(right[version]):.3f} |"
        )
    if len(args.versions) >= 2:
        a, b = args.versions[:2]
        only_a, only_b, pvalue = mcnemar(right[a], right[b])
        print(
            f"\nonly version {a} right: {only_a} pairs; only version {b} right: {only_b}; exact McNemar p = {pvalue:.4f}"
        )
    store.close()


if __name__ == "__main__":
    main()
