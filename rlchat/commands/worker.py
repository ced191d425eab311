"""`rlchat worker [--once] [--poll S]`: run the jobs queued from the dashboard, one at a time."""

from __future__ import annotations

import argparse

from agent.config import build_dataclass
from rl import worker
from rlchat.commands import settings_from


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run queued jobs (train, pipeline, eval, simulate)")
    p.add_argument("--once", action="store_true", help="run the next queued job, if any, and exit")
    p.add_argument("--poll", type=float, help="seconds between looks at an empty queue (5)")
    p.add_argument(
        "--lease", type=float, help="seconds without a heartbeat before a job is requeued (60)"
    )
    p.add_argument("--name", help="this worker's name in the jobs table (default host:pid)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    values = {"poll_s": args.poll, "lease_s": args.lease, "name": args.name}
    config = build_dataclass(
        worker.WorkerConfig, {k: v for k, v in values.items() if v is not None}
    )
    done = worker.serve(settings_from(args), config, once=args.once)
    print(f"jobs run: {done}")
    return 0
