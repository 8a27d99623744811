"""Names of the records and queries server and clients exchange, beyond Flower's own.

The strategies and server loops write these records and the ClientApp reads them (or the
other way round), so the names live below both apps; neither side imports the other's.
"""

from __future__ import annotations

from collections.abc import Sequence

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from models.depth_memory import BUDGET_KEY

# SCAFFOLD (strategies/scaffold.py): the server's control variate ``c`` beside the model
# arrays, and the client's ``delta_c_i`` in its reply.
SERVER_C = "scaffold-c"
DELTA_C = "scaffold-delta-c"
# The record of the fixed DPO reference's LoRA (run config ``dpo-reference='fixed'``).
DPO_REFERENCE = "dpo-reference"
# FedBiAlign: a node's adapter depth, in its train config.
DEPTH_KEY = "adapter-depth"
# A ClientApp answers this with ``@app.query("memory_budget")`` (see ``budget_reply``).
BUDGET_ACTION = "memory_budget"  # the ClientApp's @app.query handler
BUDGET_QUERY = f"{MessageType.QUERY}.{BUDGET_ACTION}"
BUDGET_RECORD = "budget"
# Records of the split messages: the server's gradient, the client's activations.
GRADIENT = "gradient"
ACTIVATIONS = "activations"
# The model offer before a node's first message (strategies/shipment.py): the node answers
# whether its weight store holds the offered digest, and which shared store it uses; at a
# run's end the server asks every node to release the run's marks on its store.
OFFER_ACTION = "model_offer"
OFFER_QUERY = f"{MessageType.QUERY}.{OFFER_ACTION}"
RELEASE_ACTION = "cache_release"
RELEASE_QUERY = f"{MessageType.QUERY}.{RELEASE_ACTION}"
OFFER_RECORD = "model-offer"
PRESENT_KEY = "present-digest"
STORE_KEY = "store-id"


def budget_reply(message: Message, budget_gb: float) -> Message:
    """A ClientApp's answer to ``BUDGET_QUERY``: its memory budget in GB."""
    return Message(
        RecordDict({BUDGET_RECORD: MetricRecord({BUDGET_KEY: float(budget_gb)})}),
        reply_to=message,
    )


def depth_blocks(config: ConfigRecord, adapter_blocks: Sequence[int]) -> list[int]:
    """The top blocks a train message's ``adapter-depth`` asks for (all when it has none).
    The depth comes from the server: anything but a whole number from 1 to the region's
    size is refused naming the key, not sliced into other blocks (0 or -1 would)."""
    value = config.get(DEPTH_KEY, len(adapter_blocks))
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 1 <= value <= len(adapter_blocks)
    ):
        raise ValueError(
            f"train message {DEPTH_KEY}={value!r}: must be a whole number from 1 to the "
            f"adapter region's {len(adapter_blocks)} blocks"
        )
    return list(adapter_blocks[-value:])
