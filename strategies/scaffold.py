"""SCAFFOLD (Karimireddy et al., ICML 2020), option II, on the trained LoRA parameters.

Flower has no SCAFFOLD strategy, so it is written here. The server keeps a control variate
``c`` per trained tensor and sends it beside the model arrays, in its own ArrayRecord
(``scaffold-c``), so that the arrays the inner aggregation sees are the model's alone. Each
client keeps its own ``c_i`` across rounds (in its node state), adds ``c - c_i`` to every
gradient of every local step, and after K steps of learning rate ``eta_l`` sets

    c_i+ = c_i - c + (x - y_i) / (K * eta_l)

returning its model ``y_i`` and ``delta_c_i = c_i+ - c_i`` (record ``scaffold-delta-c``).
The server moves ``x <- x + eta_g * (mean(y_i) - x)`` (the example-weighted mean, as FedAvg
does) and ``c <- c + |S|/N * mean(delta_c_i)`` over the sampled set S of N nodes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

SERVER_C = "scaffold-c"
DELTA_C = "scaffold-delta-c"

Tensors = Mapping[str, torch.Tensor]


def corrected_gradient(grad: torch.Tensor, c: torch.Tensor, c_i: torch.Tensor) -> torch.Tensor:
    """The SCAFFOLD local step direction ``g - c_i + c``."""
    return grad - c_i + c


def client_control_update(
    c: Tensors, c_i: Tensors, x: Tensors, y: Tensors, steps: int, learning_rate: float
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Option II: returns ``(c_i+, delta_c_i)``."""
    new, delta = {}, {}
    for name in c:
        new[name] = c_i[name] - c[name] + (x[name] - y[name]) / (steps * learning_rate)
        delta[name] = new[name] - c_i[name]
    return new, delta


def server_control_update(
    c: Tensors, deltas: list[Tensors], num_nodes: int
) -> dict[str, torch.Tensor]:
    """``c + |S|/N * mean over S of delta_c_i`` = ``c + sum(delta_c_i) / N``."""
    return {name: c[name] + sum(d[name] for d in deltas) / num_nodes for name in c}


def _tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v.numpy(), copy=True)) for k, v in record.items()}


def _record(tensors: Tensors) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v.numpy())) for k, v in tensors.items()})


class Scaffold(FedAvg):
    """FedAvg's sampling and weighted mean plus SCAFFOLD's control variates."""

    def __init__(self, *, server_learning_rate: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.server_learning_rate = server_learning_rate
        self.control: dict[str, torch.Tensor] | None = None
        self.current: dict[str, torch.Tensor] | None = None
        self.num_nodes = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = _tensors(arrays)
        if self.control is None:
            self.control = {k: torch.zeros_like(v) for k, v in self.current.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.num_nodes = len(list(grid.get_node_ids()))
        control = _record(self.control)
        for message in messages:
            message.content[SERVER_C] = control
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        deltas = []
        for reply in replies:
            if not reply.has_error() and DELTA_C in reply.content:
                deltas.append(_tensors(reply.content[DELTA_C]))
                del reply.content[DELTA_C]
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or self.current is None or self.control is None:
            return arrays, metrics
        mean = _tensors(arrays)
        x = {k: v + self.server_learning_rate * (mean[k] - v) for k, v in self.current.items()}
        self.control = server_control_update(self.control, deltas, max(self.num_nodes, 1))
        return _record(x), metrics
