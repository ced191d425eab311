"""The chat agent: multi-turn chat on the deployed policy, streamed, with every turn logged.

    agent = ChatAgent(store, settings)
    conv = agent.new_conversation(user_id)
    for chunk in agent.stream_reply(conv, "hi there!"):
        print(chunk.delta, end="")          # the last chunk has done=True and both message ids

Each turn stores the user message as generation starts (before the first chunk) and the
assistant message after the last token, with the model version, sampling parameters, prompt and
reply token counts, time to first token and latency. A failed generation still stores the user message and an assistant message with the
error. History longer than the model's context window is cut from the oldest turns.

Hot deploy: every turn asks the store which version is deployed (one query). When it changed,
the agent resolves the new version; on the same base only the LoRA adapters are swapped
(`Policy.set_adapters`), a different base is loaded next to the old one (at most `max_bases`
bases stay in memory, least recently used dropped first). `version_id=` serves a candidate that
is not deployed (the arena) the same way. Generation on one base is serialised by a lock, so
adapters can be switched between turns safely: concurrent turns on one base wait their turn.

Beam search (num_beams > 1) is not streamed: the reply arrives as one chunk when complete.
Decoding itself (`SamplingParams`, streaming, stopping) lives in `agent.generation`.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import Settings
from agent.errors import NotFoundError, ValidationError
from agent.generation import (
    SAMPLING_RANGES,
    SamplingParams,
    fit_prompt,
    generate_batch,
    stream_generate,
)
from agent.modeling import Policy
from agent.registry import ModelRegistry, PolicySpec
from agent.store.api import Store, check_text
from agent.store.models import Message

__all__ = ["SAMPLING_RANGES", "BatchRequest", "ChatAgent", "ReplyChunk", "SamplingParams"]

log = logging.getLogger(__name__)


@dataclass
class BatchRequest:
    """One turn of `ChatAgent.reply_batch`: a new user turn, or a regenerated reply."""

    conversation_id: int = 0
    """The conversation of a new user turn (ignored with regenerate_id)."""
    text: str | None = None
    """The new user turn's text (ignored with regenerate_id)."""
    parent_id: int | None = None
    """The assistant reply the new turn follows (None: the newest leaf)."""
    regenerate_id: int | None = None
    """Instead of a new turn: an assistant reply to write a sibling of."""


@dataclass
class ReplyChunk:
    """One step of a streamed reply. Concatenating every chunk's `delta` gives `text`."""

    text: str
    """The reply so far."""
    delta: str
    """Text added since the previous chunk."""
    done: bool
    """True on the last chunk, which comes after the assistant message is stored."""
    user_message_id: int | None
    """The user message this replies to."""
    assistant_message_id: int | None
    """The stored reply (set on the last chunk only)."""
    model_version_id: int | None
    """The policy version that wrote the reply."""
    error: str | None = None
    """Why generation failed (last chunk only); the partial reply, if any, is in `text`."""


@dataclass
class _Turn:
    """Everything a turn needs, prepared (and validated) before anything is stored."""

    conversation_id: int
    parent_id: int | None
    text: str
    user_message_id: int | None
    version_id: int
    spec: PolicySpec
    policy: Policy
    lock: threading.Lock
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams


class ChatAgent:
    """Chat on the deployed policy (or a given version), logging every turn to the store."""

    def __init__(
        self, store: Store, settings: Settings, *, device: str | None = None, max_bases: int = 2
    ) -> None:
        self.store = store
        self.settings = settings
        self.device = device
        self.max_bases = max_bases
        self.registry = ModelRegistry(store, settings)
        self._policies: OrderedDict[str, tuple[Policy, threading.Lock]] = OrderedDict()
        self._specs: dict[int, PolicySpec] = {}
        self._load_lock = threading.Lock()

    def new_conversation(
        self,
        user_id: int,
        system_prompt: str | None = None,
        source: str = "chat",
        meta: dict[str, Any] | None = None,
    ) -> int:
        """A new conversation; `system_prompt` None takes the settings' default."""
        prompt = self.settings.system_prompt if system_prompt is None else system_prompt
        return self.store.create_conversation(user_id, prompt, source=source, meta=meta)

    # ---- turns -------------------------------------------------------------------------

    def stream_reply(
        self,
        conversation_id: int,
        text: str,
        *,
        parent_id: int | None = None,
        sampling: SamplingParams | None = None,
        version_id: int | None = None,
        stop_event: threading.Event | None = None,
    ) -> Iterator[ReplyChunk]:
        """Store `text` as a user turn under `parent_id` and stream the reply to it.

        `parent_id` None continues after the newest leaf of the conversation. Bad input raises
        here, before anything is stored; the user message is stored when iteration starts.
        """
        turn = self._new_turn(conversation_id, text, parent_id, sampling, version_id)
        return self._run(turn, stop_event)

    def regenerate(
        self,
        assistant_message_id: int,
        *,
        sampling: SamplingParams | None = None,
        version_id: int | None = None,
        stop_event: threading.Event | None = None,
    ) -> Iterator[ReplyChunk]:
        """A new reply next to `assistant_message_id` (a sibling under the same user message)."""
        turn = self._regenerated_turn(assistant_message_id, sampling, version_id)
        return self._run(turn, stop_event)

    def reply(self, conversation_id: int, text: str, **kwargs: Any) -> ReplyChunk:
        """`stream_reply` without streaming: the final chunk."""
        *_, last = self.stream_reply(conversation_id, text, **kwargs)
        return last

    def reply_batch(
        self,
        requests: Sequence[BatchRequest],
        *,
        sampling: SamplingParams | None = None,
        version_id: int | None = None,
    ) -> list[ReplyChunk]:
        """Replies to many turns with one left-padded `generate` call, each stored as a turn.

        Each request is prepared exactly as `stream_reply` / `regenerate` prepare theirs (same
        history, template, context fitting and validation, all before anything is stored),
        and every reply is stored with the same fields; the batch shares one sampler seed, the
        shortest `max_new_tokens` of its rows, and its latency (no time to first token).
        """
        turns = [
            self._regenerated_turn(r.regenerate_id, sampling, version_id)
            if r.regenerate_id is not None
            else self._new_turn(r.conversation_id, r.text or "", r.parent_id, sampling, version_id)
            for r in requests
        ]
        if not turns:
            return []
        if len({t.version_id for t in turns}) > 1:
            raise ValidationError("requests: a batch is served by one model version")
        user_ids = [
            t.user_message_id
            or self.store.append_message(t.conversation_id, "user", t.text, t.parent_id)
            for t in turns
        ]
        first = turns[0]
        with first.lock:
            self._activate(first.policy, first.version_id, first.spec)
            try:
                replies = generate_batch(
                    first.policy,
                    [t.prompt_ids for t in turns],
                    first.sampling,
                    max_new_tokens=min(t.max_new_tokens for t in turns),
                )
                error = None
            except Exception as exc:  # recorded on every reply of the batch, as in a turn
                log.exception("batched generation failed")
                replies, error = [("", {})] * len(turns), f"{type(exc).__name__}: {exc}"
        chunks = []
        for turn, user_id, (text, stats) in zip(turns, user_ids, replies, strict=True):
            reply_id = self._store_reply(turn, user_id, text, error, stats)
            chunks.append(ReplyChunk(text, text, True, user_id, reply_id, turn.version_id, error))
        return chunks

    def generate(
        self,
        messages: list[dict[str, str]],
        sampling: SamplingParams | None = None,
        version_id: int | None = None,
    ) -> str:
        """The reply to `messages` (ending with a user turn), with no DB writes."""
        if not messages or messages[-1].get("role") != "user":
            raise ValidationError("messages: give a list of chat messages ending with a user turn")
        for i, m in enumerate(messages):
            if m.get("role") not in ("system", "user", "assistant"):
                raise ValidationError(f"messages[{i}].role: {m.get('role')!r} is not a chat role")
            check_text(f"messages[{i}].content", m.get("content"), self.settings.max_text_chars)
        turn = self._prepare(0, None, messages, None, sampling, version_id)
        return "".join(self._stream_tokens(turn, None, {}))

    def policy(self, version_id: int | None = None) -> Policy:
        """The loaded policy serving `version_id` (default: the deployed one), adapters active.

        For evaluation and benchmarks; generating on it directly bypasses the turn lock.
        """
        version_id, spec = self._resolve(version_id)
        return self._policy(version_id, spec)[0]

    # ---- preparing a turn --------------------------------------------------------------

    def _new_turn(
        self,
        conversation_id: int,
        text: str,
        parent_id: int | None,
        sampling: SamplingParams | None,
        version_id: int | None,
    ) -> _Turn:
        """A user turn `text` after `parent_id` (None: after the newest leaf), prepared."""
        check_text("text", text, self.settings.max_text_chars)
        conv = self.store.get_conversation(conversation_id)
        rows = {m.id: m for m in self.store.messages(conversation_id)}
        if parent_id is None:  # after the newest leaf
            parents = {m.parent_id for m in rows.values()}
            parent_id = max((i for i in rows if i not in parents), default=None)
        elif parent_id not in rows or rows[parent_id].role != "assistant":
            raise ValidationError(
                f"parent_id: message {parent_id} is not an assistant reply in conversation "
                f"{conversation_id}"
            )
        messages = self._history(conv.system_prompt, rows, parent_id)
        messages.append({"role": "user", "content": text})
        return self._prepare(conversation_id, parent_id, messages, None, sampling, version_id)

    def _regenerated_turn(
        self, assistant_message_id: int, sampling: SamplingParams | None, version_id: int | None
    ) -> _Turn:
        """The turn that `assistant_message_id` replied to, prepared for a sibling reply."""
        old = self.store.get_message(assistant_message_id)
        if old.role != "assistant" or old.parent_id is None:
            raise ValidationError(
                f"assistant_message_id: message {assistant_message_id} is not a reply to a user"
            )
        conv = self.store.get_conversation(old.conversation_id)
        rows = {m.id: m for m in self.store.messages(conv.id)}
        user = rows[old.parent_id]
        messages = self._history(conv.system_prompt, rows, user.parent_id)
        messages.append({"role": "user", "content": user.content})
        return self._prepare(conv.id, user.parent_id, messages, user.id, sampling, version_id)

    def _prepare(
        self,
        conversation_id: int,
        parent_id: int | None,
        messages: list[dict[str, str]],
        user_message_id: int | None,
        sampling: SamplingParams | None,
        version_id: int | None,
    ) -> _Turn:
        sampling = sampling or SamplingParams()
        sampling.validate()
        version_id, spec = self._resolve(version_id)
        policy, lock = self._policy(version_id, spec)
        prompt_ids, max_new = fit_prompt(policy, messages, sampling.max_new_tokens)
        return _Turn(
            conversation_id=conversation_id,
            parent_id=parent_id,
            text=messages[-1]["content"],
            user_message_id=user_message_id,
            version_id=version_id,
            spec=spec,
            policy=policy,
            lock=lock,
            prompt_ids=prompt_ids,
            max_new_tokens=max_new,
            sampling=sampling,
        )

    def _resolve(self, version_id: int | None) -> tuple[int, PolicySpec]:
        """The version to serve (the deployed one unless given) and what to load for it."""
        if version_id is None:
            deployed = self.store.deployed_version()
            if deployed is None:
                raise NotFoundError(
                    "no model is deployed: run `rlchat starter ensure` to fetch and deploy the "
                    "default model (SmolLM2), or `rlchat models deploy ID`"
                )
            version_id = deployed.id
        if version_id not in self._specs:
            self._specs[version_id] = self.registry.resolve(version_id)
        return version_id, self._specs[version_id]

    def _policy(self, version_id: int, spec: PolicySpec) -> tuple[Policy, threading.Lock]:
        """The loaded base of `spec` with its adapters active (loading the base if new)."""
        with self._load_lock:
            if spec.base not in self._policies:
                policy = Policy(spec.base, device=self.device)
                self._policies[spec.base] = (policy, threading.Lock())
                while len(self._policies) > self.max_bases:
                    self._policies.popitem(last=False)
            self._policies.move_to_end(spec.base)
            policy, lock = self._policies[spec.base]
        if policy.adapters != _resolved(spec.adapters):  # a switch: load and check them now
            with lock:  # (waits for a turn in progress on this base)
                self._activate(policy, version_id, spec)
        return policy, lock

    @staticmethod
    def _activate(policy: Policy, version_id: int, spec: PolicySpec) -> None:
        wanted = _resolved(spec.adapters)
        if policy.adapters == wanted:
            return
        try:
            policy.set_adapters(wanted)
        except (ValidationError, NotFoundError) as exc:
            raise type(exc)(
                f"model version {version_id} cannot be served: {exc}. Deploy another version "
                "or run `rlchat models rollback`"
            ) from exc

    @staticmethod
    def _history(
        system_prompt: str, rows: dict[int, Message], parent_id: int | None
    ) -> list[dict[str, str]]:
        """The system prompt and the branch down to `parent_id`; empty (failed) replies left out."""
        branch: list[Message] = []
        while parent_id is not None:
            branch.append(rows[parent_id])
            parent_id = rows[parent_id].parent_id
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages += [{"role": m.role, "content": m.content} for m in branch[::-1] if m.content]
        return messages

    # ---- generating --------------------------------------------------------------------

    def _run(self, turn: _Turn, stop_event: threading.Event | None) -> Iterator[ReplyChunk]:
        """Store the user message, stream the reply, store it (also when stopped or failed).

        The user message is written while the model reads the prompt, so the write does not
        delay the first token; it is stored before any chunk is yielded.
        """
        user_id = turn.user_message_id

        def store_user_message() -> None:
            nonlocal user_id
            if user_id is None:
                user_id = self.store.append_message(
                    turn.conversation_id, "user", turn.text, turn.parent_id
                )

        stats: dict[str, Any] = {}
        text, error = "", None
        try:
            with closing(
                self._stream_tokens(turn, stop_event, stats, store_user_message)
            ) as deltas:
                for delta in deltas:
                    text += delta
                    yield ReplyChunk(text, delta, False, user_id, None, turn.version_id)
        except Exception as exc:  # a failed generation is recorded, not raised
            if user_id is None:  # the user message could not be stored: nothing to attach to
                raise
            log.exception("generation failed (conversation %d)", turn.conversation_id)
            error = f"{type(exc).__name__}: {exc}"
        finally:  # also when the consumer stops iterating early: the partial reply is kept
            if user_id is not None:
                reply_id = self._store_reply(turn, user_id, text, error, stats)
        yield ReplyChunk(text, "", True, user_id, reply_id, turn.version_id, error)

    def _store_reply(
        self, turn: _Turn, user_id: int, text: str, error: str | None, stats: dict[str, Any]
    ) -> int:
        if not text.strip() and error is None:
            error = "empty reply: the model ended its turn (or was stopped) before any text"
        return self.store.append_message(
            turn.conversation_id,
            "assistant",
            text[: self.store.max_text_chars],
            user_id,
            model_version_id=turn.version_id,
            sampling=turn.sampling.to_dict(),
            prompt_tokens=len(turn.prompt_ids),
            completion_tokens=stats.get("completion_tokens", 0),
            ttft_ms=stats.get("ttft_ms"),
            latency_ms=stats.get("latency_ms"),
            error=error,
        )

    def _stream_tokens(
        self,
        turn: _Turn,
        stop_event: threading.Event | None,
        stats: dict[str, Any],
        on_start: Callable[[], None] | None = None,
    ) -> Iterator[str]:
        """The reply's text deltas, generated while holding the base's lock."""
        with turn.lock:
            self._activate(turn.policy, turn.version_id, turn.spec)
            yield from stream_generate(
                turn.policy,
                turn.prompt_ids,
                turn.sampling,
                max_new_tokens=turn.max_new_tokens,
                stop_events=[] if stop_event is None else [stop_event],
                stats=stats,
                on_start=on_start,
            )


def _resolved(adapters: list[str]) -> list[str]:
    """Adapter directories as `Policy.adapters` lists them."""
    return [str(Path(a).resolve()) for a in adapters]
