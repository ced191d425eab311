"""Accounts: safe user names, and the changes that must end a user's open sessions.

A user name is printable text without whitespace or invisible/bidi control characters, at
most 80 characters, and unique after Unicode NFKC normalisation and case folding (so
`alice`, `ALICE` and the full-width `ａｌｉｃｅ` are one name). Changing a password or a role,
or disabling an account, bumps `users.session_epoch`: the web app ends every session that
was opened under an older epoch.

    user = create_user(store, "alice", role="user", password_hash=hashed)
    set_password(store, "alice", new_hash)      # alice's open sessions end
    set_disabled(store, "alice", True)          # and she cannot log in
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from sqlalchemy import ColumnElement, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from agent.errors import NotFoundError, ValidationError
from agent.store.api import Store
from agent.store.models import ROLES, Base, Comparison, Conversation, Rating, User

MAX_NAME_CHARS = 80


def name_key(name: str) -> str:
    """The form two names are compared in: NFKC, case-folded, NFKC again."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def check_user_name(name: object) -> str:
    """`name` if it is a valid user name; else a `ValidationError` saying which rule it breaks."""
    if not isinstance(name, str):
        raise ValidationError(f"user name: expected text, got {type(name).__name__}")
    if not name:
        raise ValidationError("user name: must not be empty")
    if len(name) > MAX_NAME_CHARS:
        raise ValidationError(
            f"user name: {len(name)} characters is over the limit of {MAX_NAME_CHARS}"
        )
    for i, char in enumerate(name):
        what = _forbidden(char)
        if what:
            raise ValidationError(
                f"user name {name!r}: character {i + 1} is {what} (U+{ord(char):04X}); use "
                "letters, digits and punctuation only, no spaces or invisible characters"
            )
    return name


def _forbidden(char: str) -> str:
    category = unicodedata.category(char)
    if category == "Cs":
        return "a lone surrogate (not valid Unicode text)"
    if char.isspace() or category.startswith("Z"):
        return "whitespace"
    if category == "Cf":
        return "an invisible formatting or bidi control character"
    if not char.isprintable():
        return "a control character"
    return ""


def create_user(
    store: Store, name: str, role: str = "user", password_hash: str | None = None
) -> User:
    """A new user; refused when the name is invalid or equal to another after normalisation."""
    check_user_name(name)
    if role not in ROLES:
        raise ValidationError(f"role: {role!r} is not one of {', '.join(ROLES)}")
    key = name_key(name)
    with store.transaction() as s:
        for existing in s.scalars(select(User.name)):
            if name_key(existing) == key:
                raise ValidationError(
                    f"user name {name!r}: a user called {existing!r} already exists, and names "
                    "that differ only in case or Unicode form are the same name; pick another"
                )
        user = User(name=name, role=role, password_hash=password_hash)
        s.add(user)
    return user


def find_user(store: Store, name: str) -> User | None:
    """The user whose name equals `name` after normalisation (an exact match first)."""
    exact = store.get_user(name)
    if exact is not None:
        return exact
    key = name_key(name)
    return next((u for u in store.list_users() if name_key(u.name) == key), None)


def get_or_create_user(store: Store, name: str, role: str = "user") -> User:
    """The user called `name` (after normalisation), created with `role` when there is none."""
    check_user_name(name)
    if role not in ROLES:
        raise ValidationError(f"role: {role!r} is not one of {', '.join(ROLES)}")
    for _ in range(2):  # a second try finds the user a concurrent caller just created
        existing = find_user(store, name)
        if existing is not None:
            return existing
        try:
            return create_user(store, name, role=role)
        except (ValidationError, IntegrityError):
            continue
    raise ValidationError(f"user name {name!r}: could not be created; try again")


def _bump(store: Store, name: str, **values: object) -> None:
    """Set `values` on user `name` and end their sessions (session_epoch + 1)."""
    with store.transaction() as s:
        done = s.execute(
            update(User)
            .where(User.name == name)
            .values(session_epoch=User.session_epoch + 1, **values)
        )
        if not done.rowcount:  # type: ignore[attr-defined]
            raise NotFoundError(f"no user called {name!r}; `rlchat users list` shows them")


def set_password(store: Store, name: str, password_hash: str) -> None:
    """A new password hash for `name`; their open sessions end."""
    _bump(store, name, password_hash=password_hash)


def set_role(store: Store, name: str, role: str) -> None:
    """A new role for `name`; their open sessions end (the next login carries the new role)."""
    if role not in ROLES:
        raise ValidationError(f"role: {role!r} is not one of {', '.join(ROLES)}")
    _bump(store, name, role=role)


def set_disabled(store: Store, name: str, disabled: bool) -> None:
    """Disable (no login, open sessions end) or enable `name`; their data stays."""
    _bump(store, name, disabled=disabled)


def upgrade_password_hash(store: Store, user_id: int, old_hash: str, new_hash: str) -> bool:
    """Replace `old_hash` by a stronger hash of the same password (sessions stay open).

    Only when the stored hash is still `old_hash`: a password changed meanwhile wins.
    """
    with store.transaction() as s:
        done = s.execute(
            update(User)
            .where(User.id == user_id, User.password_hash == old_hash)
            .values(password_hash=new_hash)
        )
        return bool(done.rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class UserData:
    """What deleting a user deletes with them."""

    conversations: int
    ratings: int
    comparisons: int

    @property
    def total(self) -> int:
        return self.conversations + self.ratings + self.comparisons


def user_data(store: Store, name: str) -> UserData:
    """How many conversations, ratings and comparisons belong to `name`."""
    with store.reading() as s:
        user_id = s.scalar(select(User.id).where(User.name == name))
        if user_id is None:
            raise NotFoundError(f"no user called {name!r}; `rlchat users list` shows them")
        return UserData(
            conversations=_count(s, Conversation.user_id == user_id, Conversation),
            ratings=_count(s, Rating.rater_id == user_id, Rating),
            comparisons=_count(s, Comparison.rater_id == user_id, Comparison),
        )


def _count(s: Session, where: ColumnElement[bool], model: type[Base]) -> int:
    return int(s.scalar(select(func.count()).select_from(model).where(where)) or 0)


def delete_user(store: Store, name: str) -> None:
    """Delete `name` and everything they wrote (conversations, ratings, comparisons)."""
    with store.transaction() as s:
        user_id = s.scalar(select(User.id).where(User.name == name))
        if user_id is None:
            raise NotFoundError(f"no user called {name!r}; `rlchat users list` shows them")
        for model in (Rating, Comparison):
            s.execute(delete(model).where(model.rater_id == user_id))
        s.execute(delete(Conversation).where(Conversation.user_id == user_id))
        s.execute(delete(User).where(User.id == user_id))
