"""`rlchat starter build|ensure`: the offline starter model (see `agent.starter`)."""

from __future__ import annotations

import argparse

from rlchat.commands import open_store


def add_parser(sub: argparse._SubParsersAction) -> None:
    from agent.starter import SIZES

    p = sub.add_parser(
        "starter", help="build the offline starter model from chitchat conversations"
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    build = actions.add_parser("build", help="train, save and register a starter base model")
    build.add_argument("--size", default="small", choices=list(SIZES),
                       help="tiny (tests), small (CPU default, <= 10 min on 2 cores), medium/large (GPU)")  # fmt: skip
    build.add_argument("--max-conversations", type=int, help="use only the first N conversations")
    build.add_argument("--steps", type=int, help="optimiser steps (default: the size's)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    build.add_argument("--force", action="store_true",
                       help="build even when a starter of this size is registered already")  # fmt: skip
    ensure = actions.add_parser("ensure", help="build the starter only when no base model exists")
    ensure.add_argument("--size", default="small", choices=list(SIZES))
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from agent.starter import StarterConfig, build_starter, ensure_starter

    settings, store = open_store(args)
    if args.action == "ensure":
        version_id = ensure_starter(settings, store, size=args.size)
        print(f"base model version {version_id}: {store.get_model_version(version_id).path}")
        return 0
    config = StarterConfig(
        size=args.size,
        max_conversations=args.max_conversations,
        steps=args.steps,
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
    for prompt, reply in result.samples:
        print(f"  user: {prompt}\n  bot:  {reply}")
    return 0
