"""One module per `rlchat` subcommand; see `rlchat.cli`."""

from __future__ import annotations

import argparse

from agent.config import Settings, load_settings
from agent.store.api import Store


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the global --config/--data-dir/--database-url flags and the environment."""
    return load_settings(args.config, data_dir=args.data_dir, database_url=args.database_url)


def open_store(args: argparse.Namespace) -> tuple[Settings, Store]:
    settings = settings_from(args)
    return settings, Store.open(settings)


def add_job_config_args(p: argparse.ArgumentParser, what: str) -> None:
    """The `--job-config FILE` and repeatable `--set key=value` flags of every job command."""
    p.add_argument("--job-config", "-c", dest="job_config", help=f"YAML file of {what}")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override one field of {what} (repeatable), e.g. --set seed=1",
    )
