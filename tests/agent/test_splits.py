"""Stored data splits: decided once per conversation, the same for every caller and database."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from agent.config import Settings
from agent.errors import ValidationError
from agent.store.api import Store
from agent.store.splits import SPLITS, SplitFractions, assign_splits, stored_splits


def test_draw_is_deterministic_and_follows_the_fractions() -> None:
    fractions = SplitFractions(train=0.5, validation=0.1, judge=0.2, test=0.2)
    drawn = [fractions.draw(i) for i in range(1, 4001)]
    assert drawn == [fractions.draw(i) for i in range(1, 4001)]
    counts = Counter(drawn)
    for name in SPLITS:
        assert counts[name] / 4000 == pytest.approx(getattr(fractions, name), abs=0.03)
    assert drawn != [SplitFractions(seed=1).draw(i) for i in range(1, 4001)]
    with pytest.raises(ValidationError, match="sum to 1"):
        SplitFractions(train=0.9, validation=0.9)


def _conversations(store: Store, n: int) -> list[int]:
    user = store.get_or_create_user("u").id
    return [store.create_conversation(user, "") for _ in range(n)]


def test_a_split_is_stored_once_and_never_changed(store: Store) -> None:
    ids = _conversations(store, 30)
    first = assign_splits(store, ids[:20])
    assert first == stored_splits(store) and len(first) == 20
    everything_train = SplitFractions(train=1.0, validation=0.0, judge=0.0, test=0.0)
    again = assign_splits(store, ids, everything_train)
    assert {c: again[c] for c in ids[:20]} == first  # existing rows win
    assert {again[c] for c in ids[20:]} == {"train"}


def test_concurrent_callers_agree(settings: Settings, store: Store) -> None:
    ids = _conversations(store, 200)
    results: list[dict[int, str]] = []
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        other = Store.open(settings)
        try:
            fractions = SplitFractions(seed=seed)  # different draws: only one may be stored
            results.append(assign_splits(other, ids, fractions))
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            other.close()

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(r == results[0] for r in results) and len(results[0]) == 200
    assert stored_splits(store) == results[0]
