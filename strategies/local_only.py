"""The local-only baseline: every client trains its own model; nothing is aggregated.

The server only relays: it samples every node each round, sends each node the LoRA that node
returned last time (the common initial LoRA in round 1), and keeps each node's latest LoRA
by partition id so that each client's model can be evaluated and saved. The global arrays
never change.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.reply_checks import reply_partition
from strategies.update_checks import Rejection


class LocalOnly(FedAvg):
    """FedAvg's sampling and metric averaging, with per-node models instead of a mean."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.node_arrays: dict[int, ArrayRecord] = {}
        self.client_arrays: dict[int, ArrayRecord] = {}  # by partition id
        # Each client's num-partitions (its node config's, else the run config's): its
        # exported model says which part of the data it was trained on.
        self.client_partitions: dict[int, int] = {}

    def _own_arrays(self, messages: Iterable[Message]) -> list[Message]:
        out = []
        for message in messages:
            node = message.metadata.dst_node_id
            content = RecordDict(dict(message.content.items()))
            if node in self.node_arrays:
                content["arrays"] = self.node_arrays[node]
            out.append(
                Message(
                    content=content, message_type=message.metadata.message_type, dst_node_id=node
                )
            )
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._own_arrays(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self._own_arrays(super().configure_evaluate(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            if reply.has_error():
                continue
            partition = reply_partition(reply)
            if not isinstance(partition, tuple):
                continue  # the FedBiOT mixin's screen (screen_partitions) logged and counted it
            self.node_arrays[reply.metadata.src_node_id] = reply.content["arrays"]
            self.client_arrays[partition[0]] = reply.content["arrays"]
            self.client_partitions[partition[0]] = partition[1]
        _, metrics = super().aggregate_train(server_round, replies)
        return None, metrics

    @staticmethod
    def screen_partitions(replies: list[Message]) -> tuple[list[Message], list[Rejection]]:
        """Replies that name one partition no other reply of the round names (its model is
        kept and exported under that partition), and the rejected ones: a model without a
        partition cannot be kept, and a second claim would overwrite another client's."""
        kept, rejected, claimed = [], [], {}
        for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
            if reply.has_error():
                kept.append(reply)
                continue
            node, partition = reply.metadata.src_node_id, reply_partition(reply)
            if isinstance(partition, tuple) and partition[0] not in claimed:
                claimed[partition[0]] = node
                kept.append(reply)
                continue
            if partition is None:
                reason = "no partition-id and num-partitions metrics"
            elif isinstance(partition, str):
                reason = partition
            else:
                reason = f"partition-id={partition[0]} is node {claimed[partition[0]]}'s this round"
            log(WARNING, "Rejected the reply of node %d: %s", node, reason)
            rejected.append(Rejection(node, reason))
        return kept, rejected
