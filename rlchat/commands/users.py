"""`rlchat users add|list|set-role|passwd|disable|enable|delete`: who may log in to the web app.

Passwords are read from a prompt (or one line of stdin with --password-stdin), never from
the command line, and stored as salted scrypt hashes. Changing a password or a role, or
disabling a user, ends the sessions they have open in `rlchat serve --auth`.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from agent.errors import ValidationError
from agent.store import users
from agent.store.api import Store
from agent.store.models import ROLES
from agent.store.users import check_user_name
from feedback_ui.auth import hash_password
from rlchat.commands import open_store


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("users", help="user accounts and roles for the web app")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="create a user with a password")
    add.add_argument("name", help="printable, no spaces; unique ignoring case and Unicode form")
    add.add_argument("--role", choices=ROLES, default="user", help="default: user")
    add.add_argument(
        "--password-stdin", action="store_true", help="read the password from one line of stdin"
    )
    actions.add_parser("list", help="every user with their role")
    role = actions.add_parser("set-role", help="change a user's role (ends their sessions)")
    role.add_argument("name")
    role.add_argument("role", choices=ROLES)
    pw = actions.add_parser("passwd", help="set a new password (ends their sessions)")
    pw.add_argument("name")
    pw.add_argument("--password-stdin", action="store_true")
    for action, what in (
        ("disable", "block logins and end sessions; data stays"),
        ("enable", "allow logins again"),
    ):
        actions.add_parser(action, help=what).add_argument("name")
    delete = actions.add_parser("delete", help="delete a user and everything they wrote")
    delete.add_argument("name")
    delete.add_argument("--yes", action="store_true", help="also when they have data")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    _, store = open_store(args)
    try:
        if args.action == "add":
            check_user_name(args.name)
            hashed = hash_password(_read_password(args.password_stdin))
            user = users.create_user(store, args.name, role=args.role, password_hash=hashed)
            print(f"added user {user.name!r} (id {user.id}, role {user.role})")
        elif args.action == "list":
            for user in store.list_users():
                login = "password" if user.password_hash else "no password (cannot log in)"
                login = "disabled" if user.disabled else login
                print(f"{user.id:>5}  {user.name:<24} {user.role:<10} {login}")
        elif args.action == "set-role":
            users.set_role(store, args.name, args.role)
            print(f"{args.name}: role is now {args.role}; their open sessions have ended")
        elif args.action == "passwd":
            users.user_data(store, args.name)  # a NotFoundError before asking for a password
            users.set_password(store, args.name, hash_password(_read_password(args.password_stdin)))
            print(f"{args.name}: password changed; their open sessions have ended")
        elif args.action in ("disable", "enable"):
            users.set_disabled(store, args.name, args.action == "disable")
            print(f"{args.name}: {args.action}d")
        elif args.action == "delete":
            _delete(store, args.name, args.yes)
    finally:
        store.close()
    return 0


def _delete(store: Store, name: str, yes: bool) -> None:
    data = users.user_data(store, name)
    if data.total and not yes:
        raise ValidationError(
            f"users delete {name}: they have {data.conversations:,} conversations, "
            f"{data.ratings:,} ratings and {data.comparisons:,} comparisons, which would be "
            f"deleted too; `rlchat users disable {name}` keeps them, or run again with --yes"
        )
    users.delete_user(store, name)
    print(f"{name}: deleted, with {data.total:,} rows of their data")


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Repeat password: "):
        raise ValidationError("password: the two entries differ; try again")
    return first
