"""bench's ratio over alternating rounds: the verdict is the median of each round's own
ratio, never a ratio of medians taken from different rounds."""

from __future__ import annotations

from bench.__main__ import median_ratio, rounds_row


def test_the_ratio_is_the_median_of_per_round_ratios_with_its_range() -> None:
    # the machine slowed between rounds: both sides of each pair moved together
    values, bases = [300.0, 100.0, 200.0], [1000.0, 500.0, 400.0]
    r, text = median_ratio(values, bases)
    assert r == 0.3  # per-round 0.3, 0.2, 0.5; the ratio of medians would be 0.4
    assert text == "0.30x (0.20-0.50)"


def test_one_round_prints_no_range() -> None:
    assert median_ratio([5.0], [10.0]) == (0.5, "0.50x")


def test_a_row_is_judged_on_the_median_round() -> None:
    row = rounds_row("x", [300.0, 100.0, 200.0], [1000.0, 500.0, 400.0], "", 0.3, ">= 0.3x")
    assert (row.value, row.baseline, row.met) == ("200", "500", True)
    assert rounds_row("x", [1.0, 1.0, 1.0], [4.0, 4.0, 3.0], "", 0.3, "t").met is False
    assert rounds_row("x", [1.0], [4.0], "", 0.3, "t", extra=False).met is None
