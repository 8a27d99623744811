"""Weights out to the nodes and bytes counted both ways: what every server loop shares.

Before its first message a node is offered the frozen (compressed) weights by digest
(``OFFER_QUERY``); it answers with the digest if its store already holds a verified copy,
and with the id of its store when nodes share one (one store per host, see
``client_app/weight_store.py``). Of the nodes of one store that lack them, one gets the
weights with a second offer and the others then load that copy: the weights cross the
network once per store. A node that holds nothing gets the weights and the model package
with its first message, and again after it failed to answer one (it may have missed them);
every other message names their digest only. ``bytes_model_download`` counts the weights
once per node (what one node per host would download), ``bytes_model_download_sent`` what
was actually sent. A bad answer to an offer (an error, a digest not offered) is logged with
the node and that node simply gets the weights. At the end of a run every node is asked to
release its cache (``release_caches``). Every ArrayRecord is counted per round and per node,
down and up, the one-time download apart. ``FedBiOTMixin`` (the Flower strategies) and
``server_app/exchange_loop.RoundTrip`` (KD-FedLLM, split learning) both ship through a
``Shipment``; ``ServerEvaluator`` reads its ``round_metrics``, ``node_bytes`` and
``node_partitions`` (the data partition each node said it trained on, from its reply's
``partition-id`` and ``num-partitions``: Flower's node config in a simulation).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from logging import WARNING

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from federation.messages import (
    OFFER_QUERY,
    OFFER_RECORD,
    PRESENT_KEY,
    RELEASE_QUERY,
    STORE_KEY,
)
from models.fedbiot_models import FedBiOTModels
from models.wire import record_bytes
from strategies.reply_checks import reply_partition

NODE_KEYS = ("bytes_down", "bytes_up", "bytes_model_download", "bytes_model_download_sent")
# The ClientApp's @app.query handlers (client_app/app.py) and the reply's record and keys.
STORE_ID = re.compile(r"[0-9a-f]{32}")


def content_bytes(content: RecordDict) -> int:
    """Bytes of every ArrayRecord in a message's content (Flower's count of them)."""
    return sum(record_bytes(r) for r in content.array_records.values())


class Shipment:
    """The nodes holding the frozen weights, the replies awaited, the byte counts."""

    def __init__(self, models: FedBiOTModels) -> None:
        self.models = models  # the frozen weights and model package nodes rebuild
        self.round_metrics: dict[int, dict[str, float]] = {}
        self.node_bytes: dict[int, dict[int, dict[str, int]]] = {}
        self.node_partitions: dict[int, dict[int, tuple[int, int]]] = {}
        self.served: set[int] = set()
        self.awaited: set[int] = set()
        self.offered: set[int] = set()  # asked once; after a failure a node just gets them
        self.holding: set[int] = set()  # nodes whose store holds the weights

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
            weights = record_bytes(self.models.frozen)
            self.count(server_round, node, "bytes_model_download", weights)
            if node not in self.holding:
                out["base"] = self.models.frozen
                out["model-package"] = self.models.model_package()
                self.count(server_round, node, "bytes_model_download_sent", weights)
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
            partition = reply_partition(reply)
            if isinstance(partition, str):
                log(WARNING, "node %d: %s; not recorded", node, partition)
            elif partition is not None:
                self.node_partitions.setdefault(server_round, {})[node] = partition
        failed = sorted(self.awaited - answered)
        self.served -= set(failed)
        self.holding -= set(failed)
        self.awaited.clear()
        return failed

    def offer(
        self, server_round: int, grid: Grid, nodes: Iterable[int], timeout: float
    ) -> list[Message]:
        """Ask the nodes never offered the weights whether they hold them; send one copy to
        each shared store that lacks them and has more than one of these nodes. Returns the
        messages that carried the weights (for the caller's ``sent_arrays.jsonl``)."""
        digest = self.models.frozen_digest
        new = sorted(set(nodes) - self.served - self.offered)
        if not new:
            return []
        self.offered.update(new)
        query = RecordDict({"config": ConfigRecord({"model-digest": digest})})
        stores: dict[str, list[int]] = {}
        for node, (present, store) in self._ask(grid, self._queries(new, query), timeout).items():
            if present == digest:
                self.holding.add(node)
            elif store:
                stores.setdefault(store, []).append(node)
        carriers = {group[0]: group for group in stores.values() if len(group) > 1}
        if not carriers:
            return []
        query["base"] = self.models.frozen
        query["model-package"] = self.models.model_package()
        queries = self._queries(sorted(carriers), query)
        for node in carriers:
            self.count(server_round, node, "bytes_model_download_sent", content_bytes(query))
        for node, (present, _) in self._ask(grid, queries, timeout).items():
            if present == digest:
                self.holding.update(carriers[node])
        return queries

    @staticmethod
    def _queries(nodes: list[int], content: RecordDict) -> list[Message]:
        return [Message(content, message_type=OFFER_QUERY, dst_node_id=n) for n in nodes]

    def _ask(
        self, grid: Grid, queries: list[Message], timeout: float
    ) -> dict[int, tuple[str, str]]:
        """``(digest held, store id)`` of each node that answered the offer well."""
        digest = self.models.frozen_digest
        nodes = [q.metadata.dst_node_id for q in queries]
        answers, problems = {}, dict.fromkeys(nodes, "no answer")
        for reply in grid.send_and_receive(queries, timeout=timeout):
            node = reply.metadata.src_node_id
            if node not in problems:  # a dead node's error names no source: "no answer"
                continue
            if reply.has_error():
                problems[node] = f"error: {reply.error.reason}"
                continue
            record = reply.content.config_records.get(OFFER_RECORD)
            present = None if record is None else record.get(PRESENT_KEY)
            store = None if record is None else record.get(STORE_KEY, "")
            if not isinstance(present, str) or not isinstance(store, str):
                problems[node] = f"no '{OFFER_RECORD}' record with string values"
            elif present not in ("", digest):
                problems[node] = f"its digest {present[:80]!r} is not the offered {digest}"
            elif store and not STORE_ID.fullmatch(store):
                problems[node] = f"its {STORE_KEY} {store[:80]!r} is not 32 hex digits"
            else:
                answers[node] = (present, store)
                del problems[node]
        for node, problem in sorted(problems.items()):
            log(
                WARNING,
                "node %d: bad answer to the model offer (%s); it gets the weights with its message",
                node,
                problem,
            )
        return answers


def release_caches(grid: Grid, timeout: float) -> None:
    """Tell every connected node the run ended (``RELEASE_QUERY``): each drops its marks on
    its cache, and with ``cache-ephemeral=1`` removes what only this run used."""
    nodes = sorted(grid.get_node_ids())
    queries = [Message(RecordDict(), message_type=RELEASE_QUERY, dst_node_id=n) for n in nodes]
    replies = list(grid.send_and_receive(queries, timeout=timeout))
    failed = set(nodes) - {r.metadata.src_node_id for r in replies if not r.has_error()}
    for node in sorted(failed):
        log(WARNING, "node %d did not release its model cache at the end of the run", node)
