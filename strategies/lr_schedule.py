"""The client learning rate of each round: constant, or cosine from max to min over the rounds.

OpenFedLLM and FlowerTune decay the client learning rate across rounds with
``min + (max - min) * (1 + cos(pi * t / T)) / 2``; round 1 is ``t = 0``, so the first round
trains at the maximum and the last one just above the minimum.
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
