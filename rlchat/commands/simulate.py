"""`rlchat simulate [--job-config FILE] [--set key=value ...]`: fill the DB with simulated feedback."""

from __future__ import annotations

import argparse

from agent.chat import ChatAgent
from rl import simulate
from rlchat.commands import add_job_config_args, job_config, open_store


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="scripted users and annotators following a hidden oracle")
    add_job_config_args(p, "rl.simulate.Config")
    p.add_argument("--oracle", help="follow_up, positive, concise or module:function")
    p.add_argument("--users", type=int, help="number of simulated users (conversations)")
    p.add_argument("--noise", type=float, help="share of judgements flipped")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = job_config(args, simulate.Config, ("oracle", "users", "noise"))
    settings, store = open_store(args)
    agent = ChatAgent(store, settings, device=args.device)
    summary = simulate.simulate(config, store, agent, settings)
    print(", ".join(f"{k}: {v}" for k, v in summary.items()))
    return 0
