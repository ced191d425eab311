"""Passwords, login and roles for the feedback UI.

Passwords are hashed with scrypt (RFC 7914) and a random 16-byte salt, stored as
``scrypt$n$r$p$salt_hex$hash_hex``; checks compare in constant time. Every event handler
resolves its caller on the server (`Access.caller`) and checks the role (`Caller.require`):
hiding a tab is a convenience, not the protection.

Roles are ordered: ``user`` < ``annotator`` < ``admin``; a higher role can do all a lower one can.
Without ``--auth`` (a local demo) one local user holds every role.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass

from agent.errors import PermissionDenied, ValidationError
from agent.store.api import Store

log = logging.getLogger(__name__)

ROLE_RANK = {"user": 0, "annotator": 1, "admin": 2}
LOCAL_USER = "local"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MIN_PASSWORD_CHARS = 8


def hash_password(password: str) -> str:
    """A salted scrypt hash of `password` in a self-describing string."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise ValidationError(
            f"password: use at least {MIN_PASSWORD_CHARS} characters (got {len(password)})"
        )
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str | None) -> bool:
    """Whether `password` matches the `stored` hash (False for a missing or malformed hash)."""
    if not stored:
        return False
    try:
        scheme, n, r, p, salt_hex, hash_hex = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = bytes.fromhex(hash_hex)
        digest = hashlib.scrypt(
            password.encode(),
            salt=bytes.fromhex(salt_hex),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
        )
    except ValueError:
        log.warning("malformed password hash in the database; refusing the login")
        return False
    return hmac.compare_digest(digest, expected)


@dataclass(frozen=True)
class Caller:
    """The person behind one event, as resolved on the server."""

    id: int
    """users.id"""
    name: str
    """users.name"""
    role: str
    """user, annotator or admin"""

    def can(self, role: str) -> bool:
        """Whether this caller holds `role` (or a higher one)."""
        return ROLE_RANK.get(self.role, -1) >= ROLE_RANK[role]

    def require(self, role: str, action: str) -> None:
        """Raise `PermissionDenied` unless this caller holds `role`."""
        if not self.can(role):
            raise PermissionDenied(
                f"{action} needs the {role} role; user {self.name!r} is a {self.role}. "
                f"An admin can grant it with `rlchat users set-role {self.name} {role}`."
            )


class Access:
    """Who is calling: the logged-in user with `auth`, else the one local all-roles user."""

    def __init__(self, store: Store, auth: bool) -> None:
        self.store = store
        self.auth = auth

    def check_login(self, username: str, password: str) -> bool:
        """Gradio's `auth=` callback: the name exists and the password matches its hash."""
        user = self.store.get_user(username)
        ok = user is not None and verify_password(password, user.password_hash)
        if not ok:
            log.info("failed login for %r", username)
        return ok

    def caller(self, username: str | None) -> Caller:
        """The caller of one event from `gr.Request.username` (ignored without auth)."""
        if not self.auth:
            user = self.store.get_or_create_user(LOCAL_USER, role="admin")
            return Caller(user.id, user.name, "admin")
        if not username:
            raise PermissionDenied("not logged in: open the page again and log in")
        user = self.store.get_user(username)
        if user is None:
            raise PermissionDenied(f"user {username!r} no longer exists; ask an admin")
        return Caller(user.id, user.name, user.role)
