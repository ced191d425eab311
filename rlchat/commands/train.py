"""`rlchat train sft|reward|ppo [--job-config FILE] [--set key=value ...] [--resume]`."""

from __future__ import annotations

import argparse
import importlib

from rlchat.commands import add_job_config_args, job_config, settings_from

# Each job module has a `Config` dataclass and `main(config, settings, resume=False) -> int`.
JOBS = {"sft": "rl.sft", "reward": "rl.reward", "ppo": "rl.ppo"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from the feedback in the database")
    p.add_argument("kind", choices=sorted(JOBS), help="which stage to train")
    add_job_config_args(p, "the job's config (rl.sft / rl.reward / rl.ppo Config)")
    p.add_argument(
        "--sources",
        help="conversation sources to train on, e.g. chat,arena or simulated (required when the "
        "database holds both real and simulated feedback; recorded on the run)",
    )
    p.add_argument("--resume", action="store_true", help="continue the newest unfinished run")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(JOBS[args.kind])
    config = job_config(args, module.Config, ("sources",))
    module.main(config, settings_from(args), resume=args.resume)
    return 0
