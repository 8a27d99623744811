"""Screen client updates before aggregation: a bad update is dropped, logged and counted.

A reply's ``arrays`` must hold exactly the keys the server sent, with the same shapes and
dtypes, only finite values, and an update norm ``||y_i - x||`` not far above the
other clients' (more than ``max_norm_ratio`` times their median, checked when at least three
clients replied). Flower's aggregation would otherwise average a NaN into every client's
model, or fail on a shape mismatch and lose the whole round.

The median screen stops one outlier among honest clients, not a colluding majority: when
most of the replies are scaled alike, the median is theirs. ``max_update_norm`` (run-config
``max-update-norm``) is an absolute bound that holds whatever the others send, with or
without DP: an update whose norm exceeds it is rejected.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.common.logger import log


@dataclass(frozen=True)
class Rejection:
    """A client update left out of aggregation, and why."""

    node: int
    reason: str


def update_problem(arrays: ArrayRecord | None, reference: ArrayRecord) -> str | None:
    """Why ``arrays`` cannot be aggregated with updates of ``reference``'s form, or None."""
    if arrays is None:
        return "no 'arrays' record"
    missing, extra = sorted(set(reference) - set(arrays)), sorted(set(arrays) - set(reference))
    if missing or extra:
        return f"missing keys {missing[:3]} / unexpected keys {extra[:3]}"
    for name, expected in reference.items():
        got = arrays[name]
        if tuple(got.shape) != tuple(expected.shape):
            return f"{name}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
        # The dtype the server sent, exactly: a float64 update of finite but huge values
        # would overflow the float32 model when aggregated, a float16 one lose precision.
        if (got.dtype, got.stype) != (expected.dtype, expected.stype):
            return f"{name}: dtype {got.dtype}, expected {expected.dtype}"
        if not np.isfinite(got.numpy()).all():
            return f"{name}: NaN or Inf"
    return None


def update_norm(arrays: ArrayRecord, reference: ArrayRecord) -> float:
    """``||y_i - x||`` over all arrays."""
    total = sum(
        float(np.sum((arrays[k].numpy().astype(np.float64) - v.numpy()) ** 2))
        for k, v in reference.items()
    )
    return total**0.5


def bound_norms(
    replies: list[Message], reference: ArrayRecord, max_update_norm: float
) -> tuple[list[Message], list[Rejection]]:
    """Replies whose update norm over the arrays they hold (a FedBiAlign client returns a
    subset of ``reference``) is at most ``max_update_norm``, and the rejected ones."""
    kept, rejected = [], []
    for reply in replies:
        if reply.has_error() or max_update_norm <= 0:
            kept.append(reply)
            continue
        arrays = reply.content["arrays"]
        norm = update_norm(arrays, ArrayRecord({k: reference[k] for k in arrays}))
        if norm > max_update_norm:
            reason = f"update norm {norm:.3g} > max-update-norm {max_update_norm:g}"
            log(WARNING, "Rejected the update of node %d: %s", reply.metadata.src_node_id, reason)
            rejected.append(Rejection(reply.metadata.src_node_id, reason))
        else:
            kept.append(reply)
    return kept, rejected


def screen_replies(
    replies: list[Message], reference: ArrayRecord, max_norm_ratio: float
) -> tuple[list[Message], list[Rejection]]:
    """Valid replies (errors pass through, Flower counts them) and the rejected updates."""
    kept, rejected, norms = [], [], {}
    for reply in replies:
        if reply.has_error():
            kept.append(reply)
            continue
        node = reply.metadata.src_node_id
        problem = update_problem(reply.content.array_records.get("arrays"), reference)
        if problem is not None:
            rejected.append(Rejection(node, problem))
            continue
        norms[id(reply)] = update_norm(reply.content["arrays"], reference)
        kept.append(reply)
    if max_norm_ratio > 0 and len(norms) >= 3:
        screened = []
        for reply in kept:
            norm = norms.get(id(reply))
            others = [v for k, v in norms.items() if k != id(reply)]
            median = statistics.median(others) if others else 0.0
            if norm is not None and median > 0 and norm > max_norm_ratio * median:
                reason = f"update norm {norm:.3g} > {max_norm_ratio:g} x median {median:.3g}"
                rejected.append(Rejection(reply.metadata.src_node_id, reason))
            else:
                screened.append(reply)
        kept = screened
    for rejection in rejected:
        log(WARNING, "Rejected the update of node %d: %s", rejection.node, rejection.reason)
    return kept, rejected
