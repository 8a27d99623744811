"""The client learning rate of each round: constant, or cosine from max to min over the rounds.

FlowerTune's templates decay the client learning rate across rounds with
``min + (max - min) * (1 + cos(pi * r / T)) / 2`` for Flower's 1-based round ``r`` of ``T``:
round 1 already trains a little below the maximum and round ``T`` at the minimum. This is
that schedule (OpenFedLLM counts rounds from 0, so its rates are FlowerTune's shifted by one
round).
"""

from __future__ import annotations

import math


def round_learning_rate(
    server_round: int, num_rounds: int, maximum: float, minimum: float, scheduler: str
) -> float:
    """Learning rate for round ``server_round`` (1-based) of ``num_rounds``."""
    if scheduler == "constant":
        return maximum
    if scheduler != "cosine":
        raise ValueError(f"unknown lr-scheduler {scheduler!r}")
    progress = server_round / num_rounds
    return minimum + 0.5 * (maximum - minimum) * (1 + math.cos(math.pi * progress))
