"""Krippendorff's alpha against hand-computed and published values."""

from __future__ import annotations

import pytest

from feedback_ui.agreement import krippendorff_alpha

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the 4-coder x 12-unit
# example with missing values; the paper gives nominal .743, ordinal .815, interval .849.
PAPER_UNITS = {
    1: [1, 1, 1],
    2: [2, 2, 3, 2],
    3: [3, 3, 3, 3],
    4: [3, 3, 3, 3],
    5: [2, 2, 2, 2],
    6: [1, 2, 3, 4],
    7: [4, 4, 4, 4],
    8: [1, 1, 2, 1],
    9: [2, 2, 2, 2],
    10: [5, 5, 5],
    11: [1, 1],
    12: [3],
}


@pytest.mark.parametrize(
    ("level", "expected"), [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)]
)
def test_matches_the_paper(level, expected) -> None:
    assert krippendorff_alpha(PAPER_UNITS, level) == pytest.approx(expected, abs=5e-4)


def test_hand_computed_interval() -> None:
    # Coincidences o11=2, o22=2, o12=o21=1; n1=n2=3, n=6.
    # D_o = 2/6 = 1/3, D_e = 2*3*3/(6*5) = 0.6, alpha = 1 - (1/3)/0.6 = 4/9.
    units = {"a": [1, 1], "b": [2, 2], "c": [1, 2]}
    assert krippendorff_alpha(units, "interval") == pytest.approx(4 / 9)


def test_perfect_and_undefined() -> None:
    assert krippendorff_alpha({1: [1, 1], 2: [5, 5, 5]}) == pytest.approx(1.0)
    assert krippendorff_alpha({1: [3, 3], 2: [3, 3]}) is None  # no variation: D_e = 0
    assert krippendorff_alpha({1: [3], 2: [4]}) is None  # nothing pairable
    assert krippendorff_alpha({1: [1, 5], 2: [5, 1]}, "interval") < 0  # systematic disagreement
