"""Adapter depth from a client's memory budget and the memory each depth needs.

A client of depth ``s`` trains the LoRA of the last ``s`` adapter blocks. What each depth
costs is estimated for the clients' dtype, quantization, checkpointing, batch and sequence
(``models/memory_estimate.depth_memory``, checked against measured steps). Budgets come
from each SuperNode's node config (``memory-budget-gb``) or, in simulation, from a run-config
map of partitions to budgets. GB here is 10^9 bytes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

GB = 1e9
BUDGET_KEY = "memory-budget-gb"


class MemoryBudgetError(ValueError):
    """A client's memory budget is missing, malformed or too small for any depth."""


def parse_depth_table(
    text: str, adapter_layers: int, num_blocks: int | None = None
) -> tuple[int, ...]:
    """Depths like ``"2,4,6"``: positive, increasing, the deepest within the adapter region.

    The adapter region is the last ``adapter_layers`` blocks; ``num_blocks`` (known once the
    model is loaded) bounds the region itself.
    """
    try:
        depths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"depth-table={text!r} must be comma-separated integers") from None
    if any(d < 1 for d in depths):
        raise ValueError(f"depth-table={text!r}: depths must be >= 1")
    if any(a >= b for a, b in itertools.pairwise(depths)):
        raise ValueError(f"depth-table={text!r}: depths must be strictly increasing")
    if depths[-1] > adapter_layers:
        raise ValueError(
            f"depth-table={text!r}: depth {depths[-1]} exceeds the adapter region "
            f"(adapter-layers={adapter_layers})"
        )
    if num_blocks is not None and adapter_layers > num_blocks:
        raise ValueError(f"adapter-layers={adapter_layers} exceeds the model's {num_blocks} blocks")
    return depths


def budget_gb(value: Any, where: str) -> float:
    """A positive, finite number of GB, or an error naming where it came from."""
    try:
        budget = float(value)
    except (TypeError, ValueError):
        raise MemoryBudgetError(f"{where}: {value!r} is not a number of GB") from None
    if not math.isfinite(budget) or budget <= 0:
        raise MemoryBudgetError(f"{where}: {value!r} must be a positive number of GB")
    return budget


def parse_budget_map(text: str, key: str = "memory-budgets") -> dict[int, float]:
    """Partition budgets like ``"0:2.0,1:4.0,2:8.0"`` (run-config ``key``; empty: none)."""
    budgets: dict[int, float] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        partition, sep, value = entry.partition(":")
        if not sep or not partition.strip().isdigit():
            raise MemoryBudgetError(
                f"run-config {key}: entry {entry!r} must be <partition>:<GB>, e.g. 0:4.0"
            )
        pid = int(partition)
        if pid in budgets:
            raise MemoryBudgetError(f"run-config {key}: partition {pid} is given twice")
        budgets[pid] = budget_gb(value.strip(), f"run-config {key} entry {entry!r}")
    return budgets


def node_budget_gb(node_config: Mapping[str, Any], budgets: Mapping[int, float]) -> float:
    """The node's own ``memory-budget-gb``, else its partition's entry in the run config."""
    if BUDGET_KEY in node_config:
        return budget_gb(node_config[BUDGET_KEY], f"node config {BUDGET_KEY}")
    partition = node_config.get("partition-id")
    if partition is not None and int(partition) in budgets:
        return budgets[int(partition)]
    hint = f" or run-config memory-budgets an entry for partition {partition}"
    raise MemoryBudgetError(
        f"the node declares no memory budget: give node config {BUDGET_KEY}"
        + (hint if partition is not None else "")
    )


def choose_depths(budgets_gb: Mapping[int, float], depth_gb: Mapping[int, float]) -> dict[int, int]:
    """Each client's deepest depth whose memory (GB per depth) fits its budget.

    A client below the shallowest depth is an error naming it and its budget; FedBiAlign's
    strategy logs it and leaves that client out of the round rather than end the run.
    """
    if not depth_gb:
        raise ValueError("no memory for any adapter depth")
    shallowest = min(depth_gb)
    depths = {}
    for client, budget in budgets_gb.items():
        fitting = [d for d, need in depth_gb.items() if need <= budget]
        if not fitting:
            raise MemoryBudgetError(
                f"client {client}: memory budget {budget:g} GB is below the "
                f"{depth_gb[shallowest]:.3g} GB the shallowest adapter depth {shallowest} needs"
            )
        depths[client] = max(fitting)
    return depths
