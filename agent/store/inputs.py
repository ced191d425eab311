"""What callers hand the store's write path, and the checks that need no database.

`check_*` turn an item into the bind parameters of its statement, or raise a
`ValidationError` naming the field and the limit, before anything is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.errors import ValidationError
from agent.store.models import CHOICES, MESSAGE_ROLES, utcnow

LIKERT_RANGE = (1, 5)
MAX_REASON_CHARS = 200


def check_text(field: str, value: str, max_chars: int, allow_empty: bool = False) -> str:
    """`value` if it is a string within limits; otherwise a `ValidationError` naming `field`."""
    if not isinstance(value, str):
        raise ValidationError(f"{field}: expected text, got {type(value).__name__}")
    if "\x00" in value:
        raise ValidationError(f"{field}: contains a NUL character (\\x00), which is not allowed")
    if not allow_empty and not value.strip():
        raise ValidationError(f"{field}: must not be empty")
    if len(value) > max_chars:
        raise ValidationError(
            f"{field}: {len(value):,} characters is over the limit of {max_chars:,}"
        )
    return value


# ---- what callers hand in ----------------------------------------------------------------


@dataclass(frozen=True)
class RatingIn:
    """One rater's judgement of one assistant reply (see `Store.set_rating`)."""

    message_id: int
    """The assistant message rated."""
    rater_id: int
    """The user who rates."""
    kind: str
    """"thumb" (value ±1) or "likert" (integer 1..5 on `criterion`)."""
    value: float
    """+1/-1 for a thumb, 1..5 for a Likert score."""
    criterion: str = ""
    """The Likert criterion (e.g. "helpfulness"); ignored for thumbs."""
    reasons: Sequence[str] = ()
    """Short tags the rater picked (each up to 200 characters)."""
    comment: str = ""
    """Free text from the rater."""


@dataclass(frozen=True)
class ComparisonIn:
    """One rater's preference between two replies to the same parent."""

    rater_id: int
    """The user who compares."""
    message_a_id: int
    """Reply shown as A."""
    message_b_id: int
    """Reply shown as B (a sibling of A)."""
    choice: str
    """One of a / b / tie / both_bad."""
    comment: str = ""
    """Free text from the rater."""


@dataclass(frozen=True)
class MessageIn:
    """One turn appended under `parent_id` (None: a first turn) of a conversation."""

    conversation_id: int
    """The conversation the turn belongs to."""
    role: str
    """system / user / assistant."""
    content: str
    """The text (may be empty only for a failed generation, which has `error`)."""
    parent_id: int | None = None
    """The message this one follows, in the same conversation; None for a first turn."""
    model_version_id: int | None = None
    """The policy version that wrote an assistant reply."""
    sampling: dict[str, Any] | None = None
    """Sampling parameters of an assistant reply."""
    prompt_tokens: int | None = None
    """Prompt length in tokens."""
    completion_tokens: int | None = None
    """Reply length in tokens."""
    ttft_ms: float | None = None
    """Time to the first token."""
    latency_ms: float | None = None
    """Time for the whole reply."""
    error: str | None = None
    """Why generation failed, for a failed reply."""


def check_rating(item: RatingIn, max_chars: int) -> dict[str, Any]:
    """The bind parameters of a valid rating; `ValidationError` naming the bad field otherwise."""
    kind, value, criterion = item.kind, item.value, item.criterion
    if kind == "thumb":
        if isinstance(value, bool) or value not in (1, -1):
            raise ValidationError(f"value: a thumb is +1 or -1, got {value!r}")
        criterion = ""
    elif kind == "likert":
        lo, hi = LIKERT_RANGE
        if not criterion:
            raise ValidationError("criterion: a likert rating needs a criterion")
        check_text("criterion", criterion, 64)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or value != int(value)
            or not lo <= value <= hi
        ):
            raise ValidationError(f"value: a likert rating is an integer {lo}..{hi}, got {value!r}")
    else:
        raise ValidationError(f"kind: {kind!r} is not one of thumb, likert")
    check_text("comment", item.comment, max_chars, allow_empty=True)
    reasons = [check_text("reasons", r, MAX_REASON_CHARS) for r in item.reasons]
    return dict(
        message_id=item.message_id,
        rater_id=item.rater_id,
        kind=kind,
        criterion=criterion,
        value=float(value),
        reasons=reasons,
        comment=item.comment,
        now=utcnow(),
    )


def check_comparison(item: ComparisonIn, max_chars: int) -> dict[str, Any]:
    if item.choice not in CHOICES:
        raise ValidationError(f"choice: {item.choice!r} is not one of {', '.join(CHOICES)}")
    if item.message_a_id == item.message_b_id:
        raise ValidationError("message_b_id: a reply cannot be compared with itself")
    check_text("comment", item.comment, max_chars, allow_empty=True)
    return dict(
        rater_id=item.rater_id,
        a=item.message_a_id,
        b=item.message_b_id,
        choice=item.choice,
        comment=item.comment,
        now=utcnow(),
    )


def check_message(item: MessageIn, max_chars: int) -> dict[str, Any]:
    if item.role not in MESSAGE_ROLES:
        raise ValidationError(f"role: {item.role!r} is not one of {', '.join(MESSAGE_ROLES)}")
    # A failed generation is recorded as an assistant message with no text and the error.
    check_text("content", item.content, max_chars, allow_empty=item.error is not None)
    title = item.content.strip().splitlines()[0][:80] if item.content.strip() else ""
    return dict(
        conversation_id=item.conversation_id,
        parent_id=item.parent_id,
        role=item.role,
        content=item.content,
        model_version_id=item.model_version_id,
        sampling=item.sampling,
        prompt_tokens=item.prompt_tokens,
        completion_tokens=item.completion_tokens,
        ttft_ms=item.ttft_ms,
        latency_ms=item.latency_ms,
        error=item.error,
        title=title,
        now=utcnow(),
    )
