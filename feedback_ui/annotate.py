"""The Annotate tab: a queue of replies to rate on Likert criteria, and anonymous pairwise votes.

The queue is `Store.next_for_annotation` (fewest ratings first, never the annotator's own
conversations, leased so that two annotators are not served one item beyond the overlap).
Every judgement is an upsert, so a double click stores one rating; the last judgement of the
session can be undone. Pairs are shown in random order with no model names.
"""

from __future__ import annotations

import random
from typing import Any

import gradio as gr

from agent.errors import NotFoundError, PermissionDenied, ValidationError
from agent.store.api import RatingIn
from feedback_ui import stats
from feedback_ui.common import (
    NEGATIVE_REASONS,
    POSITIVE_REASONS,
    UIContext,
    text_input,
    to_chat,
    user_errors,
)

ROLE = "annotator"
SCORES = [("1 poor", 1), ("2", 2), ("3", 3), ("4", 4), ("5 excellent", 5)]
CHOICE_LABELS = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both bad"}
SHORTCUTS_HELP = (
    "Keys (outside text boxes): **1–5** score the next criterion, **Ctrl+Enter** submit, "
    "**S** skip, **U** undo; in pairs **A** / **B** / **T** tie / **X** both bad."
)


class AnnotateHandlers:
    """Event handlers of the Annotate tab. Each resolves and checks its caller first."""

    def __init__(self, ctx: UIContext) -> None:
        self.ctx = ctx
        self.criteria = list(ctx.settings.likert_criteria)

    # ---- shared ------------------------------------------------------------------------

    def progress(self, request: gr.Request) -> str:
        caller = self.ctx.caller(request, ROLE, "seeing annotation progress")
        p = stats.annotator_progress(
            self.ctx.store, caller.id, self.ctx.settings.annotation_overlap
        )
        return (
            f"**{caller.name}**: {p['items']} replies rated ({p['today']} today), "
            f"{p['comparisons']} pairs compared. {p['waiting']} replies still need ratings."
        )

    def _context(self, message_id: int) -> tuple[list[dict[str, str]], str]:
        """The branch up to the parent of `message_id`, and the conversation's system prompt."""
        branch = self.ctx.store.path(message_id)
        conv = self.ctx.store.get_conversation(branch[-1].conversation_id)
        return to_chat(branch[:-1]), conv.system_prompt

    # ---- Likert ------------------------------------------------------------------------

    @user_errors
    def next_item(self, request: gr.Request) -> tuple[Any, ...]:
        """Lease the next reply for this annotator and show it with its context."""
        caller = self.ctx.caller(request, ROLE, "annotating")
        s = self.ctx.settings
        items = self.ctx.store.next_for_annotation(
            caller.id, s.annotation_overlap, s.annotation_lease_s
        )
        return self._show_item(items[0].id if items else None, request)

    def _show_item(self, message_id: int | None, request: gr.Request) -> tuple[Any, ...]:
        blank_scores = [gr.update(value=None) for _ in self.criteria]
        if message_id is None:
            info = "**Nothing to rate right now.** Come back later, or compare pairs."
            return (None, [], "", info, *blank_scores, [], "", self.progress(request))
        context, system = self._context(message_id)
        reply = self.ctx.store.get_message(message_id)
        chat = [*context, {"role": "assistant", "content": reply.content}]
        info = f"Reply **#{message_id}**: rate the *last* assistant message."
        return (message_id, chat, system, info, *blank_scores, [], "", self.progress(request))

    @user_errors
    def submit(
        self,
        request: gr.Request,
        item_id: int | None,
        history: list[dict],
        reasons: list[str] | None,
        comment: str | None,
        *scores: int | None,
    ) -> tuple[Any, ...]:
        """Store one Likert rating per criterion (upserts), remember it for undo, serve the next.

        `request` comes first because Gradio injects it only among the positional parameters.
        """
        caller = self.ctx.caller(request, ROLE, "rating replies")
        if item_id is None:
            raise ValidationError("item: there is no reply on screen to rate; press Next")
        text_input("comment", comment or "", self.ctx.settings.max_text_chars, allow_empty=True)
        self._check_rateable(int(item_id), caller.id)
        for criterion, score in zip(self.criteria, scores, strict=True):
            if score is None:
                raise ValidationError(f"{criterion}: pick a score from 1 to 5")
        # One transaction for every criterion: two submits at once never mix their scores.
        tags, text = list(reasons or []), comment or ""
        self.ctx.store.set_ratings(
            [
                RatingIn(int(item_id), caller.id, "likert", int(score), criterion, tags, text)
                for criterion, score in zip(self.criteria, scores, strict=True)
            ]
        )
        history = [*history, {"kind": "likert", "message_id": int(item_id)}]
        return (history, *self.next_item(request))

    def _check_rateable(self, message_id: int, rater_id: int) -> None:
        msg = self.ctx.store.get_message(message_id)
        if msg.role != "assistant":
            raise ValidationError(f"item: message {message_id} is not an assistant reply")
        if self.ctx.store.get_conversation(msg.conversation_id).user_id == rater_id:
            raise PermissionDenied("item: annotators do not rate their own conversations")

    @user_errors
    def skip(self, item_id: int | None, request: gr.Request) -> tuple[Any, ...]:
        """Pass on this reply (never served to this annotator again) and serve the next."""
        caller = self.ctx.caller(request, ROLE, "annotating")
        if item_id is not None:
            self.ctx.store.skip_annotation(int(item_id), caller.id)
        return self.next_item(request)

    @user_errors
    def undo(self, history: list[dict], request: gr.Request) -> tuple[Any, ...]:
        """Take back the last judgement of this session and show that item again."""
        caller = self.ctx.caller(request, ROLE, "annotating")
        if not history:
            raise ValidationError("undo: nothing to undo in this session")
        last, history = history[-1], history[:-1]
        if last["kind"] == "likert":
            for criterion in self.criteria:
                self.ctx.store.delete_rating(last["message_id"], caller.id, "likert", criterion)
            gr.Info(f"Undid your rating of reply #{last['message_id']}.")
            return (history, *self._show_item(last["message_id"], request), *self._no_pair_change())
        mine = {c.id for c in self.ctx.store.comparisons(rater_id=caller.id)}
        if last["id"] not in mine:
            raise NotFoundError(f"undo: comparison {last['id']} is no longer there")
        self.ctx.store.delete_comparison(last["id"])
        gr.Info("Undid your last comparison.")
        pair = self._show_pair(last["a"], last["b"], request)[:-1]  # progress is in the item part
        return (history, *self._no_item_change(last["a"], request), *pair)

    def _no_item_change(self, _: int, request: gr.Request) -> tuple[Any, ...]:
        """Outputs of the Likert view left as they are, except the progress line."""
        return (*(gr.update() for _ in range(6 + len(self.criteria))), self.progress(request))

    def _no_pair_change(self) -> tuple[Any, ...]:
        """Outputs of the pair view (without progress) left as they are."""
        return tuple(gr.update() for _ in range(5))

    # ---- pairwise ----------------------------------------------------------------------

    @user_errors
    def next_pair(self, request: gr.Request) -> tuple[Any, ...]:
        """Two replies to the same context, in random order, without model names."""
        caller = self.ctx.caller(request, ROLE, "comparing replies")
        pair = self.ctx.store.next_pair_for_annotation(caller.id)
        if pair is None:
            return self._show_pair(None, None, request)
        a, b = pair if random.random() < 0.5 else pair[::-1]
        return self._show_pair(a.id, b.id, request)

    def _show_pair(
        self, a_id: int | None, b_id: int | None, request: gr.Request
    ) -> tuple[Any, ...]:
        if a_id is None or b_id is None:
            info = "**No pairs to compare right now.** Pairs appear when a turn has two replies."
            return (None, [], [], [], info, self.progress(request))
        context, _ = self._context(a_id)
        reply_a = [{"role": "assistant", "content": self.ctx.store.get_message(a_id).content}]
        reply_b = [{"role": "assistant", "content": self.ctx.store.get_message(b_id).content}]
        info = "Which reply is better as the next assistant turn?"
        return ({"a": a_id, "b": b_id}, context, reply_a, reply_b, info, self.progress(request))

    def vote(self, choice: str) -> Any:
        """A handler storing `choice` for the pair on screen, then serving the next pair."""

        @user_errors
        def handler(pair: dict | None, history: list[dict], request: gr.Request) -> tuple[Any, ...]:
            caller = self.ctx.caller(request, ROLE, "comparing replies")
            if not pair:
                raise ValidationError("pair: there is no pair on screen; press Next pair")
            self._check_rateable(pair["a"], caller.id)
            cid = self.ctx.store.add_comparison(caller.id, pair["a"], pair["b"], choice)
            history = [*history, {"kind": "comparison", "id": cid, "a": pair["a"], "b": pair["b"]}]
            return (history, *self.next_pair(request))

        handler.__name__ = f"vote_{choice}"
        return handler


def build_annotate_tab(ctx: UIContext) -> dict[str, Any]:
    """Lay out the Annotate tab inside the current Blocks and wire its events."""
    h = AnnotateHandlers(ctx)
    history = gr.State([])
    gr.Markdown(SHORTCUTS_HELP)
    progress = gr.Markdown(elem_id="ann-progress")
    with gr.Accordion("Guidelines", open=False):
        gr.Markdown(ctx.settings.guidelines)
    with gr.Tab("Rate replies"):
        item = gr.State(None)
        info = gr.Markdown(elem_id="ann-info")
        system = gr.Textbox(label="System prompt", interactive=False, lines=1)
        context = gr.Chatbot(
            label="Conversation", feedback_options=None, height=360, allow_tags=False
        )
        scores = [
            gr.Radio(
                SCORES, label=c.capitalize(), elem_id=f"ann-score-{i}", elem_classes="ann-score"
            )
            for i, c in enumerate(h.criteria)
        ]
        reasons = gr.CheckboxGroup(POSITIVE_REASONS + NEGATIVE_REASONS, label="Reasons (optional)")
        comment = gr.Textbox(label="Comment (optional)", lines=2, max_lines=6)
        with gr.Row():
            submit = gr.Button("Submit", variant="primary", elem_id="ann-submit")
            skip = gr.Button("Skip", elem_id="ann-skip")
            undo = gr.Button("Undo last", elem_id="ann-undo")
    with gr.Tab("Compare two replies"):
        pair = gr.State(None)
        pair_info = gr.Markdown(elem_id="pair-info")
        pair_context = gr.Chatbot(
            label="Conversation", feedback_options=None, height=300, allow_tags=False
        )
        with gr.Row():
            reply_a = gr.Chatbot(
                label="Reply A", feedback_options=None, height=220, allow_tags=False
            )
            reply_b = gr.Chatbot(
                label="Reply B", feedback_options=None, height=220, allow_tags=False
            )
        with gr.Row():
            vote_buttons = {
                c: gr.Button(label, elem_id=f"pair-{c.replace('_', '-')}")
                for c, label in CHOICE_LABELS.items()
            }
        with gr.Row():
            next_pair = gr.Button("Next pair", elem_id="pair-next")
            pair_undo = gr.Button("Undo last", elem_id="pair-undo")

    item_out = [item, context, system, info, *scores, reasons, comment, progress]
    pair_out = [pair, pair_context, reply_a, reply_b, pair_info, progress]
    submit.click(
        h.submit,
        [item, history, reasons, comment, *scores],
        [history, *item_out],
        api_name="annotate_submit",
        trigger_mode="once",
    )
    skip.click(h.skip, [item], item_out, api_name="annotate_skip")
    for name, button in (("annotate_undo", undo), ("annotate_undo_pair", pair_undo)):
        button.click(h.undo, [history], [history, *item_out, *pair_out[:-1]], api_name=name)
    next_pair.click(h.next_pair, None, pair_out, api_name="annotate_next_pair")
    for choice, button in vote_buttons.items():
        button.click(
            h.vote(choice),
            [pair, history],
            [history, *pair_out],
            api_name=f"annotate_vote_{choice}",
            trigger_mode="once",
        )
    return {"load_item": (h.next_item, item_out), "load_pair": (h.next_pair, pair_out)}
