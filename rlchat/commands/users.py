"""`rlchat users add|list|set-role|passwd`: the people who may log in to `rlchat serve --auth`.

Passwords are read from a prompt (or one line of stdin with --password-stdin), never from
the command line, and stored as salted scrypt hashes.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from agent.errors import ValidationError
from agent.store.models import ROLES
from feedback_ui.auth import hash_password
from rlchat.commands import open_store


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("users", help="user accounts and roles for the web app")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="create a user with a password")
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, default="user", help="default: user")
    add.add_argument(
        "--password-stdin", action="store_true", help="read the password from one line of stdin"
    )
    actions.add_parser("list", help="every user with their role")
    role = actions.add_parser("set-role", help="change a user's role")
    role.add_argument("name")
    role.add_argument("role", choices=ROLES)
    pw = actions.add_parser("passwd", help="set a new password")
    pw.add_argument("name")
    pw.add_argument("--password-stdin", action="store_true")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    _, store = open_store(args)
    try:
        if args.action == "add":
            hashed = hash_password(_read_password(args.password_stdin))
            user = store.create_user(args.name, role=args.role, password_hash=hashed)
            print(f"added user {user.name!r} (id {user.id}, role {user.role})")
        elif args.action == "list":
            for user in store.list_users():
                login = "password" if user.password_hash else "no password (cannot log in)"
                print(f"{user.id:>5}  {user.name:<24} {user.role:<10} {login}")
        elif args.action == "set-role":
            store.set_user(args.name, role=args.role)
            print(f"{args.name}: role is now {args.role}")
        elif args.action == "passwd":
            if store.get_user(args.name) is None:
                store.set_user(args.name)  # raises NotFoundError naming the user
            store.set_user(
                args.name, password_hash=hash_password(_read_password(args.password_stdin))
            )
            print(f"{args.name}: password changed")
    finally:
        store.close()
    return 0


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Repeat password: "):
        raise ValidationError("password: the two entries differ; try again")
    return first
