"""Arena maths: choice scores, pair win-rates, Bradley–Terry ratings and bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.errors import ValidationError
from feedback_ui import ratings
from feedback_ui.ratings import bradley_terry, bt_strengths, pair_win_rates, win_matrix

ELO = 400 / math.log(10)  # rating points per unit of log-strength


def games(a: int, b: int, wins: int, ties: int = 0, losses: int = 0) -> list[ratings.Game]:
    return [(a, b, 1.0)] * wins + [(a, b, 0.5)] * ties + [(a, b, 0.0)] * losses


def test_choice_scores() -> None:
    assert [ratings.choice_score(c) for c in ("a", "b", "tie", "both_bad")] == [1, 0, 0.5, 0.5]
    assert ratings.choice_score("both_bad", both_bad="exclude") is None
    assert ratings.choice_score("tie", both_bad="exclude") == 0.5
    with pytest.raises(ValidationError, match="choice"):
        ratings.choice_score("left")
    with pytest.raises(ValidationError, match="both_bad"):
        ratings.choice_score("a", both_bad="ignore")


def test_three_wins_in_four_is_a_strength_ratio_of_three() -> None:
    p = bt_strengths(win_matrix(games(1, 2, 3, losses=1), [1, 2]), prior=0)
    assert p == pytest.approx([0.75, 0.25])
    [first, second] = bradley_terry(games(1, 2, 3, losses=1), prior=0, n_boot=10)
    assert (first.version, first.rating, first.games) == (1, 1000.0, 4)
    assert second.rating == pytest.approx(1000 - 400 * math.log10(3))  # 809.15
    # Anchored on the winner instead, the loser sits as far below; ties count half each.
    [top, _] = bradley_terry(games(1, 2, 2, ties=2), anchor=2, prior=0, n_boot=10)
    assert (top.version, top.rating) == (1, pytest.approx(1000 + 400 * math.log10(3)))


def test_three_versions_recover_the_strengths_that_explain_the_games() -> None:
    # Strengths 4 : 2 : 1 predict 2 of 3, 2 of 3 and 4 of 5 wins; with exactly those counts
    # the maximum-likelihood strengths are 4 : 2 : 1 (each version's wins = its expected wins).
    data = games(1, 2, 2, losses=1) + games(2, 3, 2, losses=1) + games(3, 1, 1, losses=4)
    p = bt_strengths(win_matrix(data, [1, 2, 3]), prior=0)
    assert p == pytest.approx(np.array([4, 2, 1]) / 7, abs=1e-9)
    by_version = {r.version: r.rating for r in bradley_terry(data, prior=0, n_boot=10)}
    expected = {1: 1000, 2: 1000 - 400 * math.log10(2), 3: 1000 - 400 * math.log10(4)}
    assert by_version == pytest.approx(expected)


def test_the_prior_keeps_a_clean_sweep_finite() -> None:
    sweep = games(1, 2, 4)
    p = bt_strengths(win_matrix(sweep, [1, 2]), prior=0)
    assert p[1] == 0  # the plain MLE: the loser's strength is 0, its rating -inf
    # One virtual tie: 4.5 wins against 0.5, a ratio of 9.
    [_, loser] = bradley_terry(sweep, prior=1.0, n_boot=10)
    assert loser.rating == pytest.approx(1000 - 400 * math.log10(9))
    # A version with no games (and no prior) has no strength; the others are unaffected.
    p = bt_strengths(win_matrix(games(1, 2, 3, losses=1), [1, 2, 3]), prior=0)
    assert np.isnan(p[2]) and p[:2] == pytest.approx([0.75, 0.25])


def test_batched_fits_match_one_at_a_time() -> None:
    rng = np.random.default_rng(1)
    batch = rng.integers(0, 5, size=(6, 4, 4)).astype(float)
    together = bt_strengths(batch)
    for wins, row in zip(batch, together, strict=True):
        assert bt_strengths(wins) == pytest.approx(row, rel=1e-8)


def test_pair_win_rates_orient_on_the_lower_id_with_a_bootstrap_interval() -> None:
    data = [(2, 1, 0.0)] * 3 + [(1, 2, 0.0)] + games(1, 3, 1, ties=1)  # v1 beats v2 3 of 4
    first, second = pair_win_rates(data, n_boot=20_000, seed=0)
    assert (first.version_a, first.version_b, first.n) == (1, 2, 4)
    assert (first.wins_a, first.ties, first.wins_b, first.win_rate_a) == (3, 0, 1, 0.75)
    # Resampling 4 games with P(win) = 3/4: P(<= 1 win) = 5.1% and P(4 wins) = 31.6%, so the
    # 2.5th and 97.5th percentiles of the win-rate are 1/4 and 1.
    assert (first.lower, first.upper) == (0.25, 1.0)
    assert (second.version_b, second.win_rate_a, second.ties) == (3, 0.75, 1)
    assert pair_win_rates(data, n_boot=200, seed=5) == pair_win_rates(data, n_boot=200, seed=5)


def test_bootstrap_interval_matches_the_binomial_standard_error() -> None:
    # 300 wins in 400 games: log-odds ln 3 with standard error sqrt(1 / (n p (1 - p))).
    result = {r.version: r for r in bradley_terry(games(1, 2, 300, losses=100), n_boot=4000)}
    anchor, other = result[1], result[2]
    assert (anchor.lower, anchor.rating, anchor.upper) == (1000, 1000, 1000)
    half_width = 1.96 * ELO * math.sqrt(1 / (400 * 0.75 * 0.25))  # ~39 points
    assert other.lower < other.rating < other.upper
    assert (other.upper - other.lower) / 2 == pytest.approx(half_width, rel=0.15)
    small = {r.version: r for r in bradley_terry(games(1, 2, 3, losses=1), n_boot=4000)}[2]
    assert small.upper - small.lower > 3 * (other.upper - other.lower)  # fewer games, wider
    again = {r.version: r for r in bradley_terry(games(1, 2, 300, losses=100), n_boot=4000)}
    assert (again[2].lower, again[2].upper) == (other.lower, other.upper)  # seeded


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_boot": 0}, "n_boot"),
        ({"level": 1.0}, "level"),
        ({"prior": -1.0}, "prior"),
        ({"anchor": 7}, "anchor: version 7 played no game"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, match) -> None:
    with pytest.raises(ValidationError, match=match):
        bradley_terry(games(1, 2, 1, losses=1), **kwargs)


def test_scores_other_than_win_tie_loss_are_refused() -> None:
    with pytest.raises(ValidationError, match="score 0.7"):
        pair_win_rates([(1, 2, 0.7)])
    assert bradley_terry([]) == [] and pair_win_rates([]) == []
