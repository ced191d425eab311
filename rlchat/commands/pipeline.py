"""`rlchat pipeline [--job-config FILE] [--set stage.key=value ...] [--resume | --generations N]`."""

from __future__ import annotations

import argparse

import yaml

from agent.config import build_dataclass, read_yaml
from agent.errors import ConfigError
from rl import flywheel, pipeline
from rl.gate import format_table
from rlchat.commands import add_job_config_args, open_store


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="SFT -> reward model -> PPO -> eval -> gate -> deploy")
    add_job_config_args(p, "rl.pipeline.Config (stage.key=value for a stage's field)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the newest unfinished pipeline (with --generations: flywheel)",
    )
    p.add_argument(
        "--generations",
        type=int,
        default=0,
        metavar="N",
        help="the flywheel: N rounds of simulate (the config's `simulate` section) against the "
        "deployed policy -> pipeline -> gate -> deploy",
    )
    p.set_defaults(run=run)


def parse_overrides(values: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like stage.key=value")
        key, raw = item.split("=", 1)
        stage, _, field = key.strip().partition(".")
        if field:
            values.setdefault(stage, {})[field] = yaml.safe_load(raw)
        else:
            values[stage] = yaml.safe_load(raw)
    return values


def run(args: argparse.Namespace) -> int:
    values = read_yaml(args.job_config) if args.job_config else {}
    config = build_dataclass(pipeline.Config, parse_overrides(values, args.overrides))
    settings, store = open_store(args)
    if args.generations:
        rounds = flywheel.run_flywheel(
            config, settings, store, args.generations, resume=args.resume
        )
        print(flywheel.summary_table(rounds))
        return 0
    result = pipeline.run_pipeline(config, settings, store, resume=args.resume)
    print(pipeline.summary_table(result))
    print(format_table(result["stages"]["eval"]))  # every guard with its value and bound
    return 0
