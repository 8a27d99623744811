"""Validate every client reply as a whole before any Flower aggregation sees it.

Flower's ``FedAvg.aggregate_train``/``aggregate_evaluate`` raise for the whole round
(``InconsistentMessageReplies``, ``ZeroDivisionError``, a NumPy error) when one reply has a
second ArrayRecord, one MetricRecord key more or less than the others, a ``num-examples``
that is zero, negative or not finite, or an Array whose bytes do not decode to its declared
shape and dtype. Any of these ends the ServerApp, so one faulty site would stop everybody's
run. Here such a reply is dropped (the caller logs it with the node id and counts it in
``clients_rejected``) and the round goes on with the others.

``num-examples`` is a client's claim and weights its update: it must be a finite number
> 0, and a claim above ``max_examples`` is lowered to it (logged), so one client cannot make
itself the whole global step.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from logging import WARNING

import torch
from flwr.app import Array, Message, MetricRecord
from flwr.common.logger import log

from strategies.update_checks import Rejection

WEIGHT_KEY = "num-examples"
METRICS = "metrics"


def array_problem(name: str, array: Array) -> str | None:
    """Why ``array``'s bytes are not the array its header declares, or None."""
    try:
        value = array.numpy()
    except (TypeError, ValueError, OSError) as error:
        return f"{name}: bytes do not decode ({type(error).__name__}: {error})"
    if tuple(value.shape) != tuple(array.shape) or str(value.dtype) != array.dtype:
        return (
            f"{name}: bytes hold {value.dtype}{list(value.shape)}, "
            f"declared {array.dtype}{list(array.shape)}"
        )
    return None


def _finite_number(value: object) -> bool:
    # A MetricRecord may hold lists, but no ClientApp of ours sends one, and the strategies
    # (and Flower's averaging, for lists of unequal length) take each metric as one number.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def metrics_problem(metrics: MetricRecord) -> str | None:
    """Why a reply's metrics cannot be averaged, or None."""
    for key, value in metrics.items():
        if not _finite_number(value):
            return f"metric {key}={value!r} is not a finite number"
    weight = metrics.get(WEIGHT_KEY)
    if weight is None:
        return f"no {WEIGHT_KEY!r} metric"
    if weight <= 0:
        return f"{WEIGHT_KEY}={weight!r} must be a number > 0"
    return None


def reply_partition(reply: Message) -> tuple[int, int] | str | None:
    """``(partition-id, num-partitions)`` from a reply's metrics; None when it has neither,
    and why not when they are not two whole numbers with 0 <= id < count (the reply is
    untrusted)."""
    metrics = reply.content.metric_records.get(METRICS)
    if metrics is None or "partition-id" not in metrics or "num-partitions" not in metrics:
        return None
    pid, count = metrics["partition-id"], metrics["num-partitions"]
    whole = all(_finite_number(v) and float(v).is_integer() for v in (pid, count))
    if not whole or not 0 <= pid < count:
        return f"partition-id={pid!r} of num-partitions={count!r} is not a partition"
    return int(pid), int(count)


def content_problem(
    reply: Message, required: Iterable[str], optional: Iterable[str] | None = ()
) -> str | None:
    """Why a reply's records are not exactly what an aggregation can use, or None:
    the ArrayRecords ``required`` (plus any of ``optional``; None: any), one MetricRecord
    ``metrics``, no other record, every Array decodable."""
    content = reply.content
    arrays = set(content.array_records)
    required = set(required)
    allowed = arrays if optional is None else required | set(optional)
    if arrays - allowed or required - arrays:
        return f"ArrayRecords {sorted(arrays)}, expected {sorted(required)}"
    # The exchange loops (optional=None) also carry ConfigRecords beside their arrays.
    others = sorted(set(content) - arrays - {METRICS}) if optional is not None else []
    if others or METRICS not in content.metric_records:
        return f"records {sorted(content)}, expected {sorted(required)} and {METRICS!r}"
    for record_name, record in content.array_records.items():
        for key, array in record.items():
            problem = array_problem(f"{record_name}/{key}", array)
            if problem is not None:
                return problem
    return metrics_problem(content.metric_records[METRICS])


def screen_contents(
    replies: list[Message],
    required: Iterable[str],
    optional: Iterable[str] | None = (),
    max_examples: float = 0.0,
) -> tuple[list[Message], list[Rejection]]:
    """Replies an aggregation can use (error replies pass through: Flower counts them) and
    the rejected ones. Replies whose metric keys differ from the most common key set among
    the valid ones are rejected too (ties: the set of the lowest node id), since Flower
    averages only identical key sets. ``max_examples > 0`` caps ``num-examples``."""
    kept, rejected = [], []
    for reply in replies:
        if reply.has_error():
            kept.append(reply)
            continue
        problem = content_problem(reply, required, optional)
        if problem is None:
            kept.append(reply)
        else:
            rejected.append(Rejection(reply.metadata.src_node_id, problem))
    valid = sorted((r for r in kept if not r.has_error()), key=lambda r: r.metadata.src_node_id)
    key_sets = Counter(frozenset(r.content[METRICS].keys()) for r in valid)
    if len(key_sets) > 1:
        common = max(key_sets, key=key_sets.__getitem__)  # first maximum: lowest node
        for reply in valid:
            keys = frozenset(reply.content[METRICS].keys())
            if keys != common:
                reason = (
                    f"metric keys differ from the others': extra {sorted(keys - common)}, "
                    f"missing {sorted(common - keys)}"
                )
                rejected.append(Rejection(reply.metadata.src_node_id, reason))
                kept.remove(reply)
    if max_examples > 0:
        for reply in kept:
            if not reply.has_error():
                cap_examples(reply, max_examples)
    for rejection in rejected:
        log(WARNING, "Rejected the reply of node %d: %s", rejection.node, rejection.reason)
    return kept, rejected


def cap_examples(reply: Message, max_examples: float) -> None:
    """Lower a ``num-examples`` claim above ``max_examples`` to it, in place."""
    metrics = reply.content[METRICS]
    claimed = metrics[WEIGHT_KEY]
    if claimed > max_examples:
        log(
            WARNING,
            "Node %d claims %s=%s; capped at max-num-examples=%s",
            reply.metadata.src_node_id,
            WEIGHT_KEY,
            claimed,
            max_examples,
        )
        metrics[WEIGHT_KEY] = type(claimed)(max_examples)


def finite_state(state: dict[str, torch.Tensor], what: str) -> None:
    """Raise naming the first tensor of ``state`` that holds NaN or Inf: such a model would
    be sent to every client (each then fails) and exported as if it were a result."""
    bad = [name for name, value in state.items() if not torch.isfinite(value).all()]
    if bad:
        raise FloatingPointError(
            f"the server's {what} holds non-finite values after aggregation or distillation "
            f"({len(bad)} tensors, e.g. {bad[0]}); stopping before they are sent or saved"
        )
