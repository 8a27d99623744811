"""The server's model offer, answered without loading a model.

Before a node's first message the server offers the frozen weights by digest
(``strategies/shipment.py``): the node answers whether its store holds a verified entry of it,
and which shared store it uses, so that the server ships the weights once per store. A
deployed SuperNode starts a process per message, so this imports only the store (torch and
safetensors, to check an entry), not transformers, peft or the data libraries.
"""

from __future__ import annotations

from logging import WARNING

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log

from client_app.model_cache import CacheError, checked_digest, store_package, verify_entry
from client_app.weight_store import StorePlace, evict, mark_use, max_bytes, store_id, store_place
from federation.messages import OFFER_RECORD, PRESENT_KEY, STORE_KEY
from federation.run_config import RunConfig


def receive_weights(msg: Message, context: Context, config: RunConfig, place: StorePlace) -> str:
    """The digest the server names for this node, marked in use by this run; the weights
    stored (and the store trimmed to its limit) where the message carries them."""
    content = msg.content
    digest = checked_digest(content["config"].get("model-digest"), "config key 'model-digest'")
    created = "base" in content and not (place.root / digest).is_dir()
    mark_use(place.root, digest, context.run_id, created)  # before writing: never evicted
    if "base" in content:
        store_package(place.root, content["base"], content["model-package"])
        evict(place.root, max_bytes(context.node_config, config.cache_max_gb, context.node_id))
    return digest


def offer_reply(msg: Message, context: Context) -> Message:
    """Answer the server's model offer: the digest if this node's store holds a verified
    entry of it (stored from the offer itself when it carries the weights), and the id of
    a shared store, so that the server ships once per store."""
    config = RunConfig.from_flower(context.run_config)
    place = store_place(context.node_config, config.cache_dir, context.node_id)
    try:
        digest = receive_weights(msg, context, config, place)
    except CacheError as err:
        raise CacheError(f"node {context.node_id}: {err}") from err
    present = ""
    if (place.root / digest).is_dir():
        try:
            verify_entry(place.root / digest, digest)
            present = digest
        except CacheError as err:
            log(
                WARNING,
                "node %d: cached model at %s is bad, not used (%s); the server sends the "
                "weights and they replace it",
                context.node_id,
                place.root / digest,
                err,
            )
    record = ConfigRecord(
        {PRESENT_KEY: present, STORE_KEY: store_id(place.root) if place.shared else ""}
    )
    return Message(RecordDict({OFFER_RECORD: record}), reply_to=msg)
