"""Inter-annotator agreement: Krippendorff's alpha for Likert ratings.

alpha = 1 - D_o / D_e, from the coincidence matrix of pairable values (units with at least two
ratings). Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability",
https://repository.upenn.edu/asc_papers/43/ — the reference values of its worked example are
a unit test.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from itertools import permutations
from typing import Literal

Level = Literal["nominal", "ordinal", "interval"]


def krippendorff_alpha(
    units: Mapping[object, Iterable[float]], level: Level = "ordinal"
) -> float | None:
    """Krippendorff's alpha over `units` (item -> the values its raters gave).

    Units with fewer than two values are not pairable and are ignored. Returns None when
    there is nothing to compare (no pairable unit, or every value identical so D_e = 0).
    """
    pairable = [list(v) for v in units.values()]
    pairable = [v for v in pairable if len(v) >= 2]
    if not pairable:
        return None
    coincidences: Counter[tuple[float, float]] = Counter()
    for values in pairable:
        weight = 1.0 / (len(values) - 1)
        for c, k in permutations(values, 2):
            coincidences[(c, k)] += weight
    totals: Counter[float] = Counter()
    for (c, _), o in coincidences.items():
        totals[c] += o
    n = sum(totals.values())
    categories = sorted(totals)
    delta = _distance(level, categories, totals)
    observed = sum(o * delta[c, k] for (c, k), o in coincidences.items()) / n
    expected = sum(totals[c] * totals[k] * delta[c, k] for c in categories for k in categories) / (
        n * (n - 1)
    )
    if expected == 0:
        return None
    return 1.0 - observed / expected


def _distance(
    level: Level, categories: list[float], totals: Mapping[float, float]
) -> dict[tuple[float, float], float]:
    """Squared difference function delta^2(c, k) of the measurement level."""
    delta: dict[tuple[float, float], float] = {}
    for i, c in enumerate(categories):
        for j, k in enumerate(categories):
            if level == "nominal":
                d = 0.0 if c == k else 1.0
            elif level == "interval":
                d = (c - k) ** 2
            elif level == "ordinal":
                lo, hi = min(i, j), max(i, j)
                between = sum(totals[categories[g]] for g in range(lo, hi + 1))
                d = (between - (totals[c] + totals[k]) / 2) ** 2
            else:
                raise ValueError(f"level: {level!r} is not nominal, ordinal or interval")
            delta[c, k] = d
    return delta
