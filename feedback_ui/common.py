"""What every tab shares: the context handlers close over, caller checks, error translation.

Handlers raise `agent.errors` exceptions for anything a user can get wrong; `user_errors`
turns those into `gr.Error`, which Gradio shows to the person (and returns to API clients)
instead of a stack trace.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import gradio as gr

from agent.config import Settings
from agent.errors import RLChatError
from agent.store.api import Store
from agent.store.models import Message
from feedback_ui.auth import Access, Caller

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

POSITIVE_REASONS = ["helpful", "accurate", "follows instructions", "friendly"]
NEGATIVE_REASONS = ["wrong", "unhelpful", "rude", "too long", "unsafe", "ignores instructions"]


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

    def caller(self, request: gr.Request | None, role: str, action: str) -> Caller:
        """The caller of this event, checked for `role` on the server."""
        username = getattr(request, "username", None) if request is not None else None
        caller = self.access.caller(username)
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
