"""`rlchat db upgrade|downgrade|stats|current`."""

from __future__ import annotations

import argparse

from agent.store import db
from rlchat.commands import open_store, settings_from


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("db", help="database schema and statistics")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = actions.add_parser("upgrade", help="apply migrations (default: to the newest)")
    up.add_argument("revision", nargs="?", default="head")
    down = actions.add_parser("downgrade", help="undo migrations (default: all of them)")
    down.add_argument("revision", nargs="?", default="base")
    actions.add_parser("current", help="print the schema revision")
    actions.add_parser("stats", help="row counts per table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "stats":
        _, store = open_store(args)
        counts = store.counts()
        width = max(map(len, counts))
        for table, n in sorted(counts.items()):
            print(f"{table:<{width}}  {n:>10,}")
        return 0
    settings = settings_from(args)
    engine = db.make_engine(settings.database_url, settings.sqlite_busy_timeout_ms)
    db.check_connection(engine)
    if args.action == "upgrade":
        db.upgrade(engine, args.revision)
    elif args.action == "downgrade":
        db.downgrade(engine, args.revision)
    print(f"schema revision: {db.current_revision(engine) or 'base (empty)'}")
    return 0
