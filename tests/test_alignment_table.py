"""bench.alignment_table pairs each held-out preference pair's margin before and after DPO."""

import json
import math
from pathlib import Path

import pytest
from scipy import stats

from bench.alignment_table import compare, pair_margins
from server_app.preference_eval import accuracy_interval

BEFORE = [0.2, -0.1, -0.3, 0.4, -0.2, 0.1, 0.3, -0.4]  # right on pairs 0, 3, 5, 6
AFTER = [0.3, 0.2, 0.1, 0.5, -0.1, -0.05, 0.6, 0.2]  # right on all but pairs 4 and 5


def _wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson's score interval written out (z for 95 %)."""
    z = 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_before_and_after_are_compared_pair_by_pair() -> None:
    numbers = compare(BEFORE, AFTER)
    assert numbers["pairs"] == 8
    assert numbers["accuracy_before"] == 0.5 and numbers["accuracy_after"] == 0.75
    for when, k in (("before", 4), ("after", 6)):
        low, high = _wilson(k, 8)
        assert numbers[f"accuracy_{when}_ci_low"] == pytest.approx(low, abs=1e-9)
        assert numbers[f"accuracy_{when}_ci_high"] == pytest.approx(high, abs=1e-9)
    assert numbers["accuracy_gain"] == pytest.approx(0.25)
    # Pairs 1, 2, 7 only after; pair 5 only before: McNemar's exact test on the 4 discordant.
    assert numbers["accuracy_gain_p"] == pytest.approx(stats.binomtest(3, 4).pvalue)
    gain = sum(AFTER) / 8 - sum(BEFORE) / 8
    assert numbers["margin_gain"] == pytest.approx(gain)
    # Every pair's margin rose, so every bootstrap resample's mean difference is positive.
    assert 0 < numbers["margin_gain_ci_low"] < gain < numbers["margin_gain_ci_high"]


def test_a_model_equal_to_its_reference_scores_chance_exactly() -> None:
    interval = accuracy_interval([0.0] * 5)
    assert (interval.value, interval.low, interval.high) == (0.5, 0.5, 0.5)


def test_pairs_of_different_lengths_are_refused() -> None:
    with pytest.raises(SystemExit, match="8 held-out pairs before DPO, 7 after"):
        compare(BEFORE, AFTER[:7])


def test_a_broken_margins_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "preference_heldout.jsonl"
    with pytest.raises(SystemExit, match=rf"{path}: no such file"):
        pair_margins(tmp_path)
    good = {"round": 2, "variant": "adapfu", "margins": BEFORE}
    path.write_text(json.dumps(good) + "\n" + json.dumps(good | {"margins": ["x"]}) + "\n")
    with pytest.raises(SystemExit, match=rf"{path}, line 2: .*numeric 'margins'"):
        pair_margins(tmp_path)
    path.write_text(json.dumps(good) + "\n")
    assert pair_margins(tmp_path) == {(2, "adapfu"): BEFORE}
