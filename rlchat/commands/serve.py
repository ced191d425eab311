"""`rlchat serve [--host] [--port] [--auth] [--model DIR]`: the chat and feedback web app."""

from __future__ import annotations

import argparse
import logging

from rlchat.commands import open_store

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start the web app: chat, annotate, dashboard")
    p.add_argument("--host", default="127.0.0.1", help="interface (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="TCP port (default: 7860)")
    p.add_argument(
        "--auth", action="store_true", help="require logins and enforce roles (`rlchat users add`)"
    )
    p.add_argument(
        "--concurrency", type=int, default=2, help="replies generated at once (default: 2)"
    )
    p.add_argument("--device", default=None, help="cuda, cpu or auto (default: auto)")
    p.add_argument(
        "--model",
        default=None,
        help="a HF model dir or hub id to register and deploy when nothing is deployed yet",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from agent.chat import ChatAgent
    from agent.errors import ValidationError
    from agent.registry import ModelRegistry
    from feedback_ui.app import ServeConfig, build_app, launch

    if args.concurrency < 1:
        raise ValidationError(f"--concurrency: must be >= 1, got {args.concurrency}")
    settings, store = open_store(args)
    registry = ModelRegistry(store, settings)
    if args.model and registry.deployed() is None:
        version_id = registry.add("base", args.model, name="served base")
        registry.deploy(version_id)
        log.info("registered and deployed %s as model version %d", args.model, version_id)
    if registry.deployed() is None:
        log.warning(
            "no model is deployed: chatting will fail until one is "
            "(`rlchat starter build`, `rlchat models deploy ID`, or `serve --model DIR`)"
        )
    agent = ChatAgent(store, settings, device=args.device)
    config = ServeConfig(
        host=args.host, port=args.port, auth=args.auth, concurrency=args.concurrency
    )
    app = build_app(store, agent, settings, config.auth, concurrency=config.concurrency)
    if config.auth and not any(u.password_hash for u in store.list_users()):
        log.warning("--auth is on but no user has a password: add one with `rlchat users add`")
    launch(app, store, config)
    return 0
