"""What every tab shares: the context handlers close over, caller checks, error translation.

Handlers raise `agent.errors` exceptions for anything a user can get wrong; `user_errors`
turns those into `gr.Error`, which Gradio shows to the person (and returns to API clients)
instead of a stack trace.

Gradio keys a page's state on its `session_hash`, which the client chooses. `UIContext.caller`
binds each session id to the first logged-in user who uses it and refuses any other user
with it, and `StopFlags` keys the Stop buttons on (user, session), so knowing someone's
session id gives no hold over their page or their running reply.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import gradio as gr

from agent.config import Settings
from agent.errors import PermissionDenied, RLChatError
from agent.store.api import Store
from agent.store.models import Message
from feedback_ui.auth import Access, Caller

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

MAX_SESSIONS = 10_000
"""Session ids remembered (the oldest unused are forgotten first, as Gradio forgets state)."""

POSITIVE_REASONS = ["helpful", "accurate", "follows instructions", "friendly"]
NEGATIVE_REASONS = ["wrong", "unhelpful", "rude", "too long", "unsafe", "ignores instructions"]


def session_of(request: gr.Request | None) -> str:
    """The page session of an event (Gradio's client-chosen `session_hash`; "" if none)."""
    return (getattr(request, "session_hash", None) or "") if request is not None else ""


class SessionOwners:
    """Which user each page session belongs to: the first caller binds it."""

    def __init__(self) -> None:
        self._owners: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, caller: Caller, session: str) -> None:
        """Bind `session` to `caller`, or refuse a caller it is not bound to."""
        if not session:
            return
        with self._lock:
            owner = self._owners.setdefault(session, caller.id)
            self._owners.move_to_end(session)
            while len(self._owners) > MAX_SESSIONS:
                self._owners.popitem(last=False)
        if owner != caller.id:
            log.warning("user %r used a page session of user id %d; refused", caller.name, owner)
            raise PermissionDenied(
                "this page session belongs to another login; reload the page to start your own"
            )


class StopFlags:
    """The stop flag of each running reply, keyed on (logged-in user, page session)."""

    def __init__(self) -> None:
        self._flags: OrderedDict[tuple[int, str], threading.Event] = OrderedDict()
        self._lock = threading.Lock()

    def new(self, caller: Caller, request: gr.Request) -> threading.Event:
        """A fresh flag for the reply this caller's session starts now."""
        flag, key = threading.Event(), (caller.id, session_of(request))
        with self._lock:
            self._flags[key] = flag
            self._flags.move_to_end(key)
            while len(self._flags) > MAX_SESSIONS:
                self._flags.popitem(last=False)
        return flag

    def stop(self, caller: Caller, request: gr.Request) -> None:
        """Set the flag of this caller's reply in this session (nothing if none runs)."""
        with self._lock:
            flag = self._flags.get((caller.id, session_of(request)))
        if flag is not None:
            flag.set()


@dataclass
class UIContext:
    """Everything the handlers of one app share; built once in `build_app`."""

    store: Store
    """The database."""
    settings: Settings
    """Application settings (limits, Likert criteria, guidelines, overlap)."""
    access: Access
    """Login and roles."""
    agent: Any = None
    """The `agent.chat.ChatAgent` serving replies (None: the chat tab says chat is unavailable)."""
    sessions: SessionOwners = field(default_factory=SessionOwners)
    """The user each page session belongs to."""

    def identify(self, request: gr.Request | None) -> Caller:
        """The caller of this event, refused when the page session is another user's."""
        username = getattr(request, "username", None) if request is not None else None
        caller = self.access.caller(username)
        self.sessions.check(caller, session_of(request))
        return caller

    def caller(self, request: gr.Request | None, role: str, action: str) -> Caller:
        """The caller of this event, checked for `role` (and the session's owner) on the server."""
        caller = self.identify(request)
        caller.require(role, action)
        return caller


def user_errors(fn: F) -> F:
    """Show `RLChatError`s raised by a handler (plain or generator) as a Gradio error toast."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from fn(*args, **kwargs)
            except RLChatError as exc:
                log.info("refused %s: %s", fn.__name__, exc)
                raise gr.Error(html.escape(str(exc)), print_exception=False) from exc

        return stream  # type: ignore[return-value]

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RLChatError as exc:
            log.info("refused %s: %s", fn.__name__, exc)
            raise gr.Error(html.escape(str(exc)), print_exception=False) from exc

    return call  # type: ignore[return-value]


def to_chat(messages: list[Message]) -> list[dict[str, str]]:
    """Stored user/assistant turns as Gradio chatbot messages (system turns left out).

    Text is passed verbatim; the Chatbot sanitises HTML, so `<script>` renders inert.
    """
    shown = []
    for m in messages:
        if m.role == "system":
            continue
        content = m.content if not m.error else f"{m.content}\n\n*(generation failed: {m.error})*"
        shown.append({"role": m.role, "content": content})
    return shown
