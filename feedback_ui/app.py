"""The feedback web app: Chat, Arena, Annotate and Dashboard tabs in one `gr.Blocks`.

    app = build_app(store, agent, settings, auth=True)
    launch(app, store, ServeConfig(port=7860, auth=True))

Handlers live in one module per tab and close over a `UIContext`; there are no module
globals. With auth, Gradio's login page guards the app and every handler checks the caller's
role on the server; the tabs a role may not use are hidden as well. Without auth a single
local user holds every role and the page says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from agent.config import Settings
from agent.store.api import Store
from feedback_ui.annotate import build_annotate_tab
from feedback_ui.arena import build_arena_tab
from feedback_ui.auth import LOCAL_USER, Access
from feedback_ui.chat import build_chat_tab
from feedback_ui.common import UIContext
from feedback_ui.dashboard import build_dashboard_tab
from feedback_ui.login import LoginGate, LoginLimits, SessionMiddleware

log = logging.getLogger(__name__)

# Annotate-tab keys; ignored while typing in a text box (except Ctrl+Enter to submit).
SHORTCUTS_JS = """
() => {
  const visible = (el) => el && el.offsetParent !== null;
  const click = (id) => { const el = document.getElementById(id); if (visible(el)) { el.click(); return true; } return false; };
  document.addEventListener('keydown', (e) => {
    const typing = ['INPUT', 'TEXTAREA'].includes(e.target.tagName) && e.target.type !== 'radio' && e.target.type !== 'checkbox';
    if (e.ctrlKey && e.key === 'Enter') { if (click('ann-submit')) e.preventDefault(); return; }
    if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
    const keys = {a: 'pair-a', b: 'pair-b', t: 'pair-tie', x: 'pair-both-bad', s: 'ann-skip'};
    const k = e.key.toLowerCase();
    if (keys[k]) { click(keys[k]); return; }
    if (k === 'u') { click('ann-undo') || click('pair-undo'); return; }
    if (/^[1-5]$/.test(k)) {
      for (const group of document.querySelectorAll('.ann-score')) {
        if (!visible(group) || group.querySelector('input:checked')) continue;
        const options = group.querySelectorAll('input[type=radio]');
        if (options[Number(k) - 1]) options[Number(k) - 1].click();
        return;
      }
    }
  });
}
"""

HIDE_TABS_JS = """
(role) => {
  const rank = {user: 0, annotator: 1, admin: 2}[role] ?? -1;
  const needs = {annotate: 1, dashboard: 2};
  for (const [tab, needed] of Object.entries(needs)) {
    document.querySelectorAll(`button[data-tab-id="${tab}"]`)
      .forEach((b) => { b.style.display = rank >= needed ? '' : 'none'; });
  }
  return [];
}
"""


@dataclass
class ServeConfig:
    """How `rlchat serve` runs the web app."""

    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0 for every interface)."""
    port: int = 7860
    """TCP port."""
    auth: bool = False
    """Require a login (users from `rlchat users add`) and enforce roles."""
    concurrency: int = 2
    """Replies generated at the same time; more requests wait in Gradio's queue."""
    max_queue: int = 64
    """Requests allowed to wait in the queue before new ones are turned away."""
    login: LoginLimits = field(default_factory=LoginLimits)
    """Failed-login limits per user name and per address (with auth)."""


def build_app(
    store: Store, agent: Any, settings: Settings, auth: bool, *, concurrency: int = 2
) -> gr.Blocks:
    """The whole web app. `agent` is an `agent.chat.ChatAgent` (None disables chatting)."""
    ctx = UIContext(store=store, settings=settings, access=Access(store, auth), agent=agent)
    with gr.Blocks(title="rlchat", analytics_enabled=False) as app:
        banner = gr.Markdown(elem_id="banner")
        role = gr.Textbox(visible=False)
        with gr.Tab("Chat", id="chat"):
            chat = build_chat_tab(ctx, concurrency)
        with gr.Tab("Arena", id="arena") as arena_tab:
            arena = build_arena_tab(ctx, concurrency)
        with gr.Tab("Annotate", id="annotate") as annotate_tab:
            annotate_note = gr.Markdown("This tab is for annotators.", visible=False)
            with gr.Column() as annotate_body:
                annotate = build_annotate_tab(ctx)
        with gr.Tab("Dashboard", id="dashboard") as dashboard_tab:
            dashboard_note = gr.Markdown("This tab is for admins.", visible=False)
            with gr.Column() as dashboard_body:
                dashboard = build_dashboard_tab(ctx)

        def identify(request: gr.Request) -> tuple[Any, ...]:
            caller = ctx.caller(request, "user", "opening the app")
            annotator, admin = caller.can("annotator"), caller.can("admin")
            return (
                _banner(caller.name, caller.role, auth),
                caller.role,
                gr.update(visible=annotator),
                gr.update(visible=not annotator),
                gr.update(visible=admin),
                gr.update(visible=not admin),
            )

        gates = [annotate_body, annotate_note, dashboard_body, dashboard_note]
        load = app.load(identify, None, [banner, role, *gates], api_name="whoami")
        # Gradio does not hide tab buttons on update; hide them in the page (the handlers
        # check roles on the server regardless).
        load.then(None, [role], None, js=HIDE_TABS_JS)
        fn, outputs = chat["load"]
        load.then(_gated(ctx, "user", fn, len(outputs)), None, outputs, api_name=False)
        for tab, (fn, outputs), needed in (
            (arena_tab, arena["load"], "user"),
            (annotate_tab, annotate["load_item"], "annotator"),
            (annotate_tab, annotate["load_pair"], "annotator"),
            (dashboard_tab, dashboard["load"], "admin"),
        ):
            tab.select(_gated(ctx, needed, fn, len(outputs)), None, outputs, api_name=False)
    return app


def _gated(ctx: UIContext, role: str, fn: Callable[..., Any], n_outputs: int) -> Callable[..., Any]:
    """`fn(request)` for callers holding `role`; no change (and no error) for the others."""

    def gated(request: gr.Request) -> Any:
        caller = ctx.identify(request)
        if not caller.can(role):
            return tuple(gr.update() for _ in range(n_outputs)) if n_outputs > 1 else gr.update()
        return fn(request)

    gated.__name__ = f"load_{fn.__name__}"
    return gated


def _banner(name: str, role: str, auth: bool) -> str:
    if not auth:
        return (
            f"**Local demo, no login.** You are the local user `{LOCAL_USER}` with every role "
            "(user, annotator, admin). Start `rlchat serve --auth` to require logins and roles."
        )
    return f"Signed in as **{name}** ({role}) · [Log out](/logout)"


def launch(
    app: gr.Blocks, store: Store, config: ServeConfig, *, block: bool = True
) -> tuple[Any, str, Any]:
    """Start the server (through Gradio's queue, `config.concurrency` replies at a time).

    With auth, logins go through a `LoginGate` (failure limits) and every request through
    `SessionMiddleware` (sessions end when their user's password, role or state changes).
    """
    app.queue(max_size=config.max_queue, default_concurrency_limit=8)
    gate = LoginGate(Access(store, config.auth), config.login)
    middleware = [Middleware(SessionMiddleware, gate=gate)] if config.auth else []
    log.info("serving on http://%s:%d (auth %s)", config.host, config.port, config.auth)
    return app.launch(
        server_name=config.host,
        server_port=config.port,
        auth=gate.auth if config.auth else None,
        auth_message=(
            "Log in with the name and password an admin gave you (rlchat users add). "
            f"After {config.login.per_user} failed logins a name is locked for a few minutes."
        ),
        app_kwargs={"middleware": middleware},
        prevent_thread_lock=not block,
        ssr_mode=False,
        js=SHORTCUTS_JS,
        quiet=True,
    )
