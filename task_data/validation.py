"""A validation part carved from a training split, which no client trains on.

Recipe sweeps must not be tuned on a test split, and tasks without a test split (custom
files, the instruction corpora) still need held-out texts. Both take a fixed random selection
of the training records — the same whatever the run's seed, so that runs compare pairwise —
which the server evaluates on and every client removes from the records it partitions.
"""

from __future__ import annotations

import random

VALIDATION_SEED = 0


def validation_indices(total: int, size: int) -> list[int]:
    """Indices of the validation records among ``total`` (in selection order)."""
    if size <= 0:
        return []
    if size >= total:
        raise ValueError(
            f"a validation part of {size} records leaves none of the {total} to train on; "
            "lower eval-examples"
        )
    return random.Random(VALIDATION_SEED).sample(range(total), size)


def validation_split(records: list[dict], size: int) -> tuple[list[dict], list[dict]]:
    """``(rest, validation)``: the records clients may train on, and the ``size`` held out."""
    held = validation_indices(len(records), size)
    taken = set(held)
    return [r for i, r in enumerate(records) if i not in taken], [records[i] for i in held]


def heldout_test_indices(total: int, size: int) -> list[int]:
    """Indices of the server's held-out texts in a test split of ``total`` records: a fixed
    random selection of ``size`` (all of them when ``size`` is 0 or not smaller)."""
    if not size or size >= total:
        return list(range(total))
    return random.Random(VALIDATION_SEED).sample(range(total), size)


def subset(items: list, size: int, seed: int) -> list:
    """A fixed random subset (all of it when ``size`` is 0 or larger than the list): the
    server's evaluation draws its texts with it, and KD-FedLLM's public set leaves out
    exactly those texts, so both sides must draw the same way."""
    if not size or size >= len(items):
        return list(items)
    return random.Random(seed).sample(items, size)
