"""`rlchat db upgrade|downgrade|stats|current`.

`downgrade` destroys data, so it takes an explicit revision (`base` undoes every migration)
and, when the database holds any rows, `--yes` after saying how many rows are at stake.
"""

from __future__ import annotations

import argparse

from sqlalchemy import Engine, func, inspect, select, table

from agent.errors import ValidationError
from agent.store import db
from rlchat.commands import open_store, settings_from


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("db", help="database schema and statistics")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = actions.add_parser("upgrade", help="apply migrations (default: to the newest)")
    up.add_argument("revision", nargs="?", default="head")
    down = actions.add_parser(
        "downgrade", help="undo migrations down to REVISION (destroys data; `base` drops all)"
    )
    down.add_argument("revision", nargs="?", help="e.g. 0001, or base for an empty database")
    down.add_argument(
        "--yes", action="store_true", help="go ahead although the database holds rows"
    )
    actions.add_parser("current", help="print the schema revision")
    actions.add_parser("stats", help="row counts per table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "stats":
        _, store = open_store(args)
        counts = store.counts()
        width = max(map(len, counts))
        for table_name, n in sorted(counts.items()):
            print(f"{table_name:<{width}}  {n:>10,}")
        return 0
    settings = settings_from(args)
    engine = db.make_engine(settings.database_url, settings.sqlite_busy_timeout_ms)
    db.check_connection(engine)
    if args.action == "upgrade":
        db.upgrade(engine, args.revision)
    elif args.action == "downgrade":
        _check_downgrade(engine, args.revision, args.yes)
        db.downgrade(engine, args.revision)
    print(f"schema revision: {db.current_revision(engine) or 'base (empty)'}")
    return 0


def _check_downgrade(engine: Engine, revision: str | None, yes: bool) -> None:
    """Refuse a downgrade without a revision, or over rows without `--yes` (naming the count)."""
    current = db.current_revision(engine) or "base"
    if revision is None:
        raise ValidationError(
            f"db downgrade: give the revision to go down to (the schema is at {current}); "
            "`rlchat db downgrade base` drops every table and all its rows"
        )
    counts = row_counts(engine)
    total = sum(counts.values())
    if total == 0 or yes:
        return
    detail = ", ".join(f"{name} {n:,}" for name, n in sorted(counts.items()) if n)
    scope = "every table" if revision == "base" else "the tables and columns it removes"
    raise ValidationError(
        f"db downgrade {revision}: the database holds {total:,} rows ({detail}); going from "
        f"{current} to {revision} deletes {scope}, so up to {total:,} rows will go. "
        "Back it up (`rlchat export`), then run again with --yes"
    )


def row_counts(engine: Engine) -> dict[str, int]:
    """Rows per table of the database as it is (any schema revision; alembic's own left out)."""
    names = [n for n in inspect(engine).get_table_names() if n != "alembic_version"]
    with engine.connect() as conn:
        return {n: int(conn.scalar(select(func.count()).select_from(table(n))) or 0) for n in names}
