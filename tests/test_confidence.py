"""Confidence intervals and paired comparisons: Wilson's formula, bootstrap intervals that
cover the truth and shrink when texts are paired, McNemar's exact p-value."""

import math

import numpy as np
import pytest

from server_app.evaluation.confidence import (
    paired_accuracy_difference,
    paired_ratio_difference,
    ratio,
    wilson,
)


def _wilson_by_hand(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


@pytest.mark.parametrize(("k", "n"), [(12, 48), (0, 30), (300, 300), (64, 300)])
def test_wilson_interval_follows_the_score_formula(k: int, n: int) -> None:
    interval = wilson(k, n)
    low, high = _wilson_by_hand(k, n)
    assert interval.value == k / n
    assert interval.low == pytest.approx(low, abs=1e-9)
    assert interval.high == pytest.approx(high, abs=1e-9)
    assert math.isnan(wilson(0, 0).value)


def test_ratio_interval_covers_the_population_loss_and_narrows_with_more_texts() -> None:
    rng = np.random.default_rng(3)
    covered = 0
    for trial in range(40):
        tokens = rng.integers(2, 30, 400)
        nll = rng.gamma(2.0, 1.0, 400) * tokens  # mean 2 nats per token
        interval = ratio(nll, tokens, seed=trial)
        covered += interval.low <= 2.0 <= interval.high
    assert covered >= 34  # nominal 38 of 40; far below means the interval is too narrow
    small = ratio(nll[:50], tokens[:50])
    assert small.high - small.low > 2 * (interval.high - interval.low)


def test_paired_difference_sees_a_small_shift_that_unpaired_intervals_overlap() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 30, 1000)
    per_text = rng.gamma(1.0, 3.0, 1000)  # texts differ far more than the two models do
    base = per_text * tokens
    better = (per_text - 0.05 + rng.normal(0, 0.02, 1000)) * tokens
    a, b = ratio(better, tokens), ratio(base, tokens)
    assert a.high > b.low  # the unpaired intervals overlap
    diff = paired_ratio_difference((better, tokens), (base, tokens))
    assert diff.high < 0
    assert diff.value == pytest.approx(a.value - b.value)
    noise = paired_ratio_difference(
        ((per_text + rng.normal(0, 0.02, 1000)) * tokens, tokens), (base, tokens)
    )
    assert noise.low < 0 < noise.high
    with pytest.raises(ValueError, match="same texts"):
        paired_ratio_difference((better[:5], tokens[:5]), (base, tokens))


def test_paired_accuracy_difference_counts_discordant_texts_and_mcnemar() -> None:
    a = [True] * 10 + [False] * 5 + [True] * 20
    b = [False] * 10 + [False] * 5 + [True] * 20
    diff = paired_accuracy_difference(a, b)
    assert (diff.a_only, diff.b_only) == (10, 0)
    assert diff.p_value == pytest.approx(2 * 0.5**10)
    assert diff.interval.value == pytest.approx(10 / 35)
    assert diff.interval.low > 0
    same = paired_accuracy_difference(a, a)
    assert (same.p_value, same.interval.low, same.interval.high) == (1.0, 0.0, 0.0)
    mixed = paired_accuracy_difference([True, False] * 20, [False, True] * 20)
    assert mixed.p_value == pytest.approx(1.0)
    assert mixed.interval.low < 0 < mixed.interval.high
