"""The `rlchat` command: one console script, one module per subcommand under `rlchat.commands`.

Each command module has `add_parser(subparsers)` and `run(args) -> int`; the logic lives in
`agent`, `rl` and `feedback_ui`. Errors rlchat raises on purpose, and the database and file
system errors a user can cause, print as one line with the cause and the fix, and exit 2
(`-v` adds the traceback to the log).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from agent.errors import RLChatError
from rlchat.errors import explain

# Subcommand name -> module under rlchat.commands. Imported lazily: `rlchat db stats`
# must not pay for importing torch.
COMMANDS = {
    "db": "db",
    "export": "export",
    "users": "users",
    "starter": "starter",
    "models": "models",
    "chat": "chat",
    "serve": "serve",
    "train": "train",
    "simulate": "simulate",
    "pipeline": "pipeline",
    "eval": "evaluate",
    "worker": "worker",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlchat", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML settings file (default: $RLCHAT_CONFIG)")
    parser.add_argument(
        "--data-dir", help="data directory (default: ./.rlchat or $RLCHAT_DATA_DIR)"
    )
    parser.add_argument("--database-url", help="SQLAlchemy URL (default: $RLCHAT_DATABASE_URL)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Only import the module of the command being run (and all of them for --help).
    wanted = [a for a in argv if a in COMMANDS][:1] or list(COMMANDS)
    for name in wanted:
        module = importlib.import_module(f"rlchat.commands.{COMMANDS[name]}")
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        return int(args.run(args) or 0)
    except RLChatError as exc:
        print(f"rlchat: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        message = explain(exc)
        if message is None:
            raise
        logging.getLogger("rlchat").debug("the error in full", exc_info=True)
        print(f"rlchat: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlchat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
