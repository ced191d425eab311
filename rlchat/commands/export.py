"""`rlchat export preferences|conversations --out FILE`: JSONL in TRL's formats."""

from __future__ import annotations

import argparse

from agent.store import export
from rlchat.commands import open_store


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write feedback as JSONL (TRL conversational formats)")
    p.add_argument("what", choices=["preferences", "conversations"])
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    _, store = open_store(args)
    records = (
        export.iter_preferences(store)
        if args.what == "preferences"
        else export.iter_conversations(store)
    )
    n = export.write_jsonl(records, args.out)
    print(f"wrote {n:,} {args.what} to {args.out}")
    return 0
