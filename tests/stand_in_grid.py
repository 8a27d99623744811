"""A stand-in Grid for strategy unit tests: it answers which nodes exist, leaves the model
offers (strategies/shipment.py) unanswered so nodes get the frozen weights with their
messages, and fails loudly on any other call (the end-to-end tests use a real SuperLink)."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from federation.messages import OFFER_QUERY


class NodeDirectory(Grid):
    """The nodes ``nodes``, all a strategy asks the grid while sampling."""

    def __init__(self, nodes: Iterable[int]) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def _unused(self, *args: object, **kwargs: object):
        raise AssertionError("the server update must not send other messages")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None) -> list:
        assert all(m.metadata.message_type == OFFER_QUERY for m in messages)
        return []

    create_message = push_messages = pull_messages = _unused
    set_run = _unused
    run = property(_unused)
