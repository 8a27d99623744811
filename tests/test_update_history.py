"""FedBiAlign's bounded update history: norms, cosines, summary rows."""

from __future__ import annotations

import math

import pytest
import torch

from strategies.update_history import UpdateHistory, UpdateRow, update_stats


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_update_norms_and_cosines_by_hand() -> None:
    sent = {"a": _t(0, 0), "b": _t(1, 1)}
    aggregate = {"a": _t(1, 0), "b": _t(1, 2)}
    # Update (3, 4) on a; the aggregate's is (1, 0): norm 5, cosine 3 / 5.
    assert update_stats(sent, aggregate, {"a": _t(3, 4)}) == pytest.approx((5.0, 0.6))
    # Update (1, 1, 0, -1) against (1, 0, 0, 1): norm sqrt(3), cosine 0.
    norm, cosine = update_stats(sent, aggregate, {"a": _t(1, 1), "b": _t(1, 0)})
    assert norm == pytest.approx(math.sqrt(3)) and cosine == pytest.approx(0.0)
    norm, cosine = update_stats(sent, aggregate, {"a": _t(0, 0)})
    assert norm == 0.0 and math.isnan(cosine)


def test_history_summary_rows_and_bound() -> None:
    history = UpdateHistory(max_rounds=2)
    history.add(1, UpdateRow(node=1, depth=2, num_examples=5, norm=1.0, cosine=0.5))
    history.add(1, UpdateRow(node=2, depth=6, num_examples=7, norm=3.0, cosine=math.nan))
    history.add(1, UpdateRow(node=3, depth=6, num_examples=9, norm=2.0, cosine=-0.5))
    assert history.round_summary(1) == {
        "update_norm_mean": 2.0,
        "update_norm_max": 3.0,
        "update_cosine_mean": 0.0,  # NaN (a zero update) left out
        "update_cosine_min": -0.5,
        "clients_depth_2": 1.0,
        "clients_depth_6": 2.0,
    }
    assert history.rows(1)[0] == {
        "round": 1,
        "node": 1,
        "depth": 2,
        "num_examples": 5,
        "norm": 1.0,
        "cosine": 0.5,
    }
    history.add(2, UpdateRow(1, 2, 5, 1.0, 1.0))
    history.add(3, UpdateRow(1, 2, 5, 1.0, 1.0))
    assert history.rounds == [2, 3]
    with pytest.raises(KeyError, match="round 1 is not in the update history"):
        history.round_summary(1)
