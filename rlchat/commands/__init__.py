"""One module per `rlchat` subcommand; see `rlchat.cli`."""

from __future__ import annotations

import argparse
from typing import TypeVar

from agent.config import Settings, load_dataclass, load_settings
from agent.store.api import Store

T = TypeVar("T")


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings from the global --config/--data-dir/--database-url flags and the environment."""
    return load_settings(args.config, data_dir=args.data_dir, database_url=args.database_url)


def open_store(args: argparse.Namespace) -> tuple[Settings, Store]:
    settings = settings_from(args)
    return settings, Store.open(settings)


def job_config(args: argparse.Namespace, cls: type[T], shortcuts: tuple[str, ...] = ()) -> T:
    """`cls` from --job-config and --set, with shortcut flags (e.g. --oracle) as overrides."""
    overrides = list(args.overrides)
    overrides += [
        f"{name}={getattr(args, name)}" for name in shortcuts if getattr(args, name) is not None
    ]
    return load_dataclass(cls, args.job_config, overrides)


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
