"""The server's model offer against the nodes' real offer handler: one copy goes to a shared
store, a node holding the weights is not sent them, and a bad answer (a digest not offered,
an error, silence, a bad store id) is logged with the node, which then gets the weights."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from client_app.model_offer import offer_reply
from federation.messages import OFFER_QUERY, OFFER_RECORD, PRESENT_KEY, STORE_KEY
from models.fedbiot_models import FedBiOTModels
from models.wire import record_bytes
from strategies.shipment import Shipment
from tests.tiny import tiny_fedbiot_models

GOOD = (1, 2, 3)  # nodes of one host: one shared store


class Host(Grid):
    """Nodes 1-3 answer with the real ClientApp handler on one cache folder; 4-7 misbehave."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.queried: list[int] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(range(1, 8))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None) -> list:
        replies = []
        for query in messages:
            assert query.metadata.message_type == OFFER_QUERY
            node = query.metadata.dst_node_id
            self.queried.append(node)
            if node in GOOD:
                TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 3, node, 1
                context = Context(
                    run_id=3,
                    node_id=node,
                    node_config={"cache-dir": str(self.cache)},
                    state=RecordDict(),
                    run_config={},
                )
                replies.append(offer_reply(query, context))
            elif node == 4:  # a digest it was not offered
                answer = ConfigRecord({PRESENT_KEY: "0" * 64, STORE_KEY: ""})
                replies.append(Message(RecordDict({OFFER_RECORD: answer}), reply_to=query))
            elif node == 5:
                replies.append(Message(Error(code=0, reason="boom"), reply_to=query))
            elif node == 7:  # a store id that is not one
                answer = ConfigRecord({PRESENT_KEY: "", STORE_KEY: "../x"})
                replies.append(Message(RecordDict({OFFER_RECORD: answer}), reply_to=query))
        return replies  # node 6 stays silent

    def _unused(self, *args: object, **kwargs: object):
        raise AssertionError("the shipment only sends offers")

    create_message = push_messages = pull_messages = set_run = _unused
    run = property(_unused)


@pytest.fixture(scope="module")
def models() -> FedBiOTModels:
    return tiny_fedbiot_models()


def test_one_copy_per_store_and_bad_answers_named_without_ending_the_run(
    models: FedBiOTModels, tmp_path: Path
) -> None:
    shipment, grid = Shipment(models), Host(tmp_path)
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("flwr").addHandler(handler)
    try:
        carried = shipment.offer(1, grid, range(1, 8), timeout=5)
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    assert [m.metadata.dst_node_id for m in carried] == [1]  # the store's first node
    assert shipment.holding == set(GOOD)
    store = tmp_path / "weights"
    assert [p.name for p in store.iterdir() if not p.name.startswith(".")] == [models.frozen_digest]
    for node, problem in [
        (4, "is not the offered"),
        (5, "error: boom"),
        (6, "no answer"),
        (7, "is not 32 hex digits"),
    ]:
        assert any(f"node {node}: bad answer" in w and problem in w for w in warnings), node
    sent = {n: shipment.address(1, n, RecordDict({"config": ConfigRecord()})) for n in range(1, 8)}
    assert sorted(n for n, content in sent.items() if "base" in content) == [4, 5, 6, 7]
    weights = record_bytes(models.frozen)
    metrics = shipment.metrics(1)
    assert metrics["bytes_model_download"] == 7 * weights  # one per node, as if one per host
    assert metrics["bytes_model_download_sent"] == 5 * weights  # the store's copy and 4 nodes
    # A node offered once is not asked again; the next round sends nothing more.
    assert shipment.offer(2, grid, range(1, 8), timeout=5) == []
    assert grid.queried.count(2) == 1


def test_each_replys_partition_is_recorded_and_a_bad_one_is_logged_with_the_node(
    models: FedBiOTModels,
) -> None:
    """A reply's partition-id/num-partitions (Flower's node config) go to communication.csv;
    a reply is untrusted, so a pair that names no partition is logged and not recorded."""
    shipment = Shipment(models)
    sent = {
        1: {"partition-id": 3, "num-partitions": 20},
        2: {"partition-id": 20, "num-partitions": 20},  # out of range
        3: {"partition-id": 1.5, "num-partitions": 4},  # not a whole number
        4: {"train_loss": 1.0},  # names none: nothing to record, nothing wrong
    }
    replies = [
        Message(RecordDict({"metrics": MetricRecord(values)}),
                reply_to=Message(RecordDict(), dst_node_id=node, message_type="train"))
        for node, values in sent.items()
    ]  # fmt: skip
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("flwr").addHandler(handler)
    try:
        shipment.receive(1, replies)
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    assert shipment.node_partitions == {1: {1: (3, 20)}}
    assert any("node 2: partition-id=20 of num-partitions=20" in w for w in warnings)
    assert any("node 3: partition-id=1.5" in w for w in warnings)
    assert not any("node 4" in w for w in warnings)
