"""Logins and sessions of `rlchat serve --auth`, around Gradio's own login page and cookie.

Gradio checks a name and password with our `LoginGate.auth` and then issues a random
session token in a cookie. `SessionMiddleware` sits in front of every HTTP request:

- on ``POST /login`` it records the caller's address (for the per-address limit) and, when
  the login succeeds, binds the token Gradio issued to the user and their `session_epoch`;
- on every other request it checks the bound user against the database and ends the session
  (drops the token, so Gradio answers 401 and shows the login page) when the user was
  deleted or disabled, or their password or role changed (the epoch moved on).

Failed logins are limited per user name (normalised, so `ALICE` counts for `alice`) and per
address; over the limit, a login is refused without checking the password, with HTTP 429, a
`Retry-After` header and "try again in N s". The counts are in this process's memory (one
server process; a restart clears them).
"""

from __future__ import annotations

import contextvars
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any

import anyio
from fastapi import HTTPException
from sqlalchemy import select

from agent.store.models import User
from agent.store.users import name_key
from feedback_ui.auth import Access

log = logging.getLogger(__name__)

TOKEN_COOKIE_PREFIX = "access-token-"
"""Gradio's session cookies: ``access-token-<app id>`` and ``access-token-unsecure-<app id>``."""


@dataclass
class LoginLimits:
    """How many failed logins are allowed before a name or an address must wait."""

    window_s: float = 300.0
    """Failures older than this many seconds no longer count."""
    per_user: int = 5
    """Failed logins for one user name within the window before it is locked."""
    per_address: int = 20
    """Failed logins from one client address (any names) within the window before it is locked."""
    concurrent_checks: int = 2
    """Password checks run at once (each scrypt check holds 128 MiB for a fraction of a second)."""


class LoginLimiter:
    """Sliding-window counts of failed logins per key (a user name or an address)."""

    def __init__(self, limits: LoginLimits) -> None:
        self.limits = limits
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def wait_s(self, user_key: str, address: str) -> float:
        """Seconds until a login for this name from this address may be tried (0: now)."""
        now = time.monotonic()
        with self._lock:
            return max(
                self._wait(f"user:{user_key}", self.limits.per_user, now),
                self._wait(f"addr:{address}", self.limits.per_address, now),
            )

    def _wait(self, key: str, allowed: int, now: float) -> float:
        failures = self._failures.get(key)
        if not failures:
            return 0.0
        while failures and failures[0] <= now - self.limits.window_s:
            failures.popleft()
        if not failures:
            del self._failures[key]
            return 0.0
        if len(failures) < allowed:
            return 0.0
        return failures[-allowed] + self.limits.window_s - now

    def failed(self, user_key: str, address: str) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._failures) > 100_000:  # names are attacker-chosen: bound the memory
                self._prune(now)
            for key in (f"user:{user_key}", f"addr:{address}"):
                self._failures.setdefault(key, deque()).append(now)

    def succeeded(self, user_key: str) -> None:
        with self._lock:
            self._failures.pop(f"user:{user_key}", None)

    def _prune(self, now: float) -> None:
        for key in list(self._failures):
            self._wait(key, 1, now)


@dataclass
class LoginAttempt:
    """One POST /login, shared between the middleware and the auth callback."""

    address: str
    """The client's address."""
    user: tuple[int, int] | None = None
    """(users.id, session_epoch) once the password was verified."""


_ATTEMPT: contextvars.ContextVar[LoginAttempt | None] = contextvars.ContextVar(
    "rlchat_login_attempt", default=None
)


@dataclass
class LoginGate:
    """Gradio's `auth=` callback plus the session table the middleware keeps."""

    access: Access
    """Password checks."""
    limits: LoginLimits = field(default_factory=LoginLimits)
    """Failed-login limits."""
    sessions: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Gradio session token -> (users.id, session_epoch at login)."""

    def __post_init__(self) -> None:
        self.limiter = LoginLimiter(self.limits)
        self._checks: anyio.CapacityLimiter | None = None

    async def auth(self, username: str, password: str) -> bool:
        """Check one login; raise HTTP 429 "try again in N s" over the failure limits."""
        attempt = _ATTEMPT.get()
        address = attempt.address if attempt is not None else ""
        key = name_key(username)
        wait = self.limiter.wait_s(key, address)
        if wait > 0:
            seconds = math.ceil(wait)
            log.warning("login for %r from %s refused: over the failure limit", username, address)
            raise HTTPException(
                status_code=429,
                detail=f"too many failed logins for this name or address; try again in {seconds} s",
                headers={"Retry-After": str(seconds)},
            )
        if self._checks is None:
            self._checks = anyio.CapacityLimiter(self.limits.concurrent_checks)
        user = await anyio.to_thread.run_sync(
            self.access.verify_login, username, password, limiter=self._checks
        )
        if user is None:
            self.limiter.failed(key, address)
            return False
        self.limiter.succeeded(key)
        if attempt is not None:
            attempt.user = (user.id, user.session_epoch)
        return True

    def ended(self, token: str) -> str:
        """Why the session of `token` must end ("" while it is valid)."""
        bound = self.sessions.get(token)
        if bound is None:
            return "its login is not known to this server"
        user_id, epoch = bound
        with self.access.store.reading() as s:
            row = s.execute(
                select(User.disabled, User.session_epoch).where(User.id == user_id)
            ).one_or_none()
        if row is None:
            return "the user was deleted"
        if row.disabled:
            return "the user was disabled"
        if row.session_epoch != epoch:
            return "the user's password or role changed"
        return ""


class SessionMiddleware:
    """ASGI middleware: address and token binding on login, session checks on every request."""

    def __init__(self, app: Any, gate: LoginGate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] == "POST":
            if scope["path"].rstrip("/").endswith("/login"):
                await self._login(scope, receive, send)
                return
        self._end_stale_sessions(scope)
        await self.app(scope, receive, send)

    async def _login(self, scope: dict, receive: Any, send: Any) -> None:
        attempt = LoginAttempt(address=(scope.get("client") or ("", 0))[0])
        reset = _ATTEMPT.set(attempt)

        async def capture(message: dict) -> None:
            if message["type"] == "http.response.start" and attempt.user is not None:
                live = scope["app"].tokens
                for token in [t for t in self.gate.sessions if t not in live]:
                    del self.gate.sessions[token]  # logged out
                for token in _tokens(message.get("headers", []), b"set-cookie"):
                    self.gate.sessions[token] = attempt.user
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            _ATTEMPT.reset(reset)

    def _end_stale_sessions(self, scope: dict) -> None:
        tokens: dict[str, str] = scope["app"].tokens
        for token in _tokens(scope.get("headers", []), b"cookie"):
            if token not in tokens:
                continue
            reason = self.gate.ended(token)
            if reason:
                log.info("ended a session of %r: %s", tokens[token], reason)
                tokens.pop(token, None)
                self.gate.sessions.pop(token, None)


def _tokens(headers: list[tuple[bytes, bytes]], name: bytes) -> set[str]:
    """Gradio session tokens in Cookie or Set-Cookie headers."""
    found = set()
    for key, value in headers:
        if key.lower() != name:
            continue
        cookie: SimpleCookie = SimpleCookie()
        try:
            cookie.load(value.decode("latin-1"))
        except CookieError:  # a malformed cookie header carries no token of ours
            continue
        found |= {m.value for k, m in cookie.items() if k.startswith(TOKEN_COOKIE_PREFIX)}
    return found
