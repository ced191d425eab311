"""What do a candidate's replies say, and is its lost diversity the oracle's phrase or the rest?

    .venv/bin/python benchmarks/reply_samples.py --data-dir .rlchat-loop/feelings-ent \
        --oracle feelings --versions 2 5

Samples the gate's test prompts of the data directory (4 replies each) from each model
version given, as `rlchat eval` does — its prompts, sampler, batch size and seed
(`rl.evaluate.load_prompts`, `sample_replies`) with the loop's PPO sampling (temperature 0.7,
no top-k/top-p, 32 new tokens, as the pipeline hands the eval) — and prints per version:
distinct-2 over all replies (the gate's measure), the share of replies with a sentence the
hidden oracle rewards on its own (oracle score > 0), and distinct-2 once those sentences are
taken out — if a candidate's distinct-2 fell only because it now says the rewarded thing in
the same words, the rest keeps the starting policy's diversity. Meant for oracles that score
0 where the thing is absent (`feelings`, `follow_up`; `topic` where the user named one).
Then a few prompts with their replies. With the eval's samples per prompt (4 in
docs/loop-smollm2.yaml) the distinct-2 column is the gate's figure. A look for the notes of
issue #13, not a gate measurement.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.config import Settings  # noqa: E402
from agent.modeling import Policy  # noqa: E402
from agent.registry import ModelRegistry  # noqa: E402
from agent.store.api import Store  # noqa: E402
from rl.eval_stats import distinct_n  # noqa: E402
from rl.evaluate import Config, load_prompts, sample_replies  # noqa: E402
from rl.oracles import SENTENCE_BREAK, Chat, Oracle, load_oracle  # noqa: E402


def without_rewarded(context: Chat, reply: str, oracle: Oracle) -> tuple[str, bool]:
    """The reply less the sentences the oracle scores above 0 on their own, and whether any
    was taken out (sentences split where `feelings` splits them)."""
    sentences = SENTENCE_BREAK.split(reply.strip())
    kept = [s for s in sentences if oracle(context, s) <= 0]
    return " ".join(kept), len(kept) < len(sentences)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--oracle", required=True, help="a built-in oracle or module:function")
    p.add_argument("--versions", type=int, nargs="+", required=True, help="model version ids")
    p.add_argument("--samples", type=int, default=4, help="replies per prompt")
    p.add_argument("--show", type=int, default=8, help="prompts printed with their replies")
    args = p.parse_args(argv)

    settings = Settings(data_dir=args.data_dir)
    store = Store.open(settings)
    registry = ModelRegistry(store, settings)
    name, oracle = load_oracle(args.oracle)
    config = Config(max_new_tokens=32, temperature=0.7, samples_per_prompt=args.samples)
    prompts = load_prompts(config, store)
    policy: Policy | None = None
    print(f"{len(prompts)} test prompts x {args.samples} replies, oracle {name}")
    print("version  distinct-2  rewarded share  distinct-2 without rewarded sentences")
    contexts = [pr.messages for pr in prompts for _ in range(args.samples)]
    shown = []
    for version in args.versions:
        spec = registry.resolve(version)
        if policy is None or policy.base != spec.base:
            policy = Policy(spec.base, device="cpu")
        policy.set_adapters(spec.adapters)
        replies = sample_replies(
            policy, contexts, config.sampling(), config.batch_size, config.seed
        ).replies
        cut = [without_rewarded(c, r, oracle) for c, r in zip(contexts, replies, strict=True)]
        rest = [text for text, _ in cut]
        share = sum(removed for _, removed in cut) / len(replies)
        print(
            f"{version:>7}  {distinct_n(replies, 2):10.3f}  {share:14.2f}  "
            f"{distinct_n([s for s in rest if s], 2):10.3f}"
        )
        shown.append((version, replies))
    for i in range(min(args.show, len(prompts))):
        print(f"\n{prompts[i].messages[-1]['content']!r}")
        for version, replies in shown:
            print(f"  v{version}: {replies[i * args.samples]!r}")


if __name__ == "__main__":
    main()
