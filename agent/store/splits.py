"""A conversation's data split, decided once and stored: train / validation / judge / test.

    fractions = SplitFractions(train=0.6, validation=0.1, judge=0.15, test=0.15)
    splits = assign_splits(store, conversation_ids, fractions)   # {id: "train", ...}

Every stage reads the same table, so SFT, the reward model, its early stopping, the judge,
PPO and the evaluation never disagree about which conversation is whose. A conversation's
split is drawn on first need from a hash of its id (deterministic: two processes that race
draw the same split) and written with INSERT ... ON CONFLICT DO NOTHING, so an existing
row is never changed, whatever fractions a later caller gives.

- train: SFT, the PPO reward model and PPO's prompts learn from it.
- validation: early stopping and checkpoint choice (SFT, reward model), PPO's eval prompts.
- judge: only the gate's judge (a second reward model) learns from it.
- test: nothing trains or selects on it; accuracies and the gate's prompts come from it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from agent.errors import ValidationError
from agent.store.api import Store
from agent.store.models import Split, utcnow

SPLITS = ("train", "validation", "judge", "test")


@dataclass(frozen=True)
class SplitFractions:
    """Shares of new conversations per split (they must sum to 1)."""

    train: float = 0.6
    """Learned from by SFT, the PPO reward model and PPO."""
    validation: float = 0.1
    """Early stopping and checkpoint choice."""
    judge: float = 0.15
    """The judge's training data, seen by no other stage."""
    test: float = 0.15
    """Reported accuracies and the gate's prompts; nothing trains or selects on it."""
    seed: int = 0
    """Seed of the hash that draws a conversation's split."""

    def __post_init__(self) -> None:
        shares = [getattr(self, name) for name in SPLITS]
        if any(s < 0 for s in shares) or abs(sum(shares) - 1) > 1e-6:
            raise ValidationError(
                f"split fractions: {dict(zip(SPLITS, shares, strict=True))} must be >= 0 and "
                "sum to 1"
            )

    def draw(self, key: int) -> str:
        """The split of conversation (or line) `key`: a hash of (seed, key) against the shares."""
        digest = hashlib.sha256(f"{self.seed}:{key}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        edge = 0.0
        for name in SPLITS:
            edge += getattr(self, name)
            if u < edge:
                return name
        return SPLITS[-1]


def stored_splits(store: Store, conversation_ids: Iterable[int] | None = None) -> dict[int, str]:
    """The stored split of each conversation that has one (all of them when ids is None)."""
    query = select(Split.conversation_id, Split.split)
    ids = None if conversation_ids is None else sorted(set(conversation_ids))
    found: dict[int, str] = {}
    with store.reading() as s:
        if ids is None:
            return {cid: split for cid, split in s.execute(query)}
        for start in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
            chunk = ids[start : start + 500]
            rows = s.execute(query.where(Split.conversation_id.in_(chunk)))
            found.update({cid: split for cid, split in rows})
    return found


def assign_splits(
    store: Store, conversation_ids: Iterable[int], fractions: SplitFractions | None = None
) -> dict[int, str]:
    """The split of every conversation in `conversation_ids`, drawing and storing the new ones.

    Idempotent and race-safe: rows already stored win (ON CONFLICT DO NOTHING), and the
    result is read back from the table, so concurrent callers agree.
    """
    fractions = fractions or SplitFractions()
    ids = sorted(set(conversation_ids))
    known = stored_splits(store, ids)
    now = utcnow()
    new = [
        {"conversation_id": c, "split": fractions.draw(c), "created_at": now}
        for c in ids
        if c not in known
    ]
    if new:
        dialect = postgresql if store.engine.dialect.name == "postgresql" else sqlite
        with store.transaction() as s:
            for start in range(0, len(new), 500):
                stmt = dialect.insert(Split).values(new[start : start + 500])
                s.execute(stmt.on_conflict_do_nothing(index_elements=["conversation_id"]))
        known = stored_splits(store, ids)
    return known
