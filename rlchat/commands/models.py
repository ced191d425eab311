"""`rlchat models list|show ID|add KIND SRC|deploy ID|rollback`: the model registry."""

from __future__ import annotations

import argparse
import json

from agent.errors import ValidationError
from agent.registry import ModelRegistry
from agent.store.models import MODEL_KINDS, ModelVersion
from rlchat.commands import open_store

MAX_ID = 2**31 - 1


def version_id(text: str) -> int:
    """An argparse type: a model version id (a whole number the database can hold)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= MAX_ID:
        raise argparse.ArgumentTypeError(f"{value} is not a version id (1 to {MAX_ID:,})")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="model versions: list, show, add, deploy, roll back")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser("list", help="every model version, as a table")
    ls.add_argument("--kind", choices=MODEL_KINDS, help="only this kind")
    show = actions.add_parser("show", help="one version: fields, metrics, what it loads")
    show.add_argument("id", type=version_id)
    add = actions.add_parser("add", help="copy a model directory into the registry (a candidate)")
    add.add_argument("kind", choices=MODEL_KINDS)
    add.add_argument("src", help="model or adapter directory (a base may be a hub id)")
    add.add_argument("--parent", type=version_id, help="version the adapter was trained on")
    add.add_argument("--name", default="", help="a label shown in listings")
    deploy = actions.add_parser("deploy", help="serve this version from the next chat turn")
    deploy.add_argument("id", type=version_id)
    actions.add_parser("rollback", help="return to the previously deployed version")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings, store = open_store(args)
    registry = ModelRegistry(store, settings)
    if args.action == "list":
        print_table(registry.versions(args.kind))
    elif args.action == "show":
        print_version(registry, registry.get(args.id))
    elif args.action == "add":
        version_id = registry.add(args.kind, args.src, name=args.name, parent_id=args.parent)
        print(f"added {args.kind} model version {version_id} (candidate)")
    elif args.action == "deploy":
        mv = registry.deploy(args.id)
        print(f"deployed model version {mv.id} ({mv.kind} {mv.name})".rstrip())
    elif args.action == "rollback":
        mv = registry.rollback()
        print(f"rolled back: model version {mv.id} ({mv.kind} {mv.name}) is deployed".rstrip())
    return 0


def print_table(versions: list[ModelVersion]) -> None:
    if not versions:
        print("no model versions yet; `rlchat starter build` builds and deploys the starter model")
        return
    header = ("id", "kind", "status", "parent", "name", "created", "path")
    rows = [
        (
            str(v.id),
            v.kind,
            v.status,
            "" if v.parent_id is None else str(v.parent_id),
            v.name,
            v.created_at.strftime("%Y-%m-%d %H:%M"),
            v.path,
        )
        for v in versions
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def print_version(registry: ModelRegistry, mv: ModelVersion) -> None:
    fields = {
        "id": mv.id,
        "kind": mv.kind,
        "name": mv.name,
        "status": mv.status,
        "parent": mv.parent_id,
        "path": mv.path,
        "created": mv.created_at.isoformat(timespec="seconds"),
        "deployed": mv.deployed_at.isoformat(timespec="seconds") if mv.deployed_at else None,
    }
    for key, value in fields.items():
        print(f"{key:<9} {'' if value is None else value}")
    try:
        spec = registry.resolve(mv.id)
        print(f"{'loads':<9} base {spec.base}")
        for adapter in spec.adapters:
            print(f"{'':<9} + adapter {adapter}")
    except ValidationError as exc:  # reward models and broken chains are shown, not served
        print(f"{'loads':<9} (not a servable policy: {exc})")
    print(f"{'metrics':<9} {json.dumps(mv.metrics, indent=2, sort_keys=True, default=str)}")
