"""`rlchat train sft|reward|ppo [--config FILE] [--set key=value ...] [--resume]`."""

from __future__ import annotations

import argparse
import importlib

from agent.config import load_dataclass
from rlchat.commands import settings_from

# Each job module has a `Config` dataclass and `main(config, settings, resume=False) -> int`.
JOBS = {"sft": "rl.sft", "reward": "rl.reward", "ppo": "rl.ppo_train"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from the feedback in the database")
    p.add_argument("kind", choices=sorted(JOBS), help="which stage to train")
    p.add_argument("--job-config", "-c", dest="job_config", help="YAML file with the job's config")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field (repeatable), e.g. --set learning_rate=1e-4",
    )
    p.add_argument("--resume", action="store_true", help="continue the newest unfinished run")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(JOBS[args.kind])
    config = load_dataclass(module.Config, args.job_config, args.overrides)
    module.main(config, settings_from(args), resume=args.resume)
    return 0
