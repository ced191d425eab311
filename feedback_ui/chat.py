"""The Chat tab: streamed replies, stop, feedback on every reply, regenerate, edit, history.

The session state is a small dict: the conversation on screen and the ids of the messages
shown, in order (one branch of the message tree). Everything else is read from the store.
Replies stream from `ChatAgent.stream_reply`, which writes the user message before and the
reply after generating, so no database write sits between two tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from agent.chat import SamplingParams
from agent.errors import PermissionDenied, ValidationError
from feedback_ui.auth import Caller
from feedback_ui.branches import branch_choices, branch_path
from feedback_ui.common import (
    NEGATIVE_REASONS,
    POSITIVE_REASONS,
    LikeEvent,
    StopFlags,
    UIContext,
    id_input,
    number_component,
    number_input,
    text_input,
    to_chat,
    user_errors,
    whole_input,
)

ROLE = "user"
THUMBS = [("👍 Good", 1), ("👎 Bad", -1)]
PANEL_SNIPPET = 120
"""Characters of the rated reply quoted at the top of the feedback panel."""


def empty_state() -> dict[str, Any]:
    """No conversation yet: the first message creates one."""
    return {"conversation_id": None, "path": []}


class ChatHandlers:
    """Event handlers of the Chat tab. Each one resolves its caller and checks ownership."""

    def __init__(self, ctx: UIContext) -> None:
        self.ctx = ctx
        self._stops = StopFlags()  # (user, session) -> stop flag of its running reply

    # ---- helpers -----------------------------------------------------------------------

    def _own(self, caller: Caller, conversation_id: int) -> None:
        if self.ctx.store.get_conversation(conversation_id).user_id != caller.id:
            raise PermissionDenied(
                f"conversation {conversation_id} belongs to another user; open one of yours"
            )

    def _own_reply(self, caller: Caller, message_id: int) -> None:
        msg = self.ctx.store.get_message(int(message_id))
        if msg.role != "assistant":
            raise ValidationError(f"reply: message {message_id} is not an assistant reply")
        self._own(caller, msg.conversation_id)

    def _shown(self, path: list[int]) -> list[dict[str, str]]:
        return to_chat(self.ctx.store.path(path[-1])) if path else []

    def _siblings(self, path: list[int]) -> Any:
        """The radio to switch between replies of the last turn (hidden below two)."""
        if not path:
            return gr.update(choices=[], value=None, visible=False)
        siblings = self.ctx.store.siblings(path[-1])
        choices = [(f"Reply {i + 1}", m.id) for i, m in enumerate(siblings)]
        return gr.update(choices=choices, value=path[-1], visible=len(siblings) >= 2)

    def _stream(
        self, state: dict, chunks: Iterator[Any], before: list[dict], request: gr.Request
    ) -> Iterator[tuple[Any, ...]]:
        """Yield (state, chatbot, siblings, reply id) while the reply streams in."""
        reply = {"role": "assistant", "content": ""}
        shown = [*before, reply]
        for chunk in chunks:
            reply["content"] = chunk.text
            if chunk.done:
                if chunk.error:
                    gr.Warning(f"The reply was cut short: {chunk.error}")
                state = {**state, "path": [*state["path"], chunk.user_message_id]}
                state["path"].append(chunk.assistant_message_id)
                yield (
                    state,
                    self._shown(state["path"]),
                    self._siblings(state["path"]),
                    chunk.assistant_message_id,
                )
                return
            yield state, shown, gr.update(), gr.update()

    @user_errors
    def conversations(self, request: gr.Request, current: int | None = None) -> Any:
        """The caller's own conversations, newest first, for the dropdown; `current` selected."""
        caller = self.ctx.caller(request, ROLE, "listing conversations")
        convs = self.ctx.store.list_conversations(user_id=caller.id, limit=200)
        choices = [(f"#{c.id} {c.title or '(empty)'}", c.id) for c in convs if c.source == "chat"]
        return gr.update(choices=choices, value=current)

    def selector(self, state: dict, request: gr.Request) -> Any:
        """The conversation selector with the conversation on screen selected."""
        return self.conversations(request, current=state["conversation_id"])

    def branches(self, state: dict) -> Any:
        """The branch picker: every branch of the conversation (hidden when there is one)."""
        if state["conversation_id"] is None or not state["path"]:
            return gr.update(choices=[], value=None, visible=False)
        choices = branch_choices(self.ctx.store.messages(state["conversation_id"]), state["path"])
        current = next((leaf for _, leaf in choices if leaf == state["path"][-1]), None)
        return gr.update(choices=choices, value=current, visible=len(choices) >= 2)

    def on_screen_changed(self, state: dict) -> tuple[Any, Any]:
        """Another turn, branch or conversation is on screen: refresh the branch picker and
        close the feedback panel (it was about a reply that may be gone from view)."""
        return self.branches(state), gr.update(visible=False)

    def _last_reply(self, path: list[int]) -> int | None:
        if path and self.ctx.store.get_message(path[-1]).role == "assistant":
            return path[-1]
        return None

    # ---- events ------------------------------------------------------------------------

    @user_errors
    def send(
        self,
        state: dict,
        text: str,
        system_prompt: str,
        temperature: float,
        top_p: float,
        max_new_tokens: float,
        repetition_penalty: float,
        request: gr.Request,
    ) -> Iterator[tuple[Any, ...]]:
        """Store the message, stream the reply, store it; outputs (state, chat, siblings, reply id, textbox, conversations)."""
        caller = self.ctx.caller(request, ROLE, "chatting")
        agent = self._agent()
        text_input("message", text or "", self.ctx.settings.max_text_chars)
        sampling = _sampling(temperature, top_p, max_new_tokens, repetition_penalty)
        conv_id = state["conversation_id"]
        if conv_id is None:
            text_input("system prompt", system_prompt or "", self.ctx.settings.max_text_chars, True)
            conv_id = agent.new_conversation(caller.id, system_prompt or "")
            state = {"conversation_id": conv_id, "path": []}
        else:
            self._own(caller, conv_id)
        before = [*self._shown(state["path"]), {"role": "user", "content": text}]
        parent = state["path"][-1] if state["path"] else None
        with self.ctx.store.discarding_if_empty(conv_id, new=not state["path"]):
            chunks = agent.stream_reply(
                conv_id, text, parent_id=parent, sampling=sampling,
                stop_event=self._stops.new(caller, request),
            )  # fmt: skip
        yield state, before, gr.update(), gr.update(), "", gr.update()
        out: tuple[Any, ...] = ()
        for out in self._stream(state, chunks, before, request):
            yield *out, gr.update(), gr.update()
        # The selector lists the conversation and shows it as the current one.
        yield *out, gr.update(), self.conversations(request, current=state["conversation_id"])

    @user_errors
    def regenerate(
        self,
        state: dict,
        temperature: float,
        top_p: float,
        max_new_tokens: float,
        repetition_penalty: float,
        request: gr.Request,
    ) -> Iterator[tuple[Any, ...]]:
        """A new reply to the last user message, shown instead of (and stored beside) the old one."""
        caller = self.ctx.caller(request, ROLE, "chatting")
        if not state["path"]:
            raise ValidationError("regenerate: there is no reply yet; send a message first")
        self._own_reply(caller, state["path"][-1])
        sampling = _sampling(temperature, top_p, max_new_tokens, repetition_penalty)
        chunks = self._agent().regenerate(
            state["path"][-1], sampling=sampling, stop_event=self._stops.new(caller, request)
        )
        before = self._shown(state["path"][:-1])
        state = {**state, "path": state["path"][:-2]}
        yield from self._stream(state, chunks, before, request)

    @user_errors
    def edit(
        self,
        state: dict,
        temperature: float,
        top_p: float,
        max_new_tokens: float,
        repetition_penalty: float,
        edit: gr.EditData,
        request: gr.Request,
    ) -> Iterator[tuple[Any, ...]]:
        """Resend an edited user message: a new branch from the turn before it.

        The old branch stays in the database. Editing the very first message starts a new
        conversation with the same system prompt (a conversation has one first turn).
        """
        caller = self.ctx.caller(request, ROLE, "chatting")
        index = edit.index if isinstance(edit.index, int) else edit.index[0]
        path = state["path"]
        if not 0 <= index < len(path) or self.ctx.store.get_message(path[index]).role != "user":
            raise ValidationError("edit: only your own messages can be edited and resent")
        self._own(caller, state["conversation_id"])
        text = edit.value if isinstance(edit.value, str) else str(edit.value)
        text_input("message", text, self.ctx.settings.max_text_chars)
        sampling = _sampling(temperature, top_p, max_new_tokens, repetition_penalty)
        if index == 0:
            old = self.ctx.store.get_conversation(state["conversation_id"])
            conv_id = self._agent().new_conversation(
                caller.id, old.system_prompt, meta={"edited_from": old.id}
            )
            state = {"conversation_id": conv_id, "path": []}
        else:
            state = {**state, "path": path[:index]}
        parent = state["path"][-1] if state["path"] else None
        with self.ctx.store.discarding_if_empty(state["conversation_id"], new=index == 0):
            chunks = self._agent().stream_reply(
                state["conversation_id"], text, parent_id=parent, sampling=sampling,
                stop_event=self._stops.new(caller, request),
            )  # fmt: skip
        before = [*self._shown(state["path"]), {"role": "user", "content": text}]
        yield from self._stream(state, chunks, before, request)

    @user_errors
    def stop(self, request: gr.Request) -> None:
        """Stop the caller's running reply in this session; the part written so far is stored."""
        self._stops.stop(self.ctx.caller(request, ROLE, "chatting"), request)

    @user_errors
    def new_conversation(self, request: gr.Request) -> tuple[Any, ...]:
        """Clear the screen; the next message starts a new conversation."""
        self.ctx.caller(request, ROLE, "chatting")
        return (
            empty_state(),
            [],
            self._siblings([]),
            None,
            gr.update(value=None),
        )

    @user_errors
    def open_conversation(
        self, conversation_id: int | None, request: gr.Request
    ) -> tuple[Any, ...]:
        """Show one of the caller's conversations, on its newest branch."""
        caller = self.ctx.caller(request, ROLE, "opening a conversation")
        if conversation_id is None:
            return empty_state(), [], self._siblings([]), None
        self._own(caller, int(conversation_id))
        messages = [m for m in self.ctx.store.messages(int(conversation_id)) if m.role != "system"]
        if not messages:
            return (
                {"conversation_id": int(conversation_id), "path": []},
                [],
                self._siblings([]),
                None,
            )
        path = [m.id for m in self.ctx.store.path(messages[-1].id) if m.role != "system"]
        state = {"conversation_id": int(conversation_id), "path": path}
        return state, self._shown(path), self._siblings(path), self._last_reply(path)

    @user_errors
    def open_branch(self, state: dict, leaf_id: int | None, request: gr.Request) -> tuple[Any, ...]:
        """Show another branch of the conversation (an older, edited or regenerated one)."""
        caller = self.ctx.caller(request, ROLE, "opening a branch")
        if leaf_id is None or state["conversation_id"] is None:
            return state, gr.update(), gr.update(), gr.update()
        messages = self.ctx.store.messages(state["conversation_id"])
        self._own(caller, state["conversation_id"])
        if int(leaf_id) not in {m.id for m in messages}:
            raise ValidationError(f"branch: message {leaf_id} is not in this conversation")
        path = branch_path(messages, int(leaf_id))
        state = {**state, "path": path}
        return state, self._shown(path), self._siblings(path), self._last_reply(path)

    @user_errors
    def show_sibling(
        self, state: dict, reply_id: int | None, request: gr.Request
    ) -> tuple[Any, ...]:
        """Show another reply to the last user message."""
        caller = self.ctx.caller(request, ROLE, "chatting")
        if reply_id is None or not state["path"] or reply_id == state["path"][-1]:
            return state, gr.update(), gr.update()
        if reply_id not in {m.id for m in self.ctx.store.siblings(state["path"][-1])}:
            raise ValidationError(f"reply: {reply_id} is not a reply to your last message")
        self._own_reply(caller, reply_id)
        state = {**state, "path": [*state["path"][:-1], int(reply_id)]}
        return state, self._shown(state["path"]), int(reply_id)

    @user_errors
    def mark_better(self, state: dict, request: gr.Request) -> str:
        """Record that the reply on screen beats each other reply to the same message."""
        caller = self.ctx.caller(request, ROLE, "comparing replies")
        if not state["path"]:
            raise ValidationError("better: there is no reply on screen")
        best = state["path"][-1]
        self._own_reply(caller, best)
        others = [m for m in self.ctx.store.siblings(best) if m.id != best and not m.error]
        if not others:
            raise ValidationError("better: this message has one reply; regenerate to get another")
        for other in others:
            self.ctx.store.add_comparison(caller.id, best, other.id, "a")
        return f"Saved: the shown reply is better than {len(others)} other(s)."

    @user_errors
    def like(self, state: dict, data: LikeEvent, request: gr.Request) -> tuple[Any, ...]:
        """A thumb icon on a reply: store the thumb at once and open the feedback panel for
        that reply. Outputs (selected reply, panel, panel heading, thumb, reasons, comment,
        status). Clicking the chosen icon again takes the thumb back."""
        caller = self.ctx.caller(request, ROLE, "rating replies")
        if data.index is None:
            raise ValidationError("like: no reply was clicked; click a reply's thumb icons")
        index = data.index if isinstance(data.index, int) else data.index[0]
        index = whole_input("like: index", index)
        if not 0 <= index < len(state["path"]):
            raise ValidationError("reply: that message is no longer on screen")
        reply_id = state["path"][index]
        self._own_reply(caller, reply_id)
        store = self.ctx.store
        if data.liked not in (True, False):  # the icon was clicked off
            store.delete_rating(reply_id, caller.id, "thumb")
            return reply_id, gr.update(visible=False), "", None, [], "", "Thumb removed."
        value = 1 if data.liked is True else -1
        before = [r for r in store.ratings(reply_id, caller.id) if r.kind == "thumb"]
        reasons = [r for r in (before[0].reasons if before else []) if r in _reasons(value)]
        store.set_rating(
            reply_id, caller.id, "thumb", value, reasons=reasons,
            comment=before[0].comment if before else "",
        )  # fmt: skip
        text = store.get_message(reply_id).content.replace("\n", " ")
        quote = text[:PANEL_SNIPPET] + ("…" if len(text) > PANEL_SNIPPET else "")
        heading = (
            f"**{'👍' if value > 0 else '👎'} saved** for the reply “{quote}”. Why? (optional)"
        )
        return (
            reply_id,
            gr.update(visible=True),
            heading,
            value,
            gr.update(choices=_reasons(value), value=reasons),
            before[0].comment if before else "",
            "",
        )

    def reasons_for(self, thumb: int | None) -> Any:
        """The reasons that fit the chosen thumb."""
        return gr.update(choices=_reasons(thumb), value=[])

    @user_errors
    def rate(
        self, reply_id: float | None, thumb: int | None, reasons: list[str] | None, comment: str | None,
        request: gr.Request,
    ) -> str:  # fmt: skip
        """Thumb up (+1) or down (-1) on one of the caller's replies, with reasons and a comment."""
        caller = self.ctx.caller(request, ROLE, "rating replies")
        if not reply_id:  # None, or 0 from an empty number box
            raise ValidationError("reply: no reply selected; click 👍 or 👎 on a reply first")
        message_id = id_input("reply", reply_id)
        if thumb not in (1, -1):
            raise ValidationError("thumb: choose 👍 Good or 👎 Bad")
        text_input("comment", comment or "", self.ctx.settings.max_text_chars, allow_empty=True)
        self._own_reply(caller, message_id)
        self.ctx.store.set_rating(
            message_id,
            caller.id,
            "thumb",
            thumb,
            reasons=list(reasons or []),
            comment=comment or "",
        )
        return "Thanks! Your feedback on this reply is saved."

    def _agent(self) -> Any:
        if self.ctx.agent is None:
            raise ValidationError("chat: this server runs without a chat model; ask an admin")
        return self.ctx.agent


def _reasons(thumb: int | None) -> list[str]:
    return POSITIVE_REASONS if thumb == 1 else NEGATIVE_REASONS if thumb == -1 else []


def _sampling(
    temperature: float, top_p: float, max_new_tokens: float, penalty: float
) -> SamplingParams:
    """Sampling parameters from the settings sliders, validated (errors name the field)."""
    params = SamplingParams(
        max_new_tokens=whole_input("max new tokens", max_new_tokens),
        temperature=number_input("temperature", temperature),
        top_p=number_input("top-p", top_p),
        repetition_penalty=number_input("repetition penalty", penalty),
    )
    params.validate()
    return params


def build_chat_tab(ctx: UIContext, concurrency: int) -> dict[str, Any]:
    """Lay out the Chat tab inside the current Blocks and wire its events.

    Generating events share one concurrency group of `concurrency` slots in Gradio's queue.
    """
    h = ChatHandlers(ctx)
    state = gr.State(empty_state())
    with gr.Row():
        with gr.Column(scale=1, min_width=220):
            new = gr.Button("➕ New conversation", elem_id="chat-new")
            history = gr.Dropdown(label="Your conversations", choices=[], elem_id="chat-history")
        with gr.Column(scale=4):
            chatbot = gr.Chatbot(
                label="Chat", height=460, editable="user", allow_tags=False, elem_id="chat-bot"
            )
            with gr.Row():
                text = gr.Textbox(
                    placeholder="Type a message and press Enter", show_label=False, scale=6,
                    elem_id="chat-input", max_lines=8,
                )  # fmt: skip
                send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                stop = gr.Button("Stop", variant="stop", scale=1, elem_id="chat-stop")
            with gr.Row():
                regen = gr.Button("🔄 Regenerate", size="sm", elem_id="chat-regenerate")
                siblings = gr.Radio(
                    [], label="Replies to your last message", visible=False, elem_id="chat-siblings"
                )
                better = gr.Button("⭐ The shown reply is better", size="sm", elem_id="chat-better")
            branches = gr.Dropdown(
                label="Branches of this conversation (edited and regenerated turns)",
                choices=[], visible=False, elem_id="chat-branches",
            )  # fmt: skip
            # The reply the feedback panel is about: the one whose 👍/👎 was clicked (hidden;
            # API clients pass it to /chat_rate, and get it back from /chat_send).
            reply_id = number_component(gr.Number(visible=False, elem_id="fb-reply"), "reply")
            saved = gr.Markdown(elem_id="fb-status")
            with gr.Group(visible=False, elem_id="fb-panel") as panel:
                heading = gr.Markdown(elem_id="fb-heading")
                thumb = gr.Radio(THUMBS, label="Verdict", elem_id="fb-thumb")
                reasons = gr.CheckboxGroup([], label="Reasons (optional)", elem_id="fb-reasons")
                comment = gr.Textbox(label="Comment (optional)", lines=2, elem_id="fb-comment")
                save = gr.Button("Save feedback", elem_id="fb-save")
            with gr.Accordion("Settings", open=False):
                system = gr.Textbox(
                    ctx.settings.system_prompt,
                    label="System prompt (used by new conversations)",
                    lines=2,
                )
                # SmolLM2's recommended decoding (its model card): at 0.8 / 0.95 a 135M model
                # drifts off topic within a sentence or two.
                temperature = gr.Slider(0, 2, 0.2, step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1, 0.9, step=0.05, label="Top-p")
                max_new = gr.Slider(8, 1024, 128, step=8, label="Max new tokens")
                penalty = gr.Slider(1, 2, 1.1, step=0.05, label="Repetition penalty")
    for slider in (temperature, top_p, max_new, penalty):
        number_component(slider, str(slider.label).lower())
    sampling = [temperature, top_p, max_new, penalty]
    streamed = [state, chatbot, siblings, reply_id]
    gen = dict(concurrency_id="generate", concurrency_limit=concurrency)
    gr.on(
        [send.click, text.submit], h.send, [state, text, system, *sampling],
        [*streamed, text, history], api_name="chat_send", **gen,
    )  # fmt: skip
    regen.click(h.regenerate, [state, *sampling], streamed, api_name="chat_regenerate", **gen)
    chatbot.retry(h.regenerate, [state, *sampling], streamed, api_name="chat_retry", **gen)
    chatbot.edit(h.edit, [state, *sampling], streamed, api_name="chat_edit", **gen).then(
        h.selector, [state], [history], api_name=False
    )
    stop.click(h.stop, None, None, api_name="chat_stop", concurrency_limit=None, queue=False)
    new.click(h.new_conversation, None, [*streamed, history], api_name="chat_new")
    history.input(h.open_conversation, [history], streamed, api_name="chat_open")
    siblings.input(
        h.show_sibling, [state, siblings], [state, chatbot, reply_id], api_name="chat_show_reply"
    )
    branches.input(h.open_branch, [state, branches], streamed, api_name="chat_open_branch")
    state.change(h.on_screen_changed, [state], [branches, panel], api_name=False)
    better.click(h.mark_better, [state], [saved], api_name="chat_mark_better")
    chatbot.like(
        h.like, [state], [reply_id, panel, heading, thumb, reasons, comment, saved],
        api_name="chat_like",
    )  # fmt: skip
    thumb.input(h.reasons_for, [thumb], [reasons], api_name=False)
    save.click(
        h.rate,
        [reply_id, thumb, reasons, comment],
        [saved],
        api_name="chat_rate",
        trigger_mode="once",
    )
    return {"load": (h.conversations, [history])}
