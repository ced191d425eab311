"""Hidden preferences for simulated feedback: functions of (context, reply) -> score in [0, 1].

The simulation's annotators judge replies by an oracle; the reward model never sees it, so
a policy that scores higher *under the oracle* after SFT -> reward model -> PPO has learned
what the annotators wanted, not just how to please its own reward model.

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


BUILTIN: dict[str, Oracle] = {"follow_up": follow_up, "positive": positive, "concise": concise}


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
