"""The client learning rate of each round: constant, or cosine from max to min over the rounds.

OpenFedLLM decays the client learning rate across rounds with
``min + (max - min) * (1 + cos(pi * t / T)) / 2`` for its 0-based round ``t = r - 1`` of ``T``:
round 1 trains at the maximum and the last one above the minimum. This is that schedule.
FlowerTune's templates pass Flower's 1-based round as ``t`` (``r / T``), one round further
along the curve, so their last round trains at the minimum and a one-round run trains at the
minimum throughout; we keep OpenFedLLM's convention for that reason.
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
    progress = (server_round - 1) / num_rounds
    return minimum + 0.5 * (maximum - minimum) * (1 + math.cos(math.pi * progress))
