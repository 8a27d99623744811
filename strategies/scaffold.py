"""SCAFFOLD (Karimireddy et al., ICML 2020), option II, on the trained LoRA parameters.

Flower has no SCAFFOLD strategy, so it is written here. The server keeps a control variate
``c`` per trained tensor and sends it beside the model arrays, in its own ArrayRecord
(``scaffold-c``), so that the arrays the inner aggregation sees are the model's alone. Each
client keeps its own ``c_i`` across rounds (in its node state), follows every AdamW step by
the correction step ``w <- w - eta_l * (c - c_i)`` (``federation/local_training.py``, as
OpenFedLLM does; inside Adam the correction would be rescaled per coordinate, see
``train_lora``), and after K steps of learning rate ``eta_l`` sets

    c_i+ = c_i - c + (x - y_i) / (K * eta_l)

returning its model ``y_i`` and ``delta_c_i = c_i+ - c_i`` (record ``scaffold-delta-c``).
With the correction outside Adam, ``c_i+`` is the client's mean AdamW step per unit of
learning rate, the quantity ``c - c_i`` corrects.

The server moves ``x <- x + eta_g * mean(y_i - x)`` and ``c <- c + |S|/N * mean(delta_c_i)``
over the sampled set S of N nodes, both unweighted means over the same replies (the
paper's). Example-weighting x but not c would aim x at the example-weighted objective and c
at the unweighted one; example-weighting c as well cannot keep ``c = sum_i p_i c_i`` under
partial participation without every node's example count. So SCAFFOLD ignores example
counts for the arrays (its metrics are still example-weighted).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from federation.messages import DELTA_C, SERVER_C

Tensors = Mapping[str, torch.Tensor]


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
    """FedAvg's sampling plus SCAFFOLD's control variates and unweighted server step."""

    def __init__(
        self,
        *,
        server_learning_rate: float = 1.0,
        local_steps: int = 0,
        local_learning_rate: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.server_learning_rate = server_learning_rate
        # K and the clients' default eta_l (a round's config may set its own): with them the
        # server knows what each delta_c_i must be (``control_delta_problem``); 0: unchecked.
        self.local_steps = local_steps
        self.local_learning_rate = local_learning_rate
        self.round_learning_rate = local_learning_rate
        self.control: dict[str, torch.Tensor] | None = None
        self.current: dict[str, torch.Tensor] | None = None
        self.num_nodes = 0

    def control_delta_problem(self, delta: ArrayRecord, model: ArrayRecord) -> str | None:
        """Why a reply's ``delta_c_i`` is not the option-II value of its own model ``y_i``,
        ``-c + (x - y_i) / (K * eta_l)``, or None. The server knows c, x, K and eta_l, so a
        client's delta_c_i is checked, not trusted: a huge one would blow up ``c``, which
        every client then applies at every step. The bound leaves room for float32 rounding
        (the client computes ``(c_i - c + q) - c_i``)."""
        unchecked = min(self.local_steps, self.round_learning_rate) <= 0
        if unchecked or self.control is None or self.current is None:
            return None
        scale = self.local_steps * self.round_learning_rate
        got, y = _tensors(delta), _tensors(model)
        error = norm = 0.0
        for name, c in self.control.items():
            expected = -c + (self.current[name] - y[name]) / scale
            error += float(torch.sum((got[name].double() - expected.double()) ** 2))
            norm += float(torch.sum(expected.double() ** 2) + torch.sum(c.double() ** 2))
        if error**0.5 > 1e-3 * norm**0.5 + 1e-6:
            return (
                f"||delta_c_i - (-c + (x - y_i) / (K eta_l))|| = {error**0.5:.3g} with K = "
                f"{self.local_steps}, eta_l = {self.round_learning_rate:g}: not this update's"
            )
        return None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = _tensors(arrays)
        self.round_learning_rate = float(config.get("learning-rate", self.local_learning_rate))
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
        deltas, models = [], []
        for reply in replies:
            if reply.has_error():
                continue
            # A DPO step runs without control variates: its client's c_i is unchanged.
            if DELTA_C in reply.content:
                deltas.append(_tensors(reply.content[DELTA_C]))
                del reply.content[DELTA_C]
            models.append(_tensors(reply.content[self.arrayrecord_key]))
        # FedAvg's checks and example-weighted metrics; its weighted mean of x is not used.
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or self.current is None or self.control is None:
            return arrays, metrics
        x = {
            k: v + self.server_learning_rate * (sum(m[k] for m in models) / len(models) - v)
            for k, v in self.current.items()
        }
        self.control = server_control_update(self.control, deltas, max(self.num_nodes, 1))
        return _record(x), metrics
