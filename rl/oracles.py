"""Hidden preferences for simulated feedback: functions of (context, reply) -> score in [0, 1].

The simulation's annotators judge replies by an oracle; the reward model never sees it, so
a policy that scores higher *under the oracle* after SFT -> reward model -> PPO has learned
what the annotators wanted, not just how to please its own reward model.

`topic` and `feelings` depend on what a reply says, not on punctuation or length: whether it
picks up what the user talked about, and whether it asks how the user feels.

Any `module:function` with the same signature can be named on the command line.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from agent.errors import ConfigError

Chat = list[dict[str, str]]
Oracle = Callable[[Chat, str], float]

_WORD = re.compile(r"[a-z']+")
SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+")
"""Where `feelings` splits a reply into sentences (after . ! or ? and white space)."""
POSITIVE = frozenset(
    "good great glad happy love nice awesome wonderful fun thanks thank enjoy enjoyed cool "
    "amazing fantastic excellent yes sure beautiful interesting exciting like lovely".split()
)
NEGATIVE = frozenset(
    "bad sad hate no not never terrible awful boring sorry wrong ugly angry worst tired "
    "sick annoying horrible don't can't".split()
)


def follow_up(context: Chat, reply: str) -> float:
    """Asks a follow-up question: 1 when the reply contains a question, more when it ends with one."""
    text = reply.strip()
    if not text or "?" not in text:
        return 0.0
    return 1.0 if text.endswith("?") else 0.7


def positive(context: Chat, reply: str) -> float:
    """Positive wording: share of sentiment words that are positive, 0.5 when there are none."""
    words = _WORD.findall(reply.lower())
    pos = sum(w in POSITIVE for w in words)
    neg = sum(w in NEGATIVE for w in words)
    if not reply.strip():
        return 0.0
    return 0.5 if pos + neg == 0 else (pos + 0.5) / (pos + neg + 1.0)


def concise(context: Chat, reply: str) -> float:
    """Concise but not empty: 1 for 3-12 words, falling to 0 at 40 words."""
    n = len(reply.split())
    if n == 0:
        return 0.0
    if n < 3:
        return 0.5
    return max(0.0, min(1.0, (40 - n) / 28))


STOPWORDS = frozenset(
    "about after again also always because been before being could does doing down each from "
    "have having here into just like make more most much only other over really some than that "
    "their them then there these they thing things this those through very want well were what "
    "when where which while will with would your yours you'll you're i'm it's that's don't "
    "today yesterday tomorrow lot lots".split()
)
FEELINGS = frozenset(
    "feel feels feeling feelings felt happy sad glad upset excited nervous worried anxious "
    "afraid scared angry lonely stressed tired proud mood emotions emotional okay ok".split()
)


def _content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if len(w) >= 4 and w not in STOPWORDS}


def topic(context: Chat, reply: str) -> float:
    """Picks up a topic the user named: the share of the last user turn's content words (4+
    letters, not stop words) that the reply repeats, counting two as full marks; 0.5 when the
    user named none (nothing to pick up)."""
    users = [m["content"] for m in context if m["role"] == "user"]
    named = _content_words(users[-1]) if users else set()
    if not reply.strip():
        return 0.0
    if not named:
        return 0.5
    return min(1.0, len(named & _content_words(reply)) / min(2, len(named)))


def feelings(context: Chat, reply: str) -> float:
    """Asks about the user's feelings: 1 for a question that names a feeling ("How do you feel
    about it?", "Are you excited?"), 0.5 for naming one without asking, else 0."""
    sentences = SENTENCE_BREAK.split(reply.strip())
    for sentence in sentences:
        if sentence.endswith("?") and set(_WORD.findall(sentence.lower())) & FEELINGS:
            return 1.0
    return 0.5 if set(_WORD.findall(reply.lower())) & FEELINGS else 0.0


BUILTIN: dict[str, Oracle] = {
    "follow_up": follow_up,
    "positive": positive,
    "concise": concise,
    "topic": topic,
    "feelings": feelings,
}


def load_oracle(name: str) -> tuple[str, Oracle]:
    """A built-in oracle by name, or any `module:function`; returns (name, function)."""
    if name in BUILTIN:
        return name, BUILTIN[name]
    if ":" not in name:
        raise ConfigError(
            f"oracle: {name!r} is neither a built-in ({', '.join(BUILTIN)}) nor module:function"
        )
    module_name, func_name = name.split(":", 1)
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"oracle: cannot import {name!r}: {exc}") from exc
    if not callable(func):
        raise ConfigError(f"oracle: {name!r} is not callable")
    return name, func
