"""A bounded wait for SuperNodes, for every place a run waits for nodes to connect.

Flower's ``strategy_utils.sample_nodes`` loops until ``min_available_nodes`` are connected,
with no deadline: a run that asked for more nodes than the federation has waited forever
("Waiting for nodes to connect: 2 connected (minimum required: 3)"). Every wait goes through
``wait_for_nodes`` first, which gives up after ``node-wait-timeout`` seconds and says how
many nodes were expected, how many came and why that many were expected.
"""

from __future__ import annotations

import time
from logging import INFO

from flwr.common.logger import log
from flwr.serverapp import Grid


class NodeWaitError(TimeoutError):
    """Fewer nodes connected than the run needs within ``node-wait-timeout``."""


def wait_for_nodes(grid: Grid, count: int, timeout: float, reason: str) -> list[int]:
    """The connected node ids once at least ``count`` are connected; ``reason`` says why
    ``count`` (e.g. ``"run-config min-train-nodes=3"``) in the error after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    logged = -1
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() >= deadline:
            raise NodeWaitError(
                f"expected {count} node(s) ({reason}) but {len(nodes)} connected within "
                f"node-wait-timeout={timeout:g} s; start more SuperNodes (simulation: "
                "--federation-config num-supernodes=N) or lower min-train-nodes"
            )
        if len(nodes) != logged:
            log(INFO, "Waiting for %d node(s) (%s): %d connected", count, reason, len(nodes))
            logged = len(nodes)
        time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
