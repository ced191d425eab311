"""`rlchat eval [--candidate ID] [--baseline ID] [--judge ID] [--oracle NAME] [--set key=value ...]`.

Prints the judge's win-rate with its 95% interval, the length-controlled win-rate, the true
KL, each guard with its value and bound, and the verdict (`rl.gate.format_table`).
"""

from __future__ import annotations

import argparse
import json

from rl import evaluate
from rl.gate import format_table
from rlchat.commands import add_job_config_args, job_config, open_store


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="judge a candidate policy against the deployed one, with the gate's guards"
    )
    add_job_config_args(p, "rl.evaluate.Config")
    p.add_argument(
        "--candidate", type=int, help="policy version to evaluate (default: newest candidate)"
    )
    p.add_argument(
        "--baseline", type=int, help="policy version to compare with (default: deployed)"
    )
    p.add_argument(
        "--judge",
        dest="judge_version",
        type=int,
        help="reward version that judges (default: the newest one trained on the judge split)",
    )
    p.add_argument("--oracle", help="also report this oracle's score and win-rate")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = job_config(args, evaluate.Config, ("candidate", "baseline", "judge_version", "oracle"))
    settings, store = open_store(args)
    _, metrics = evaluate.run_recorded(config, store, settings)
    print(json.dumps(metrics, indent=2) if args.json else format_table(metrics))
    return 0
