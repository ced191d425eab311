"""The Arena tab: two policies answer the same message side by side, anonymously; the user votes.

By default the newest candidate policy (an sft or ppo version not deployed yet) meets the
deployed one; an admin may pick any two policy versions. Each turn draws a seed that decides
which version is A (left) and which is B (right), and seeds both replies' sampling, so the two
are decoded with the same random stream. The mapping lives in the session state, which Gradio
keeps on the server: the page receives the replies only, never the versions, until the vote.

Reply A is `ChatAgent.stream_reply(..., version_id=A)`; reply B is `ChatAgent.regenerate(A's
reply, version_id=B)`, a sibling under the same user message, so the pair is a comparison like
any other: `Store.add_comparison(rater, reply A, reply B, choice)`, an upsert (voting again on
the same turn changes the vote). Every reply records its model version, which ties the
comparison to both versions. Conversations have source "arena"; the next message continues
from the preferred reply (A after a tie, "both bad" or no vote).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from agent.chat import SamplingParams
from agent.errors import NotFoundError, PermissionDenied, ValidationError
from agent.registry import ADAPTER_KINDS
from agent.store.api import POLICY_KINDS
from agent.store.models import ModelVersion
from feedback_ui.auth import Caller
from feedback_ui.common import (
    StopFlags,
    UIContext,
    number_component,
    number_input,
    text_input,
    to_chat,
    user_errors,
    whole_input,
)

ROLE = "user"
CHOICE_LABELS = {
    "a": "👈 A is better",
    "b": "👉 B is better",
    "tie": "🤝 Tie",
    "both_bad": "👎 Both bad",
}
NO_CANDIDATE = (
    "No candidate to compare yet: the arena pits the newest candidate policy (an SFT or PPO "
    "version that is not deployed) against the deployed one. Train one with `rlchat train sft` "
    "(or `rlchat pipeline`), then come back."
)
INTRO = (
    "Two anonymous models answer each message side by side. Vote for the better reply to see "
    "which model was which."
)


@dataclass
class _Plan:
    """One arena turn, checked and decided before anything is stored."""

    conversation_id: int
    parent_id: int | None
    """The reply the new user message follows (None: the first turn)."""
    shared: list[dict[str, str]]
    """What both columns show before the replies: the branch so far and the new message."""
    sides: tuple[int, int]
    """(version shown as A, version shown as B)."""
    seed: int
    """This turn's seed: it picked the sides and seeds both replies' sampling."""
    sampling: SamplingParams
    """Decoding of both replies (the same for A and B)."""


def empty_state() -> dict[str, Any]:
    """No round yet: the first message starts a conversation."""
    return {"conversation_id": None, "turn": None}


def assign_sides(versions: tuple[int, int], seed: int) -> tuple[int, int]:
    """(version shown as A, version shown as B): a fair coin flip drawn from `seed`."""
    return versions if random.Random(seed).random() < 0.5 else (versions[1], versions[0])


def describe(mv: ModelVersion) -> str:
    """A version as the reveal and the admin's picker show it."""
    name = f" “{mv.name}”" if mv.name else ""
    return f"v{mv.id} {mv.kind}{name} ({mv.status})"


class ArenaHandlers:
    """Event handlers of the Arena tab. Each resolves its caller and checks the role first."""

    def __init__(self, ctx: UIContext, seed: int | None = None) -> None:
        self.ctx = ctx
        self._rng = random.Random(seed)  # draws each turn's seed; None: from the OS
        self._stops = StopFlags()  # (user, session) -> stop flag of its turn

    # ---- helpers -----------------------------------------------------------------------

    def default_pair(self) -> tuple[int, int]:
        """(newest candidate policy, deployed policy), or a NotFoundError saying what to do."""
        versions = self.ctx.store.list_model_versions()
        deployed = [v for v in versions if v.status == "deployed"]
        if not deployed:
            raise NotFoundError(
                "arena: no model is deployed; an admin deploys one with `rlchat models deploy ID`"
            )
        candidates = [v for v in versions if v.kind in ADAPTER_KINDS and v.status == "candidate"]
        if not candidates:
            raise NotFoundError(f"arena: {NO_CANDIDATE}")
        return candidates[-1].id, deployed[0].id

    def _versions(self, caller: Caller, pick_a: Any, pick_b: Any) -> tuple[int, int]:
        """The two versions of this turn: the default pair, or the admin's picks."""
        picks = [p for p in (pick_a, pick_b) if p not in (None, "")]
        if not picks:
            return self.default_pair()
        caller.require("admin", "choosing the arena's versions")
        if len(picks) != 2:
            raise ValidationError("versions: pick both versions, or neither for the default pair")
        a, b = int(picks[0]), int(picks[1])
        if a == b:
            raise ValidationError(f"versions: both picks are version {a}; pick two different ones")
        for version_id in (a, b):
            mv = self.ctx.store.get_model_version(version_id)
            if mv.kind not in POLICY_KINDS:
                raise ValidationError(
                    f"versions: version {mv.id} is a {mv.kind} model, not a policy "
                    f"({', '.join(POLICY_KINDS)})"
                )
        return a, b

    def _own(self, caller: Caller, conversation_id: int) -> None:
        if self.ctx.store.get_conversation(conversation_id).user_id != caller.id:
            raise PermissionDenied(
                f"conversation {conversation_id} belongs to another user; start your own round"
            )

    def _agent(self) -> Any:
        if self.ctx.agent is None:
            raise ValidationError("arena: this server runs without a chat model; ask an admin")
        return self.ctx.agent

    def _reveal(self, turn: dict[str, Any], choice: str) -> str:
        a, b = (self.ctx.store.get_model_version(turn["versions"][side]) for side in "ab")
        label = CHOICE_LABELS[choice].split(" ", 1)[1]
        return (
            f"Saved: **{label}**. A was **{describe(a)}**, B was **{describe(b)}**.\n\n"
            "Vote again to change your vote; send a message to go on from the reply you "
            "preferred, or start a new round."
        )

    # ---- events ------------------------------------------------------------------------

    @user_errors
    def load(self, request: gr.Request) -> tuple[Any, ...]:
        """What the tab says on opening, and the version pickers for admins."""
        caller = self.ctx.caller(request, ROLE, "using the arena")
        try:
            self.default_pair()
            info = INTRO
        except NotFoundError as exc:
            info = f"**{str(exc).removeprefix('arena: ')}**"
        admin = caller.can("admin")
        choices = []
        if admin:
            info += "\n\nAs an admin you may pick any two policy versions under *Choose versions*."
            policies = [v for v in self.ctx.store.list_model_versions() if v.kind in POLICY_KINDS]
            choices = [(describe(v), v.id) for v in reversed(policies)]
        pick = gr.update(choices=choices, value=None)
        return info, gr.update(visible=admin), pick, pick

    def _plan(
        self, caller: Caller, state: dict, text: str, picks: tuple[Any, Any],
        temperature: float, max_new_tokens: float,
    ) -> _Plan:  # fmt: skip
        """Check everything and pick sides before anything is stored."""
        agent = self._agent()
        text_input("message", text or "", self.ctx.settings.max_text_chars)
        max_new_tokens = whole_input("max new tokens", max_new_tokens)
        temperature = number_input("temperature", temperature)
        versions = self._versions(caller, *picks)
        seed = self._rng.getrandbits(32)
        sampling = SamplingParams(
            max_new_tokens=int(max_new_tokens), temperature=temperature, seed=seed
        )
        sampling.validate()
        for version_id in versions:  # fail now if one of them cannot be served
            agent.policy(version_id)
        conv_id, turn = state["conversation_id"], state["turn"]
        if conv_id is None:
            conv_id = agent.new_conversation(caller.id, source="arena")
        else:
            self._own(caller, conv_id)
        parent = None if turn is None else turn["b" if turn["choice"] == "b" else "a"]
        history = to_chat(self.ctx.store.path(parent)) if parent else []
        shared = [*history, {"role": "user", "content": text}]
        return _Plan(conv_id, parent, shared, assign_sides(versions, seed), seed, sampling)

    @user_errors
    def send(
        self,
        state: dict,
        text: str,
        pick_a: Any,
        pick_b: Any,
        temperature: float,
        max_new_tokens: float,
        request: gr.Request,
    ) -> Iterator[tuple[Any, ...]]:
        """Both models answer `text`, A streamed first; outputs (state, A, B, info, textbox, votes)."""
        caller = self.ctx.caller(request, ROLE, "using the arena")
        plan = self._plan(caller, state, text, (pick_a, pick_b), temperature, max_new_tokens)
        agent, flag, shared = self._agent(), self._stops.new(caller, request), plan.shared
        waiting = "Both models are answering…"
        yield state, shared, shared, waiting, "", gr.update(visible=False)
        with self.ctx.store.discarding_if_empty(plan.conversation_id, new=plan.parent_id is None):
            chunks = agent.stream_reply(
                plan.conversation_id, text, parent_id=plan.parent_id, sampling=plan.sampling,
                version_id=plan.sides[0], stop_event=flag,
            )  # fmt: skip
        for first in chunks:
            reply_a = [*shared, {"role": "assistant", "content": first.text}]
            yield state, reply_a, shared, waiting, gr.update(), gr.update()
        chunks = agent.regenerate(
            first.assistant_message_id, sampling=plan.sampling, version_id=plan.sides[1],
            stop_event=flag,
        )  # fmt: skip
        for second in chunks:
            reply_b = [*shared, {"role": "assistant", "content": second.text}]
            yield state, reply_a, reply_b, waiting, gr.update(), gr.update()
        if first.error or second.error:
            gr.Warning("A reply was cut short by an error; you can still vote on what is there.")
        turn = {
            "a": first.assistant_message_id,
            "b": second.assistant_message_id,
            "versions": {"a": plan.sides[0], "b": plan.sides[1]},
            "seed": plan.seed,
            "choice": None,
        }
        state = {"conversation_id": plan.conversation_id, "turn": turn}
        info = "Which reply is better? Vote to see which model was which."
        yield state, reply_a, reply_b, info, gr.update(), gr.update(visible=True)

    def vote(self, choice: str) -> Any:
        """A handler storing `choice` for the turn on screen and revealing the two versions."""

        @user_errors
        def handler(state: dict, request: gr.Request) -> tuple[Any, ...]:
            caller = self.ctx.caller(request, ROLE, "voting in the arena")
            turn = state["turn"]
            if not turn:
                raise ValidationError("vote: there are no two replies to vote on; send a message")
            self._own(caller, state["conversation_id"])
            self.ctx.store.add_comparison(caller.id, turn["a"], turn["b"], choice)
            state = {**state, "turn": {**turn, "choice": choice}}
            return state, self._reveal(turn, choice)

        handler.__name__ = f"vote_{choice}"
        return handler

    @user_errors
    def stop(self, request: gr.Request) -> None:
        """Stop the caller's turn in this session; what both models wrote so far is kept."""
        self._stops.stop(self.ctx.caller(request, ROLE, "using the arena"), request)

    @user_errors
    def new_round(self, request: gr.Request) -> tuple[Any, ...]:
        """Clear the screen; the next message starts a new arena conversation."""
        self.ctx.caller(request, ROLE, "using the arena")
        return empty_state(), [], [], INTRO, gr.update(visible=False)


def build_arena_tab(ctx: UIContext, concurrency: int) -> dict[str, Any]:
    """Lay out the Arena tab inside the current Blocks and wire its events."""
    h = ArenaHandlers(ctx)
    state = gr.State(empty_state())
    info = gr.Markdown(INTRO, elem_id="arena-info")
    with gr.Row():
        bots = [
            gr.Chatbot(
                label=f"Model {side}",
                height=420,
                allow_tags=False,
                feedback_options=None,
                elem_id=f"arena-{side.lower()}",
            )
            for side in "AB"
        ]
    with gr.Row(visible=False) as votes:
        buttons = {
            c: gr.Button(label, elem_id=f"arena-vote-{c.replace('_', '-')}")
            for c, label in CHOICE_LABELS.items()
        }
    with gr.Row():
        text = gr.Textbox(
            placeholder="Type a message; two anonymous models answer", show_label=False,
            scale=6, max_lines=8, elem_id="arena-input",
        )  # fmt: skip
        send = gr.Button("Send", variant="primary", scale=1, elem_id="arena-send")
        stop = gr.Button("Stop", variant="stop", scale=1, elem_id="arena-stop")
        new = gr.Button("New round", scale=1, elem_id="arena-new")
    with gr.Accordion("Settings", open=False):
        temperature = gr.Slider(0, 2, 0.8, step=0.05, label="Temperature")
        max_new = gr.Slider(8, 1024, 128, step=8, label="Max new tokens")
    for slider in (temperature, max_new):
        number_component(slider, str(slider.label).lower())
    with gr.Accordion("Choose versions (admins)", open=False, visible=False) as admin_box:
        picks = [gr.Dropdown(label=f"Version {i}", choices=[], value=None) for i in (1, 2)]

    gr.on(
        [send.click, text.submit], h.send, [state, text, *picks, temperature, max_new],
        [state, *bots, info, text, votes], api_name="arena_send",
        concurrency_id="generate", concurrency_limit=concurrency,
    )  # fmt: skip
    for choice, button in buttons.items():
        button.click(h.vote(choice), [state], [state, info], api_name=f"arena_vote_{choice}")
    stop.click(h.stop, None, None, api_name="arena_stop", concurrency_limit=None, queue=False)
    new.click(h.new_round, None, [state, *bots, info, votes], api_name="arena_new")
    return {"load": (h.load, [info, admin_box, *picks])}
