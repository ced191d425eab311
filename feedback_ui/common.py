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
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import gradio as gr

from agent.config import Settings
from agent.errors import PermissionDenied, RLChatError, ValidationError
from agent.store.api import Store, check_text
from agent.store.models import Message
from feedback_ui.auth import Access, Caller

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

MAX_ID = 2**31 - 1
"""The largest row id the databases hold (a 32-bit integer)."""
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
    """Show errors of a handler (plain or generator) as a Gradio error toast with a message.

    `RLChatError`s say what to do; anything else is a bug, logged with its traceback on the
    server and shown as a short message (never Gradio's bare `{"error": null}`).
    """
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                raise _shown(fn, exc) from exc

        return stream  # type: ignore[return-value]

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise _shown(fn, exc) from exc

    return call  # type: ignore[return-value]


def _shown(fn: Callable[..., Any], exc: Exception) -> Exception:
    """The `gr.Error` to raise for `exc` (a `gr.Error` itself passes through)."""
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, RLChatError):
        log.info("refused %s: %s", fn.__name__, exc)
        return gr.Error(html.escape(str(exc)), print_exception=False)
    log.exception("%s failed", fn.__name__)
    return gr.Error(
        f"the server failed on this request ({type(exc).__name__}); it is logged. Try again, "
        "and tell an admin if it keeps happening",
        print_exception=False,
    )


# ---- input checks at handler entry: API callers can send anything a component could not ----


def text_input(field: str, value: Any, max_chars: int, allow_empty: bool = False) -> str:
    """Typed text within the limits and valid Unicode (no lone surrogates), else refused."""
    check_text(field, value, max_chars, allow_empty)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError(
            f"{field}: contains a lone surrogate (U+{ord(value[exc.start]):04X}) at character "
            f"{exc.start + 1}, which is not valid Unicode text; send valid UTF-8"
        ) from None
    return value


def number_input(field: str, value: Any) -> float:
    """A finite number (int or float; not a string, not a bool), else refused."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(f"{field}: expected a number, got {value!r}")
    if math.isnan(value):
        raise ValidationError(f"{field}: NaN is not a number; give a finite value")
    if math.isinf(value):
        raise ValidationError(f"{field}: {value} is out of range; give a finite value")
    return float(value)


def whole_input(field: str, value: Any) -> int:
    """A whole number (7 or 7.0; not 7.5), else refused."""
    number = number_input(field, value)
    if not number.is_integer():
        raise ValidationError(f"{field}: {value} is not a whole number")
    return int(number)


class LikeEvent(gr.EventData):
    """`gr.LikeData` that a call without event data can build (its `index` is then None).

    Gradio builds the event object before the handler runs; `gr.LikeData` fails there on an
    API call with no event data, which the caller sees as a bare `{"error": null}`.
    """

    def __init__(self, target: Any, data: Any) -> None:
        super().__init__(target, data)
        fields = data if isinstance(data, dict) else {}
        self.index: int | list[int] | None = fields.get("index")
        """Position of the liked message in the chatbot (None: no event data)."""
        self.liked: bool | str | None = fields.get("liked")
        """True for a thumb up, False for a thumb down."""
        self.value: Any = fields.get("value")
        """The liked message."""


C = TypeVar("C", bound=gr.components.Component)


def number_component(component: C, field: str) -> C:
    """`component` (a Slider or Number) refusing a value that is not a number with a message.

    Gradio preprocesses inputs before the handler runs, and a string sent to a slider fails
    there, which API clients see as a bare `{"error": null}`; this names the field instead.
    """
    preprocess = component.preprocess

    def checked(payload: Any) -> Any:
        if payload is not None and (
            isinstance(payload, bool) or not isinstance(payload, int | float)
        ):
            shown = html.escape(repr(payload)[:100])  # an API caller's text, shown as HTML
            raise gr.Error(f"{field}: expected a number, got {shown}", print_exception=False)
        return preprocess(payload)

    component.preprocess = checked  # type: ignore[method-assign]
    return component


def id_input(field: str, value: Any) -> int:
    """A row id: a whole number from 1 to `MAX_ID` (2.5 is refused, not rounded to 2)."""
    shown = value if isinstance(value, int | float) and not isinstance(value, bool) else repr(value)
    try:
        number = whole_input(field, value)
    except ValidationError:
        number = 0
    if not 1 <= number <= MAX_ID:
        raise ValidationError(f"{field}: {shown} is not an id (a whole number from 1)")
    return number


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
