"""Passwords, login and roles for the feedback UI.

Passwords are hashed with scrypt (RFC 7914) at the cost OWASP recommends (N=2^17, r=8, p=1,
128 MiB per hash) and a random 16-byte salt, stored as ``scrypt$n$r$p$salt_hex$hash_hex``;
checks compare in constant time, and a hash of a lower cost is replaced at the next login.
An unknown or disabled user costs the same scrypt work as a wrong password, so the answer
time does not tell which names exist. Every event handler resolves its caller on the server
(`Access.caller`) and checks the role (`Caller.require`): hiding a tab is a convenience, not
the protection. Login throttling and session ending live in `feedback_ui.login`.

Roles are ordered: ``user`` < ``annotator`` < ``admin``; a higher role can do all a lower one can.
Without ``--auth`` (a local demo) one local user holds every role.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass

from agent.errors import PermissionDenied, ValidationError
from agent.store.api import Store
from agent.store.models import User
from agent.store.users import check_user_name, upgrade_password_hash

log = logging.getLogger(__name__)

ROLE_RANK = {"user": 0, "annotator": 1, "admin": 2}
LOCAL_USER = "local"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1
SCRYPT_MAX_N = 2**20
"""Stored hashes asking for more work than this are refused (a tampered row must not OOM us)."""
MIN_PASSWORD_CHARS = 8


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    """scrypt with the memory limit its parameters need (OpenSSL's default is 32 MiB)."""
    if not (1 < n <= SCRYPT_MAX_N and 0 < r <= 32 and 0 < p <= 16):
        raise ValueError(f"scrypt parameters out of range: n={n} r={r} p={p}")
    maxmem = 128 * r * (n + p + 2) + 2**20
    return hashlib.scrypt(
        password.encode("utf-8", "surrogatepass"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=maxmem,
        dklen=dklen,
    )


def hash_password(password: str) -> str:
    """A salted scrypt hash of `password` in a self-describing string."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise ValidationError(
            f"password: use at least {MIN_PASSWORD_CHARS} characters (got {len(password)})"
        )
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, 32)
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
        digest = _scrypt(password, bytes.fromhex(salt_hex), int(n), int(r), int(p), len(expected))
    except ValueError:
        log.warning("malformed password hash in the database; refusing the login")
        return False
    return hmac.compare_digest(digest, expected)


def needs_rehash(stored: str) -> bool:
    """Whether `stored` was made at a lower cost than today's (upgrade it at the next login)."""
    try:
        _, n, r, p, *_ = stored.split("$")
        return int(n) < SCRYPT_N or int(r) < SCRYPT_R or int(p) < SCRYPT_P
    except ValueError:
        return False


@functools.cache
def _dummy_hash() -> str:
    """A hash of a random password, verified for unknown users to spend the same time."""
    return hash_password(secrets.token_urlsafe(16))


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

    def verify_login(self, username: str, password: str) -> User | None:
        """The user whose name and password these are, or None; the same work either way.

        A disabled account is refused after the password check. A hash of an older, lower
        cost is replaced by one of today's cost (the password is known to be right).
        """
        try:  # a name no user can have (NUL, lone surrogates, too long) is simply unknown
            user = self.store.get_user(check_user_name(username))
        except ValidationError:
            user = None
        stored = user.password_hash if user is not None and user.password_hash else None
        ok = verify_password(password, stored or _dummy_hash()) and stored is not None
        if not ok or user is None:
            log.info("failed login for %r", username)
            return None
        if user.disabled:
            log.info("refused login of disabled user %r", username)
            return None
        if needs_rehash(stored or ""):
            upgrade_password_hash(self.store, user.id, stored or "", hash_password(password))
            log.info("upgraded the password hash of %r to scrypt N=%d", username, SCRYPT_N)
        return user

    def check_login(self, username: str, password: str) -> bool:
        """Whether the name exists, is enabled, and the password matches its hash."""
        return self.verify_login(username, password) is not None

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
        if user.disabled:
            raise PermissionDenied(f"user {username!r} is disabled; ask an admin")
        return Caller(user.id, user.name, user.role)
