"""Weights out to the nodes and bytes counted both ways: what every server loop shares.

A node gets the frozen (compressed) weights and the model package with the first message
addressed to it, and again after it failed to answer one (it may have missed them); every
other message names their digest only. Every ArrayRecord is counted per round and per node,
down and up, the one-time download apart. ``FedBiOTMixin`` (the Flower strategies) and
``server_app/exchange_loop.RoundTrip`` (KD-FedLLM, split learning) both ship through a
``Shipment``; ``ServerEvaluator`` reads its ``round_metrics`` and ``node_bytes``.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, RecordDict

from models.fedbiot_models import FedBiOTModels
from models.wire import record_bytes

NODE_KEYS = ("bytes_down", "bytes_up", "bytes_model_download")


def content_bytes(content: RecordDict) -> int:
    """Bytes of every ArrayRecord in a message's content (Flower's count of them)."""
    return sum(record_bytes(r) for r in content.array_records.values())


class Shipment:
    """The nodes holding the frozen weights, the replies awaited, the byte counts."""

    def __init__(self, models: FedBiOTModels) -> None:
        self.models = models  # the frozen weights and model package nodes rebuild
        self.round_metrics: dict[int, dict[str, float]] = {}
        self.node_bytes: dict[int, dict[int, dict[str, int]]] = {}
        self.served: set[int] = set()
        self.awaited: set[int] = set()

    def metrics(self, server_round: int) -> dict[str, float]:
        return self.round_metrics.setdefault(server_round, dict.fromkeys(NODE_KEYS, 0))

    def count(self, server_round: int, node: int, key: str, value: int) -> None:
        per_node = self.node_bytes.setdefault(server_round, {})
        per_node.setdefault(node, dict.fromkeys(NODE_KEYS, 0))[key] += value
        self.metrics(server_round)[key] += value

    def address(self, server_round: int, node: int, content: RecordDict) -> RecordDict:
        """A copy of ``content`` for ``node``, with the frozen weights if it lacks them."""
        out = RecordDict(dict(content.items()))
        self.count(server_round, node, "bytes_down", content_bytes(out))
        if node not in self.served:
            out["base"] = self.models.frozen
            out["model-package"] = self.models.model_package()
            self.count(server_round, node, "bytes_model_download", record_bytes(out["base"]))
            self.served.add(node)
        self.awaited.add(node)
        return out

    def receive(self, server_round: int, replies: Iterable[Message]) -> list[int]:
        """Count the successful replies' bytes; return the awaited nodes that sent none.

        Failures are counted by destination, since the SuperLink's error reply for a dead
        node names no source; those nodes get the weights again with their next message.
        """
        answered = set()
        for reply in replies:
            if reply.has_error():
                continue
            node = reply.metadata.src_node_id
            self.count(server_round, node, "bytes_up", content_bytes(reply.content))
            answered.add(node)
        failed = sorted(self.awaited - answered)
        self.served -= set(failed)
        self.awaited.clear()
        return failed
