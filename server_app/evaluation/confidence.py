"""95 % confidence intervals for evaluation metrics, and paired comparisons of two models.

Every model claim the product prints is a measurement on a sample of texts, so it carries an
interval: Wilson's for an accuracy (it stays inside [0, 1] and is not degenerate at 0 or n
successes), a percentile bootstrap over texts for a token-weighted loss (a ratio of sums, whose
sampling distribution has no closed form). Two models scored on the same texts are compared
pairwise — the difference's bootstrap interval resamples texts, not models, which removes the
between-text variance that dominates both losses — and, for accuracy, McNemar's exact test on
the discordant texts. scipy does the statistics; this module only says which applies where.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its 95 % interval (``low``/``high`` NaN for an empty sample)."""

    value: float
    low: float
    high: float

    def keys(self, prefix: str) -> dict[str, float]:
        """``{prefix: value, prefix_ci_low: low, prefix_ci_high: high}``."""
        return {prefix: self.value, f"{prefix}_ci_low": self.low, f"{prefix}_ci_high": self.high}


NAN = Interval(float("nan"), float("nan"), float("nan"))


def interval_cell(metrics: dict[str, float], name: str, scale: float = 1.0, digits: int = 3) -> str:
    """``value [low, high]`` of ``name`` and its ``_ci_low``/``_ci_high`` keys, scaled; the value
    alone when it has no interval, ``–`` when it is missing."""
    if name not in metrics:
        return "–"
    value = metrics[name] * scale
    low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    if low is None or high is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low * scale:.{digits}f}, {high * scale:.{digits}f}]"


def wilson(successes: int, n: int) -> Interval:
    """A proportion with Wilson's score interval."""
    if n <= 0:
        return NAN
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(LEVEL, method="wilson")
    return Interval(successes / n, float(ci.low), float(ci.high))


def _bootstrap(data: tuple[np.ndarray, ...], statistic, seed: int) -> tuple[float, float]:
    if len(data[0]) < 2 or np.all([np.ptp(column) == 0 for column in data]):
        value = float(statistic(*data, axis=-1))
        return value, value
    result = stats.bootstrap(
        data,
        statistic,
        paired=True,
        vectorized=True,
        n_resamples=RESAMPLES,
        confidence_level=LEVEL,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def _ratio(num: np.ndarray, den: np.ndarray, axis: int = -1) -> np.ndarray:
    return num.sum(axis=axis) / den.sum(axis=axis)


def ratio(numerators: Sequence[float], denominators: Sequence[float], seed: int = 0) -> Interval:
    """sum(numerators) / sum(denominators) — a loss per token over texts — with a percentile
    bootstrap interval resampling texts."""
    num, den = np.asarray(numerators, float), np.asarray(denominators, float)
    if not len(num) or den.sum() <= 0:
        return NAN
    low, high = _bootstrap((num, den), _ratio, seed)
    return Interval(float(_ratio(num, den)), low, high)


def agreement_intervals(texts: dict[str, Sequence[float]], seed: int = 0) -> dict[str, Interval]:
    """``kl`` per response token and ``top1`` agreement from per-text sums
    (``models.fidelity.per_text_agreement``): ratios over tokens, resampling texts, since the
    tokens of one text are not independent draws (so no Wilson interval over tokens)."""
    return {
        "kl": ratio(texts["kl"], texts["tokens"], seed),
        "top1": ratio(texts["agree"], texts["tokens"], seed),
    }


def paired_ratio_difference(
    a: tuple[Sequence[float], Sequence[float]],
    b: tuple[Sequence[float], Sequence[float]],
    seed: int = 0,
) -> Interval:
    """ratio(a) - ratio(b) for two models' (numerators, denominators) on the same texts, with
    a paired bootstrap interval (the same resampled texts for both)."""
    arrays = tuple(np.asarray(x, float) for x in (*a, *b))
    if len({len(x) for x in arrays}) != 1:
        raise ValueError("a paired comparison needs both models scored on the same texts")
    if not len(arrays[0]):
        return NAN

    def difference(na, da, nb, db, axis=-1):
        return _ratio(na, da, axis) - _ratio(nb, db, axis)

    low, high = _bootstrap(arrays, difference, seed)
    return Interval(float(difference(*arrays)), low, high)


@dataclass(frozen=True)
class AccuracyDifference:
    """accuracy(a) - accuracy(b) on the same texts: paired bootstrap interval and McNemar's
    exact p-value (``a_only``/``b_only``: texts only one of them gets right)."""

    interval: Interval
    a_only: int
    b_only: int
    p_value: float


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, float]:
    """McNemar's exact test on two models' per-text correctness: the texts only ``a`` gets
    right, those only ``b`` gets right, and the two-sided binomial p-value of that split."""
    x, y = np.asarray(a, bool), np.asarray(b, bool)
    a_only, b_only = int((x & ~y).sum()), int((~x & y).sum())
    discordant = a_only + b_only
    p_value = stats.binomtest(a_only, discordant, 0.5).pvalue if discordant else 1.0
    return a_only, b_only, float(p_value)


def paired_accuracy_difference(
    a: Sequence[bool], b: Sequence[bool], seed: int = 0
) -> AccuracyDifference:
    """Compare two models' per-text correctness on the same texts."""
    x, y = np.asarray(a, float), np.asarray(b, float)
    if len(x) != len(y):
        raise ValueError("a paired comparison needs both models scored on the same texts")
    if not len(x):
        return AccuracyDifference(NAN, 0, 0, float("nan"))
    a_only, b_only, p_value = mcnemar(x > 0, y > 0)

    def difference(u, v, axis=-1):
        return u.mean(axis=axis) - v.mean(axis=axis)

    low, high = _bootstrap((x, y), difference, seed)
    return AccuracyDifference(
        Interval(float(difference(x, y)), low, high), a_only, b_only, float(p_value)
    )
