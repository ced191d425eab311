"""Arena maths: win-rates per pair of versions and Bradley–Terry ratings, with bootstrap intervals.

A *game* is one comparison between replies of two different model versions:
``(version_a, version_b, score_a)`` where ``score_a`` is 1 when A's reply won, 0 when B's did
and 0.5 for a tie. `choice_score` maps the stored choices onto that scale; "both bad" counts as a
tie by default (neither reply was preferred), or is left out with ``both_bad="exclude"``.

Bradley–Terry: P(i beats j) = p_i / (p_i + p_j). The strengths are the maximum-likelihood fit
with ties as half a win to each side, i.e. the fixed point of Hunter's MM update (Hunter 2004,
https://doi.org/10.1214/aos/1079120141), reached by Newman's faster iteration (see
`bt_strengths`):

    p_i <- W_i / sum_j n_ij / (p_i + p_j)        W_i: wins of i, n_ij: games of i against j

`prior` adds that many virtual games, split evenly, between every pair of versions: it keeps the
ratings finite when a version won (or lost) every game and ties versions never compared to the
rest; 0 gives the plain maximum-likelihood fit. Ratings are on the Elo scale,
``rating_i = 1000 + 400 * log10(p_i / p_anchor)``, so a 3:1 strength ratio is ~191 points.

Intervals are percentile bootstraps: the games are resampled with replacement `n_boot` times
(from a seeded generator, so a dashboard refresh shows the same numbers for the same data).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from agent.errors import ValidationError

CHOICE_SCORES = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}
BOTH_BAD = ("tie", "exclude")
ANCHOR_RATING = 1000.0
ELO_SCALE = 400.0

Game = tuple[int, int, float]
"""(version_a, version_b, score of A): 1 A won, 0.5 tie, 0 B won."""


def choice_score(choice: str, both_bad: str = "tie") -> float | None:
    """The score of reply A for a stored choice; None when the game is left out."""
    if both_bad not in BOTH_BAD:
        raise ValidationError(f"both_bad: {both_bad!r} is not one of {', '.join(BOTH_BAD)}")
    if choice not in CHOICE_SCORES:
        raise ValidationError(f"choice: {choice!r} is not one of {', '.join(CHOICE_SCORES)}")
    if choice == "both_bad" and both_bad == "exclude":
        return None
    return CHOICE_SCORES[choice]


@dataclass
class PairStats:
    """Games between two versions, from the point of view of the first (lower id)."""

    version_a: int
    """The lower model version id."""
    version_b: int
    """The higher model version id."""
    n: int
    """Games played between the two."""
    wins_a: int
    """Games A won."""
    ties: int
    """Ties (and "both bad", unless excluded)."""
    wins_b: int
    """Games B won."""
    win_rate_a: float
    """(wins_a + ties / 2) / n"""
    lower: float
    """Lower end of the bootstrap percentile interval of win_rate_a."""
    upper: float
    """Upper end of that interval."""


@dataclass
class Rating:
    """One version's Bradley–Terry rating on the Elo scale, with its bootstrap interval."""

    version: int
    """Model version id."""
    rating: float
    """Elo-scale rating; the anchor version is 1000."""
    lower: float
    """Lower end of the bootstrap percentile interval."""
    upper: float
    """Upper end of that interval."""
    games: int
    """Games this version played."""


def _check(games: Sequence[Game], n_boot: int, level: float, prior: float) -> None:
    for a, b, score in games:
        if score not in (0.0, 0.5, 1.0):
            raise ValidationError(f"games: score {score!r} of ({a}, {b}) is not 0, 0.5 or 1")
    if n_boot < 1:
        raise ValidationError(f"n_boot: give at least 1 bootstrap resample, got {n_boot}")
    if not 0 < level < 1:
        raise ValidationError(f"level: the interval's coverage must be in (0, 1), got {level}")
    if prior < 0:
        raise ValidationError(f"prior: virtual games must be >= 0, got {prior}")


def pair_win_rates(
    games: Sequence[Game], *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> list[PairStats]:
    """Win-rate of the lower-id version against the other, per pair, with a bootstrap interval."""
    _check(games, n_boot, level, 0.0)
    tallies: dict[tuple[int, int], Counter[float]] = {}
    for a, b, score in games:
        if a == b:
            continue
        key, s = ((a, b), score) if a < b else ((b, a), 1.0 - score)
        tallies.setdefault(key, Counter())[s] += 1
    rng = np.random.default_rng(seed)
    q = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
    rows = []
    for (a, b), tally in sorted(tallies.items()):
        counts = np.array([tally[1.0], tally[0.5], tally[0.0]], dtype=float)  # win, tie, loss
        n = int(counts.sum())
        resampled = rng.multinomial(n, counts / n, size=n_boot)  # (n_boot, 3)
        rates = (resampled[:, 0] + 0.5 * resampled[:, 1]) / n
        lower, upper = np.percentile(rates, q, method="nearest")
        rate = (counts[0] + 0.5 * counts[1]) / n
        rows.append(
            PairStats(a, b, n, int(counts[0]), int(counts[1]), int(counts[2]), float(rate),
                      float(lower), float(upper))
        )  # fmt: skip
    return rows


def win_matrix(games: Sequence[Game], versions: Sequence[int]) -> np.ndarray:
    """(K, K) fractional wins: entry [i, j] is how often versions[i] beat versions[j]."""
    index = {v: i for i, v in enumerate(versions)}
    wins = np.zeros((len(versions), len(versions)))
    for a, b, score in games:
        if a != b:
            wins[index[a], index[b]] += score
            wins[index[b], index[a]] += 1.0 - score
    return wins


def bt_strengths(
    wins: np.ndarray, *, prior: float = 1.0, max_iter: int = 1000, tol: float = 1e-10
) -> np.ndarray:
    """Bradley–Terry strengths from (K, K) or batched (B, K, K) win matrices.

    Newman's iteration (JMLR 2023, https://jmlr.org/papers/v24/22-1086.html), which has the
    same fixed point as Hunter's MM update but needs ~10x fewer steps; a version that never
    lost (possible only with `prior` 0, and then without a finite MLE) takes the MM update.
    Strengths sum to 1 per batch row. A version with no games gets NaN; with `prior` 0 one
    that never won gets 0.
    """
    batched = wins.ndim == 3
    wins = np.array(wins if batched else wins[None], dtype=float)  # (B, K, K) w_ij
    off_diagonal = 1.0 - np.eye(wins.shape[-1])
    wins = wins * off_diagonal + 0.5 * prior * off_diagonal
    losses = wins.transpose(0, 2, 1)  # (B, K, K) w_ji
    games = wins + losses  # (B, K, K) n_ij
    won = wins.sum(axis=2)  # (B, K) W_i
    active = games.sum(axis=2) > 0  # (B, K)
    p = active / active.sum(axis=1, keepdims=True)  # (B, K), 0 for versions without games
    for _ in range(max_iter):
        old = p.copy()
        for i in range(p.shape[1]):  # Gauss–Seidel: each update uses the newest strengths
            pairs = p[:, i : i + 1] + p  # (B, K) p_i + p_j
            inv = np.divide(1.0, pairs, out=np.zeros_like(pairs), where=pairs > 0)
            numerator = (wins[:, i] * p * inv).sum(axis=1)  # sum_j w_ij p_j / (p_i + p_j)
            denominator = (losses[:, i] * inv).sum(axis=1)  # sum_j w_ji / (p_i + p_j)
            mm = (games[:, i] * inv).sum(axis=1)  # sum_j n_ij / (p_i + p_j)
            p[:, i] = np.where(
                denominator > 0,
                numerator / np.where(denominator > 0, denominator, 1.0),
                won[:, i] / np.where(mm > 0, mm, 1.0),
            )
        p /= p.sum(axis=1, keepdims=True)
        if np.abs(p - old).max() < tol:
            break
    p = np.where(active, p, np.nan)
    return p if batched else p[0]


def elo_ratings(strengths: np.ndarray, anchor: int) -> np.ndarray:
    """Strengths (..., K) on the Elo scale, the version at index `anchor` rated 1000."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = strengths / strengths[..., anchor : anchor + 1]
        return ANCHOR_RATING + ELO_SCALE * np.log10(ratio)


def bradley_terry(
    games: Sequence[Game],
    *,
    anchor: int | None = None,
    prior: float = 1.0,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> list[Rating]:
    """Bradley–Terry rating per version (anchor rated 1000; default the lowest id), best first.

    The interval resamples the games with replacement (`n_boot` times, seeded); the anchor's
    interval is [1000, 1000] by construction.
    """
    _check(games, n_boot, level, prior)
    games = [g for g in games if g[0] != g[1]]
    if not games:
        return []
    versions = sorted({v for a, b, _ in games for v in (a, b)})
    anchor = versions[0] if anchor is None else anchor
    if anchor not in versions:
        raise ValidationError(f"anchor: version {anchor} played no game; pick one of {versions}")
    a_index = versions.index(anchor)
    ratings = elo_ratings(bt_strengths(win_matrix(games, versions), prior=prior), a_index)

    # Bootstrap: resampling games with replacement = multinomial counts over distinct games.
    distinct = Counter(games)
    kinds = list(distinct)
    counts = np.array([distinct[g] for g in kinds], dtype=float)
    unit = np.stack([win_matrix([g], versions) for g in kinds])  # (C, K, K)
    rng = np.random.default_rng(seed)
    resampled = rng.multinomial(len(games), counts / counts.sum(), size=n_boot)  # (n_boot, C)
    k = len(versions)
    boot_wins = (resampled @ unit.reshape(len(kinds), k * k)).reshape(n_boot, k, k)
    boot = elo_ratings(bt_strengths(boot_wins, prior=prior), a_index)  # (n_boot, K)
    q = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
    with np.errstate(invalid="ignore"):
        lower, upper = np.nanpercentile(boot, q, axis=0, method="nearest")
    played = Counter(v for a, b, _ in games for v in (a, b))
    rows = [
        Rating(v, float(ratings[i]), float(lower[i]), float(upper[i]), played[v])
        for i, v in enumerate(versions)
    ]
    return sorted(rows, key=lambda r: -r.rating)
